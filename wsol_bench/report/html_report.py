"""`report.html`: one self-contained page per run (and `compare.html` for several runs), built
from the run folder's own tables and figures.

The page loads nothing at view time: the figures are the run's PNG files inlined as `data:`
URIs, the style and the small script that sorts the tables are inline. Cells show exactly what
the Markdown tables show (`table_format.formatted_cells`: "mean ± half-width" where a column has
interval bounds); a numeric cell also carries its full-precision value in `data-value`, which
the script sorts by. Every table of the run appears, the known ones in their own sections
first and any other one after them, so a new scorer's table needs no change here.
"""

from __future__ import annotations

import base64
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from jinja2 import Environment, PackageLoader

from wsol_bench.files import atomic_write_text
from wsol_bench.metrics.bootstrap import CI_HI, CI_LO, bound_names, is_bound_column
from wsol_bench.report.compare import (
    DEFAULT_TOLERANCE,
    Comparison,
    compare_tables,
    comparison_cells,
    config_differences,
)
from wsol_bench.report.comparisons import significance_matrix
from wsol_bench.report.manifest import read_manifest
from wsol_bench.report.run_folder import VARIANTS, RunFolder
from wsol_bench.report.table_format import MISSING, formatted_cells

REPORT_FILE = "report.html"
COMPARE_FILE = "compare.html"
SWEEP = "sweep"  # sweep.csv's table: fractions, shown in percent
SWEEP_CAPTION = "Scores in percent here (fractions in sweep.csv); mean boxes: predicted boxes per image."
MEAN_BOXES_FROM, MEAN_BOXES = "n_pred_boxes", "mean boxes"
COMPARE = "compare"  # the paired comparisons (run_tables' key), shown as significance matrices
RANKINGS = ("ranking", "agreement")
# "localization" holds the rows of "table" (table.csv) without the other scorers' columns
SHOWN_WITH = {"localization": "table"}
FOLD_ROWS = 25  # a longer table is folded into <details> so the page stays readable
FIRST_FIGURES = ("sweep.png", "faithfulness_curves.png")
MARK_CLASSES = {"+": "higher", "-": "lower", "=": "same"}

_TEMPLATES = Environment(loader=PackageLoader("wsol_bench.report", "templates"), autoescape=True,
                         trim_blocks=True, lstrip_blocks=True)


@dataclass
class Cell:
    """One table cell: its text, its number (None for text and missing values) and a CSS class."""

    text: str
    value: float | None = None
    css: str = ""

    @property
    def missing(self) -> bool:
        """Whether the cell shows a missing value (sorted last in either direction)."""
        return self.text in (MISSING, "")


@dataclass
class HtmlTable:
    """A table as the template draws it."""

    title: str
    columns: list[str]
    rows: list[list[Cell]]
    caption: str = ""
    notes: Sequence[str] = ()
    folded: bool = field(init=False)

    def __post_init__(self) -> None:
        self.folded = len(self.rows) > FOLD_ROWS


@dataclass
class Figure:
    """A PNG file of a run folder, inlined."""

    name: str
    uri: str


def _number(value) -> float | None:
    """`value` as a finite float, or None (text, missing, NaN, infinite)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _plain(frame: pd.DataFrame) -> pd.DataFrame:
    """`frame` with a named index (method, threshold) turned into leading columns."""
    return frame.reset_index() if any(name is not None for name in frame.index.names) else frame


def html_table(title: str, frame: pd.DataFrame, caption: str | None = None, notes: Sequence[str] = (),
               css: dict[str, str] | None = None) -> HtmlTable:
    """`frame` as display cells (those of the Markdown tables, whole numbers in integer columns),
    each numeric cell with its value; `css` gives a class per cell text (the matrix marks)."""
    frame = _plain(frame)
    cells = formatted_cells(frame)
    css = css or {}
    columns = []
    for column in cells.columns:  # whole columns as lists: a cell at a time through pandas is slow
        kind = frame[column].dtype
        numeric = pd.api.types.is_numeric_dtype(kind) and not pd.api.types.is_bool_dtype(kind)
        raw = frame[column].tolist()
        # integer columns (0/1 flags, counts) read as integers; the others as the Markdown tables show them
        texts = [str(v) for v in raw] if pd.api.types.is_integer_dtype(kind) and numeric else list(cells[column])
        values = [_number(v) for v in raw] if numeric else [None] * len(raw)
        columns.append([Cell(str(text), value, css.get(text, "")) for text, value in zip(texts, values)])
    rows = [list(row) for row in zip(*columns)]
    return HtmlTable(title, [str(c) for c in cells.columns], rows, caption or "", list(notes))


def paper_tables(tables: dict[str, pd.DataFrame]) -> list[HtmlTable]:
    """The paper-layout tables ("box", "mask") with their captions and notes."""
    return [html_table(f"{variant}: predicted regions vs {VARIANTS[variant]}", tables[variant],
                       tables[variant].attrs.get("caption"), tables[variant].attrs.get("notes", ()))
            for variant in VARIANTS if variant in tables]


def significance_tables(tables: dict[str, pd.DataFrame]) -> list[HtmlTable]:
    """One methods x methods matrix of "+", "-", "=" per measure of the paired comparisons."""
    compare = tables.get(COMPARE)
    if compare is None or compare.empty:
        return []
    return [html_table(str(measure), significance_matrix(compare, measure), css=MARK_CLASSES)
            for measure in dict.fromkeys(compare["measure"])]


def rank_view(frame: pd.DataFrame) -> pd.DataFrame:
    """A rankings table with each interval shown as its two ends ("1 to 2"): a rank's interval
    is far from symmetric, so "± half-width" would misstate it."""
    view = frame.copy()
    for column in [c for c in frame.columns if not is_bound_column(c)]:
        low, high = bound_names(column)
        if low in view.columns and high in view.columns:
            ends = [MISSING if pd.isna(a) or pd.isna(b) else f"{a:g} to {b:g}" for a, b in zip(view[low], view[high])]
            view = view.drop(columns=[low, high])
            view.insert(view.columns.get_loc(column) + 1, f"{column} interval", ends)
    return view


def significance_sentence(run: RunFolder) -> str:
    """What the marks of the matrices mean, at the run's interval level."""
    level = run.bootstrap.level
    if level is None:
        return "No paired comparisons: the run has no intervals (report.ci=null)."
    return (f"+: the row's method scores significantly higher than the column's, -: lower, =: no significant "
            f"difference. Paired bootstrap over the images both methods scored ({run.bootstrap.resamples} "
            f"resamples); p-values Holm-adjusted over the pairs of each measure and compared with "
            f"{1 - level:.3g}, the run's level of {100 * level:g} % (report.ci). Every pair with its "
            "difference, interval and p-values is in the table compare.csv below.")


def other_tables(tables: dict[str, pd.DataFrame]) -> list[HtmlTable]:
    """Every table not drawn in a section of its own, in the order `run_tables` gives them, each
    titled by the file it is written to (sweep.csv in percent, `sweep_view`)."""
    dedicated = {*VARIANTS, *RANKINGS, *(k for k, v in SHOWN_WITH.items() if v in tables)}
    return [html_table(f"{name}.csv", frame) if name != SWEEP else
            html_table(f"{name}.csv", sweep_view(frame), caption=SWEEP_CAPTION)
            for name, frame in tables.items() if name not in dedicated]


def sweep_view(frame: pd.DataFrame) -> pd.DataFrame:
    """sweep.csv as the page shows it: its scores (fractions in the CSV) in percent, like every
    other table, and the mean number of boxes with its decimals (not a count to round)."""
    view = frame.copy()
    for column in view.columns:
        if str(column).startswith(("box_", "mask_")):
            view[column] = view[column] * 100
    return view.rename(columns={f"{MEAN_BOXES_FROM}{end}": f"{MEAN_BOXES}{end}" for end in ("", CI_LO, CI_HI)})


def _inline_png(path: Path) -> Figure:
    return Figure(path.name, "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii"))


def figure_files(folder: Path) -> tuple[list[Path], list[Path]]:
    """The PNG figures of a run folder: (curves, galleries); a gallery's name holds "gallery".
    The known curves come first, then the others by name. Only regular files: a link could
    put a file from outside the run folder into the page."""
    first = {name: i for i, name in enumerate(FIRST_FIGURES)}
    found = sorted((p for p in folder.glob("*.png") if p.is_file() and not p.is_symlink()),
                   key=lambda p: (first.get(p.name, len(first)), p.name))
    galleries = [p for p in found if "gallery" in p.name]
    return [p for p in found if p not in galleries], galleries


def run_facts(run: RunFolder) -> dict[str, str]:
    """The title facts of a run: dataset, model, target, images, date (run.json's "finished";
    a run writing its report has no run.json yet: then now)."""
    finished = (read_manifest(run.path) or {}).get("finished") or time.strftime("%Y-%m-%dT%H:%M:%S")
    return {"dataset": run.dataset_label, "model": str(run.setting("model.name", "?")),
            "target": str(run.setting("target", "?")), "images": str(run.records["image_id"].nunique()),
            "date": str(finished)}


def interval_settings(run: RunFolder) -> str:
    """The run's bootstrap settings as a sentence."""
    settings = run.bootstrap
    if settings.level is None:
        return "No confidence intervals (report.ci=null)."
    return (f"report.ci={settings.level:g}: percentile bootstrap over images, {settings.resamples} Poisson "
            f"resamples (report.resamples), seed {settings.seed} (report.seed).")


def _config_text(run: RunFolder) -> str:
    return (run.path / "config.yaml").read_text(errors="replace")


def html_report(run: RunFolder, tables: dict[str, pd.DataFrame]) -> str:
    """The self-contained HTML page of one run from its tables (`run_tables(run)`) and the PNG
    figures of its folder."""
    curves, galleries = figure_files(run.path)
    return _TEMPLATES.get_template("report.html.j2").render(
        facts=run_facts(run), config_text=_config_text(run), intervals=interval_settings(run),
        paper=paper_tables(tables), matrices=significance_tables(tables), matrix_note=significance_sentence(run),
        rankings=[html_table(f"{name}.csv", rank_view(tables[name])) for name in RANKINGS if name in tables],
        curves=[_inline_png(p) for p in curves], galleries=[_inline_png(p) for p in galleries],
        others=other_tables(tables))


def write_html_report(run: RunFolder, tables: dict[str, pd.DataFrame], out_dir: str | Path) -> Path:
    """Write `report.html` into `out_dir` (atomically); returns its path."""
    return atomic_write_text(Path(out_dir) / REPORT_FILE, html_report(run, tables))


def comparison_table(title: str, comparison: Comparison) -> HtmlTable:
    """The side-by-side table of `compare_tables`: text as in the terminal (signed differences,
    flagged cells marked with *), flagged cells highlighted."""
    cells = comparison_cells(comparison, "text")
    table = html_table(title, comparison.values)
    for row_index, row in enumerate(table.rows):
        for column, cell in zip(cells.columns, row):
            cell.text = str(cells[column].iloc[row_index])
            if column in comparison.flags and comparison.flags[column].iloc[row_index]:
                cell.css = "flagged"
    return table


def differences_table(runs: list[RunFolder], labels: list[str]) -> HtmlTable:
    """The config keys whose values differ between the runs, one column per run."""
    differences = config_differences([r.config for r in runs])
    frame = pd.DataFrame([[key, *(str(v) for v in values)]
                          for key, values in differences.items()], columns=["setting", *labels], dtype=object)
    return html_table("config keys whose values differ", frame)


def comparison_html(runs: list[RunFolder], tables: list[dict[str, pd.DataFrame]], labels: list[str],
                    tolerance: float = DEFAULT_TOLERANCE) -> str:
    """One self-contained page for several runs: who is who, their settings differences, each
    paper table side by side (differences to the first run beyond `tolerance` highlighted),
    each run's own paper tables with intervals, and their figures side by side."""
    side_by_side = [comparison_table(f"{variant}: runs side by side",
                                     compare_tables([t[variant] for t in tables], labels, tolerance))
                    for variant in VARIANTS if all(variant in t for t in tables)]
    folders = [figure_files(run.path) for run in runs]
    names = list(dict.fromkeys(p.name for curves, galleries in folders for p in curves + galleries))
    figures = [(name, [next((_inline_png(p) for p in curves + galleries if p.name == name), None)
                       for curves, galleries in folders]) for name in names]
    return _TEMPLATES.get_template("compare.html.j2").render(
        runs=[{"label": label, "path": str(run.path), **run_facts(run)} for label, run in zip(labels, runs)],
        labels=labels, differences=differences_table(runs, labels), tolerance=tolerance,
        side_by_side=side_by_side, per_run=[(label, paper_tables(t)) for label, t in zip(labels, tables)],
        figures=figures)


def write_comparison_html(runs: list[RunFolder], tables: list[dict[str, pd.DataFrame]], labels: list[str],
                          out_dir: str | Path, tolerance: float = DEFAULT_TOLERANCE) -> Path:
    """Write `compare.html` into `out_dir` (made if absent, atomically); returns its path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return atomic_write_text(out / COMPARE_FILE, comparison_html(runs, tables, labels, tolerance))
