"""Tables for people: aligned text for the terminal, Markdown (pipe tables) and LaTeX
(booktabs), from one DataFrame.

Scores print in percent with two decimals, counts (columns named `n_*`) as integers,
thresholds as given, missing values as "--". Cells that are already text pass through
unchanged, so a caller can format its own cells (e.g. signed differences with markers).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
from tabulate import tabulate

from wsol_bench.files import atomic_write_text
from wsol_bench.metrics.bootstrap import bound_names, is_bound_column

MISSING = "--"
LATEX_SPECIALS = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                  "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def is_count_column(name: str) -> bool:
    """Counts are columns whose last word starts with `n_` (`n_images`, `B-A: n_images`)."""
    return str(name).rsplit(" ", 1)[-1].startswith("n_")


def cell_text(column: str, value) -> str:
    """One cell as text: counts as integers, thresholds as given, everything else with two
    decimals; text unchanged; missing values as "--"."""
    if isinstance(value, str):
        return value
    if value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA:
        return MISSING
    if is_count_column(column):
        return str(round(float(value)))
    if column == "threshold":
        return f"{float(value):g}"
    return f"{float(value):.2f}"


def interval_text(column: str, value, lo, hi) -> str:
    """A mean with its interval as "mean ± half-width" (the half-width of the interval's width;
    the bounds themselves are in the CSV), or the mean alone when it has no interval."""
    text = cell_text(column, value)
    if text == MISSING or any(v is None or (isinstance(v, float) and math.isnan(v)) for v in (lo, hi)):
        return text
    return f"{text} ± {(float(hi) - float(lo)) / 2:.2f}"


def formatted_cells(view: pd.DataFrame) -> pd.DataFrame:
    """Every cell of `view` as its display text; a column with interval bounds ("<c> ci_lo",
    "<c> ci_hi") shows "mean ± half-width" and the bound columns are not shown."""
    cells = {}
    for column in view.columns:
        if is_bound_column(column):
            continue
        lo, hi = bound_names(column)
        if lo in view.columns and hi in view.columns:
            cells[column] = [interval_text(column, v, a, b) for v, a, b in zip(view[column], view[lo], view[hi])]
        else:
            cells[column] = [cell_text(column, v) for v in view[column]]
    return pd.DataFrame(cells, dtype=object)


def _looks_numeric(text: str) -> bool:
    core = text.split(" ± ")[0].replace("*", "").strip()
    if core == MISSING:
        return True
    try:
        float(core)
    except ValueError:
        return False
    return True


def _alignments(cells: pd.DataFrame) -> list[str]:
    """Text columns left, number columns right."""
    return ["right" if all(_looks_numeric(v) for v in cells[c]) else "left" for c in cells.columns]


def _footer(caption: str | None, notes: Sequence[str]) -> list[str]:
    return ([caption] if caption else []) + list(notes)


def to_text(view: pd.DataFrame, caption: str | None = None, notes: Sequence[str] = ()) -> str:
    """Aligned plain text for the terminal: caption, table, then notes."""
    cells = formatted_cells(view)
    table = tabulate(cells.values.tolist(), headers=list(cells.columns), tablefmt="simple",
                     colalign=_alignments(cells), disable_numparse=True)
    return "\n".join(([caption] if caption else []) + [table] + list(notes))


def to_markdown(view: pd.DataFrame, caption: str | None = None, notes: Sequence[str] = ()) -> str:
    """A Markdown pipe table; the caption and notes follow it as paragraphs, so the file
    still starts with the header row."""
    cells = formatted_cells(view)
    table = tabulate(cells.values.tolist(), headers=list(cells.columns), tablefmt="pipe",
                     colalign=_alignments(cells), disable_numparse=True)
    footer = _footer(caption, notes)
    return table + "\n" + ("\n" + "\n\n".join(footer) + "\n" if footer else "")


def latex_escape(text: str) -> str:
    """Text with LaTeX's special characters escaped."""
    return "".join(LATEX_SPECIALS.get(ch, ch) for ch in str(text))


def to_latex(view: pd.DataFrame, caption: str | None = None, notes: Sequence[str] = (),
             block_column: str | None = None) -> str:
    """A booktabs tabular (inside a table environment with a caption when there is a caption
    or notes); a \\midrule separates blocks where `block_column` changes value."""
    cells = formatted_cells(view)
    spec = "".join("l" if a == "left" else "r" for a in _alignments(cells))
    lines = [f"\\begin{{tabular}}{{{spec}}}", "\\toprule",
             " & ".join(latex_escape(c) for c in cells.columns) + r" \\", "\\midrule"]
    previous = None
    for i, row in enumerate(cells.itertuples(index=False)):
        block = cells[block_column].iloc[i] if block_column else None
        if i > 0 and block != previous:
            lines.append("\\midrule")
        previous = block
        lines.append(" & ".join(latex_escape(v) for v in row) + r" \\")
    lines += ["\\bottomrule", "\\end{tabular}"]
    footer = _footer(caption, notes)
    if not footer:
        return "\n".join(lines) + "\n"
    body = ["\\begin{table}[t]", "\\centering", f"\\caption{{{latex_escape(caption or '')}}}", *lines]
    body += [f"\\par\\footnotesize {latex_escape(note)}" for note in notes]
    return "\n".join(body + ["\\end{table}"]) + "\n"


def write_table_files(view: pd.DataFrame, folder: Path, stem: str, *, caption: str | None = None,
                      notes: Sequence[str] = (), block_column: str | None = None,
                      formats: Sequence[str] = ("csv", "md", "tex")) -> list[Path]:
    """Write `view` as `<stem>.csv` (full precision), `.md` and `.tex`; returns the paths."""
    folder.mkdir(parents=True, exist_ok=True)
    writers = {"csv": lambda: view.to_csv(index=False),
               "md": lambda: to_markdown(view, caption, notes),
               "tex": lambda: to_latex(view, caption, notes, block_column)}
    paths = []
    for fmt in formats:
        if fmt not in writers:
            raise ValueError(f"unknown table format {fmt!r}; valid: {sorted(writers)}")
        paths.append(atomic_write_text(folder / f"{stem}.{fmt}", writers[fmt]()))
    return paths
