"""`wsol-bench-report`: rebuild, check and compare run folders.

    wsol-bench-report RUN                 rebuild RUN's tables (and gallery) from its records
    wsol-bench-report RUN --check         exit 1 when RUN's tables differ from its records
    wsol-bench-report RUN_A RUN_B ...     compare runs side by side (differences to RUN_A)
    wsol-bench-report RUN_A RUN_B --combined   one table, a block of rows per run/dataset
    wsol-bench-report --compare RUN_A RUN_B [--out DIR]   one HTML page for the runs: DIR/compare.html

Rebuilding one run's tables also rebuilds its self-contained report.html.
"""

from __future__ import annotations

import argparse
import sys
from contextlib import nullcontext
from pathlib import Path

from wsol_bench.cli.errors import run_command
from wsol_bench.errors import SettingError
from wsol_bench.locks import FolderLock
from wsol_bench.report.compare import (
    DEFAULT_TOLERANCE,
    compare_tables,
    comparison_cells,
    config_differences,
    run_labels,
)
from wsol_bench.report.html_report import write_comparison_html, write_html_report
from wsol_bench.report.run_folder import VARIANTS, read_run
from wsol_bench.report.table_format import to_markdown, to_text, write_table_files
from wsol_bench.run.gallery import rebuild_gallery
from wsol_bench.run.run_tables import (
    check_run,
    combined_table,
    format_run_tables,
    run_tables,
    write_run_tables,
)


def report_one(run_dir: Path, out: Path | None, gallery: bool, allow_incomplete: bool = False) -> None:
    """Rebuild one run's tables (and gallery) and print them, and where they were written.
    Writing into the run folder (or its killed run's staging folder) takes the run folder's
    lock: a run still writing it is not disturbed (the report is refused naming it)."""
    writes_run_folder = (out is None or out == run_dir) and run_dir.is_dir()  # a missing folder is refused below
    with FolderLock(run_dir, "wait until it ends, or write the tables elsewhere with --out") if writes_run_folder \
            else nullcontext():
        run = read_run(run_dir, allow_incomplete)
        target = out or run.path  # a killed run's tables go beside its rows, in its staging folder
        tables = run_tables(run)
        write_run_tables(run.path, target, tables)
        print(format_run_tables(tables))
        if gallery:
            print(rebuild_gallery(run, target / "gallery.png"))
        report = write_html_report(run, tables, target)  # after the gallery: the page inlines it
    print(f"\ntables written to {target}")
    if run.killed_run_of is not None and target == run.path:
        print(f"(the staging folder of the run killed in {run.killed_run_of}: the next run into that folder "
              "removes it; --out DIR keeps the tables elsewhere)")
    print(f"report: {report}")


def report_many(run_dirs: list[Path], out: Path | None, tolerance: float, combined: bool,
                allow_incomplete: bool = False) -> None:
    """Compare several runs (or combine them into one table) and print the result."""
    runs = [read_run(d, allow_incomplete) for d in run_dirs]
    labels = run_labels(len(runs))
    legend = [f"{label} = {run.path} ({run.dataset_label}, {run.setting('model.name', '?')})"
              for label, run in zip(labels, runs)]
    differences = config_differences([r.config for r in runs])
    diff_lines = [f"config differs: {key}: " + ", ".join(f"{lab}={val}" for lab, val in zip(labels, values))
                  for key, values in differences.items()]
    if len({r.dataset_label for r in runs}) > 1 and not combined:
        diff_lines.append("the runs are on different datasets: --combined gives one table with a block per run")
    all_tables = [run_tables(r) for r in runs]
    for variant in VARIANTS:
        if not all(variant in t for t in all_tables):
            continue
        if combined:
            table = combined_table(runs, variant)
            print(to_text(table, table.attrs["caption"], table.attrs["notes"]) + "\n")
            if out:
                write_table_files(table, out, f"combined_{variant}", caption=table.attrs["caption"],
                                  notes=table.attrs["notes"], block_column="dataset")
            continue
        comparison = compare_tables([t[variant] for t in all_tables], labels, tolerance)
        caption = (f"{variant}: runs side by side; differences to {labels[0]} beyond {tolerance} "
                   "percentage points (or present in one run only) are marked")
        print(to_text(comparison_cells(comparison, "text"), caption + " with *", legend) + "\n")
        if out:
            out.mkdir(parents=True, exist_ok=True)
            comparison.values.to_csv(out / f"comparison_{variant}.csv", index=False)
            (out / f"comparison_{variant}.md").write_text(
                to_markdown(comparison_cells(comparison, "markdown"), caption + " in bold", legend + diff_lines))
    print("\n".join(diff_lines) if diff_lines else "configs agree")
    if out:
        print(f"\nwritten to {out}")


def report_compare(run_dirs: list[Path], out: Path, tolerance: float, allow_incomplete: bool = False) -> None:
    """One self-contained HTML page for several runs, `out`/compare.html; prints its path."""
    runs = [read_run(d, allow_incomplete) for d in run_dirs]
    path = write_comparison_html(runs, [run_tables(r) for r in runs], run_labels(len(runs)), out, tolerance)
    print(f"report: {path}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="wsol-bench-report", description="Rebuild a run's tables from its records, check them, "
        "or compare several runs side by side.")
    parser.add_argument("runs", nargs="+", type=Path, metavar="RUN_DIR", help="run folder(s) of wsol-bench")
    parser.add_argument("--out", type=Path, default=None,
                        help="write here (one run: default the run folder; several: default print only; "
                             "--compare: default the current folder)")
    parser.add_argument("--check", action="store_true",
                        help="exit 1 when tables rebuilt from records differ from the run's table.csv")
    parser.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                        help="comparison: mark differences above this many percentage points")
    parser.add_argument("--combined", action="store_true",
                        help="several runs: one table with a block of rows per run instead of a comparison")
    parser.add_argument("--compare", action="store_true",
                        help="several runs: write one self-contained HTML page for them (compare.html)")
    parser.add_argument("--no-gallery", action="store_true", help="one run: do not redraw gallery.png")
    parser.add_argument("--allow-incomplete", action="store_true",
                        help="build tables from a run folder that is not a complete run (killed, failed or "
                             "edited), from the rows it holds")
    return parser.parse_args(argv)


def run_report(args: argparse.Namespace) -> int:
    """Do what the parsed command line asks; returns 0, or 1 when a check failed."""
    if args.compare:
        if len(args.runs) < 2 or args.check or args.combined:
            raise SettingError("--compare needs two or more run folders and goes without --check and --combined, "
                               "e.g. wsol-bench-report --compare RUN_A RUN_B")
        report_compare(args.runs, args.out or Path.cwd(), args.tolerance, args.allow_incomplete)
        return 0
    if args.check:
        failed = False
        for run_dir in args.runs:
            lines = check_run(run_dir, args.allow_incomplete)
            failed |= bool(lines)
            print(f"{run_dir}: " + ("tables DIFFER from its records:\n  " + "\n  ".join(lines) if lines
                                    else "tables match its records"))
        return 1 if failed else 0
    if len(args.runs) == 1:
        report_one(args.runs[0], args.out, gallery=not args.no_gallery, allow_incomplete=args.allow_incomplete)
    else:
        report_many(args.runs, args.out, args.tolerance, args.combined, args.allow_incomplete)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Console entry point; returns (and exits with) 0, 1 (check failed, or a bug) or 2 (bad input)."""
    args = parse_args(argv)
    code = run_command("wsol-bench-report", lambda: run_report(args))
    if argv is None:
        sys.exit(code)
    return code


if __name__ == "__main__":
    main()
