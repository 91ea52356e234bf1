"""`wsol-bench-report`: rebuild, check and compare run folders.

    wsol-bench-report RUN                 rebuild RUN's tables (and gallery) from its records
    wsol-bench-report RUN --check         exit 1 when RUN's tables differ from its records
    wsol-bench-report RUN_A RUN_B ...     compare runs side by side (differences to RUN_A)
    wsol-bench-report RUN_A RUN_B --combined   one table, a block of rows per run/dataset
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from wsol_bench.run_folder import (VARIANTS, RunFolder, check_run, combined_table, format_run_tables,
                                   read_run, run_tables, write_run_tables)
from wsol_bench.table_format import cell_text, is_count_column, to_markdown, to_text, write_table_files
from wsol_bench.tables import COLUMN_ORDER

DEFAULT_TOLERANCE = 0.01  # percentage points: below what two decimals can show
DEFAULT_GALLERY_IMAGES = 6


@dataclass
class Comparison:
    """Runs side by side: `values` holds the key columns, then per run its columns
    ("A: IoU") and, from the second run on, the difference to the first ("B-A: IoU");
    `flags` is True where a difference exceeds the tolerance or a value exists in one run only."""

    values: pd.DataFrame
    flags: pd.DataFrame
    keys: list[str]
    labels: list[str]
    diff_columns: list[str]


def run_labels(count: int) -> list[str]:
    """Short labels for runs in a comparison: A, B, C, ..."""
    return [chr(ord("A") + i) if i < 26 else f"R{i + 1}" for i in range(count)]


def compare_tables(views: list[pd.DataFrame], labels: list[str],
                   tolerance: float = DEFAULT_TOLERANCE) -> Comparison:
    """Align paper-layout tables on (method[, threshold]) and put their numbers side by side
    with differences to the first; rows present in some runs only are kept (and flagged)."""
    views = [v.copy() for v in views]
    if any("threshold" in v.columns for v in views):
        for v in views:
            if "threshold" not in v.columns:  # dropped because it was a single value
                v.insert(1, "threshold", (v.attrs.get("thresholds") or [np.nan])[0])
    keys = ["method"] + (["threshold"] if "threshold" in views[0].columns else [])
    columns = [c for c in COLUMN_ORDER if c not in keys and any(c in v.columns for v in views)]
    columns += [c for v in views for c in v.columns if c not in keys and c not in columns
                and pd.api.types.is_numeric_dtype(v[c])]
    rows = pd.concat([v[keys] for v in views]).drop_duplicates()
    index = pd.MultiIndex.from_frame(rows) if len(keys) > 1 else pd.Index(rows["method"], name="method")
    aligned = [v.set_index(keys).reindex(index).reindex(columns=columns).astype(float) for v in views]
    values = pd.DataFrame(index=index)
    flags = pd.DataFrame(index=index)
    diff_columns = []
    for i, (label, frame) in enumerate(zip(labels, aligned)):
        for column in columns:
            values[f"{label}: {column}"] = frame[column]
            flags[f"{label}: {column}"] = False
        if i == 0:
            continue
        for column in columns:
            name = f"{label}-{labels[0]}: {column}"
            diff = frame[column] - aligned[0][column]
            values[name] = diff
            diff_columns.append(name)
            one_sided = frame[column].isna() != aligned[0][column].isna()
            flags[name] = (diff.abs() > tolerance).fillna(False) | one_sided
    return Comparison(values.reset_index(), flags.reset_index(drop=True), keys, labels, diff_columns)


def comparison_cells(comparison: Comparison, style: str = "text") -> pd.DataFrame:
    """The comparison as display text: differences signed, flagged cells marked with `*`
    (text) or in bold (Markdown)."""
    cells = {}
    for column in comparison.values.columns:
        texts = []
        for row, value in enumerate(comparison.values[column]):
            text = cell_text(column, value)
            if column in comparison.diff_columns and text != "--":
                text = f"{round(value):+d}" if is_count_column(column) else f"{value:+.2f}"
            if column in comparison.flags and comparison.flags[column].iloc[row]:
                text = f"**{text}**" if style == "markdown" else f"{text}*"
            texts.append(text)
        cells[column] = texts
    return pd.DataFrame(cells, dtype=object)


def flatten(config: dict, prefix: str = "") -> dict:
    """Nested config as {"dotted.key": value}; lists are values."""
    flat = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def config_differences(configs: list[dict]) -> dict[str, list]:
    """Config keys whose values are not the same in every run: key -> value per run
    ("<absent>" where a run lacks the key)."""
    flats = [flatten(c) for c in configs]
    keys = list(dict.fromkeys(k for f in flats for k in f))
    return {k: [f.get(k, "<absent>") for f in flats] for k in keys
            if any(f.get(k, "<absent>") != flats[0].get(k, "<absent>") for f in flats)}


class GallerySkipped(Exception):
    """The gallery cannot be redrawn from this run folder (the message says why)."""


def stored_gallery_maps(run: RunFolder, count: int) -> tuple[list[int], list[str], dict[str, torch.Tensor]]:
    """Dataset positions, image ids and raw maps of the first `count` stored items of every
    method, read through the map store that the run's `maps.json` names."""
    from wsol_bench.store import MapStore

    index_path = run.path / "maps.json"
    if not index_path.is_file():
        raise GallerySkipped(f"no map store recorded ({index_path} is missing)")
    positions, ids, maps = None, None, {}
    for method, entry in json.loads(index_path.read_text()).items():
        folder = Path(entry["folder"])
        if not (folder / "settings.json").is_file():
            raise GallerySkipped(f"the maps of {method} are no longer in the cache ({folder})")
        store = MapStore(folder.parent, json.loads((folder / "settings.json").read_text()), int(entry["shard_size"]))
        if store.key != entry["key"]:
            raise GallerySkipped(f"the cache folder {folder} no longer holds the key {entry['key']}")
        try:
            shard = store.load(0)
        except (FileNotFoundError, RuntimeError) as exc:
            raise GallerySkipped(str(exc)) from exc
        if positions is None:
            positions, ids = [int(p) for p in shard.positions[:count]], shard.image_ids[:count]
        elif shard.image_ids[:count] != ids:
            raise GallerySkipped(f"the stored maps of {method} cover other images than those of the first method")
        maps[method] = shard.maps[: len(positions)]
    if not maps:
        raise GallerySkipped(f"{index_path} lists no method")
    return positions, ids, maps


def rebuild_gallery(run: RunFolder, path: Path) -> str:
    """Redraw the heatmap gallery from the run's stored maps and its dataset; returns what
    was done or why it was skipped (no stored maps, dataset or model not available here)."""
    from wsol_bench.datasets import EvalTransform, build_dataset
    from wsol_bench.figures import denormalize, heatmap_gallery
    from wsol_bench.models import architecture_data_config

    count = int(run.setting("gallery_images", DEFAULT_GALLERY_IMAGES) or 0)
    if count == 0:
        return "gallery skipped: the run has gallery_images=0"
    try:
        positions, ids, maps = stored_gallery_maps(run, count)
    except GallerySkipped as exc:
        return f"gallery skipped: {exc}"
    pre = run.setting("preprocess", {}) or {}
    model_cfg = run.setting("model", {}) or {}
    try:
        dc = architecture_data_config(model_cfg["name"], **(model_cfg.get("kwargs") or {}))
        transform = EvalTransform(size=tuple(pre.get("input_size") or dc.input_size[1:]),
                                  mean=pre.get("mean") or dc.mean, std=pre.get("std") or dc.std,
                                  interpolation=pre.get("interpolation") or dc.interpolation)
        dataset = build_dataset(run.setting("dataset.name"), transform=transform,
                                **(run.setting("dataset.params", {}) or {}))
        samples = [dataset[p] for p in positions]
    except (FileNotFoundError, ValueError, KeyError, RuntimeError, IndexError) as exc:
        return f"gallery skipped: the run's dataset or model cannot be rebuilt here ({exc})"
    if [getattr(s, "image_id", None) for s in samples] != list(ids):
        return "gallery skipped: the dataset here yields other images than the stored maps (image ids differ)"
    heatmap_gallery([denormalize(s.image, transform.mean, transform.std) for s in samples],
                    [s.boxes[s.box_labels == s.label] for s in samples], maps, path,
                    threshold=float(run.setting("metric.thresholds", [0.5])[0]), titles=list(ids))
    return f"gallery: {path}"


def report_one(run_dir: Path, out: Path | None, gallery: bool) -> None:
    """Rebuild one run's tables (and gallery) and print them."""
    run = read_run(run_dir)
    tables = run_tables(run)
    target = out or run_dir
    write_run_tables(run_dir, target, tables)
    print(format_run_tables(tables))
    if gallery:
        print(rebuild_gallery(run, target / "gallery.png"))
    print(f"\ntables written to {target}")


def report_many(run_dirs: list[Path], out: Path | None, tolerance: float, combined: bool) -> None:
    """Compare several runs (or combine them into one table) and print the result."""
    runs = [read_run(d) for d in run_dirs]
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


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="wsol-bench-report", description="Rebuild a run's tables from its records, check them, "
        "or compare several runs side by side.")
    parser.add_argument("runs", nargs="+", type=Path, metavar="RUN_DIR", help="run folder(s) of wsol-bench")
    parser.add_argument("--out", type=Path, default=None,
                        help="write here (one run: default the run folder; several: default print only)")
    parser.add_argument("--check", action="store_true",
                        help="exit 1 when tables rebuilt from records differ from the run's table.csv")
    parser.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                        help="comparison: mark differences above this many percentage points")
    parser.add_argument("--combined", action="store_true",
                        help="several runs: one table with a block of rows per run instead of a comparison")
    parser.add_argument("--no-gallery", action="store_true", help="one run: do not redraw gallery.png")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Console entry point; returns (and exits with) 0, 1 (check failed) or 2 (bad input)."""
    args = parse_args(argv)
    try:
        if args.check:
            failed = False
            for run_dir in args.runs:
                lines = check_run(run_dir)
                failed |= bool(lines)
                print(f"{run_dir}: " + ("tables DIFFER from its records:\n  " + "\n  ".join(lines) if lines
                                        else "tables match its records"))
            code = 1 if failed else 0
        elif len(args.runs) == 1:
            report_one(args.runs[0], args.out, gallery=not args.no_gallery)
            code = 0
        else:
            report_many(args.runs, args.out, args.tolerance, args.combined)
            code = 0
    except (FileNotFoundError, ValueError, KeyError) as exc:
        print(f"wsol-bench-report: error: {exc}", file=sys.stderr)
        code = 2
    if argv is None:
        sys.exit(code)
    return code


if __name__ == "__main__":
    main()
