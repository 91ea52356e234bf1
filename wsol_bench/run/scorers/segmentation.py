"""segmentation.csv and segmentation_records.csv (`segmentation=chefer`): Chefer et al.'s
ImageNet-segmentation scores of every method (docs/protocol.md 4.4), pixel accuracy, mIoU and
mAP over every image the run scores, from summed states (states/segmentation.json) that merge
exactly across shards and ranks (with intervals on, their bootstrap replicates beside them in
states/segmentation_replicates.npz; docs/protocol.md 7.1), and one row per image and method.
The three scores join `table.csv` and the paper-layout tables (Seg Pixel Acc, Seg mIoU,
Seg mAP, n_images_seg)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig

from wsol_bench.choices import SEGMENTATION_PROTOCOLS
from wsol_bench.errors import InputFileError, SettingError
from wsol_bench.files import CsvRows, csv_text
from wsol_bench.metrics.base import load_states, save_states
from wsol_bench.metrics.bootstrap import BootstrapSettings, bound_names
from wsol_bench.metrics.replicate_sums import ReplicateSumsByMethod, load_replicate_sums, save_replicate_sums
from wsol_bench.metrics.segmentation import (
    CONTRIBUTION_WIDTH,
    CheferSegmentation,
    batch_counts,
    segmentation_contributions,
    segmentation_values,
)
from wsol_bench.report.replicated import (
    ReplicatedMeasure,
    check_replicate_settings,
    interval_bounds,
    replicate_columns,
)
from wsol_bench.report.run_folder import RunFolder
from wsol_bench.report.tables import with_bounds_after
from wsol_bench.run.batch import MethodBatch
from wsol_bench.run.distributed import Ranks
from wsol_bench.run.scorers.base import (
    MeasureTables,
    RunContext,
    Scorer,
    append_rank_rows,
    register_scorer,
    report_bootstrap,
)

STATE_FILE = Path("states") / "segmentation.json"
REPLICATE_FILE = Path("states") / "segmentation_replicates.npz"  # the bootstrap replicates of the totals
STATE_NAME = "chefer_segmentation"
TABLE_FILE = "segmentation.csv"
ROWS_FILE = "segmentation_records.csv"
PROTOCOLS = SEGMENTATION_PROTOCOLS  # segmentation.protocol
ROW_COLUMNS = ["image_id", "method", "prediction", "degenerate", "correct", "labelled", "intersection_background",
               "intersection_foreground", "union_background", "union_foreground", "ap"]
TABLE_COLUMNS = ["method", "pixel_accuracy", "mIoU", "mAP", "iou_background", "iou_foreground", "images",
                 "n_degenerate"]
SUMMARY_NAMES = {"pixel_accuracy": "Seg Pixel Acc", "mIoU": "Seg mIoU", "mAP": "Seg mAP"}
CAPTION = ("Seg Pixel Acc, Seg mIoU, Seg mAP: Chefer et al.'s segmentation scores of the maps against the "
           "masks, percent, over all images (n_images_seg).")
log = logging.getLogger("wsol_bench")


@dataclass(frozen=True)
class SegmentationIncrements:
    """The kernel of `SegmentationScorer`: one batch of one method -> (its state increments,
    its per-image rows as CSV text, and with intervals on its image ids and their bootstrap
    contributions, else an empty list and None)."""

    per_image: bool
    replicates: bool = False

    def __call__(self, mb: MethodBatch) -> tuple[dict[str, torch.Tensor], str, list[str], np.ndarray | None]:
        if mb.gt.seg_masks is None:
            raise ValueError(f"segmentation scores need masks; a batch of {mb.method} has none")
        metric = CheferSegmentation()
        counts = batch_counts(mb.heatmaps, mb.gt.seg_masks, mb.gt.seg_valid, mb.degenerate)
        for c, flag in zip(counts, mb.degenerate.tolist()):
            metric.update_counts(c, flag)
        rows = []
        if self.per_image:
            predictions, degenerate = mb.predictions.tolist(), mb.degenerate.tolist()
            for i, (sample, c) in enumerate(zip(mb.samples, counts)):
                rows.append({"image_id": sample.image_id, "method": mb.method, "prediction": predictions[i],
                             "degenerate": int(degenerate[i]), "correct": c["correct"], "labelled": c["labelled"],
                             "intersection_background": int(c["intersection"][0]),
                             "intersection_foreground": int(c["intersection"][1]),
                             "union_background": int(c["union"][0]), "union_foreground": int(c["union"][1]),
                             "ap": repr(float(c["ap"]))})
        state = {name: value.clone() for name, value in metric.metric_state.items()}
        if not self.replicates:
            return state, csv_text(rows, ROW_COLUMNS), [], None
        ids = [sample.image_id for sample in mb.samples]
        return state, csv_text(rows, ROW_COLUMNS), ids, segmentation_contributions(counts)


@register_scorer("segmentation")
class SegmentationScorer(Scorer):
    """Chefer et al.'s segmentation scores per method, over every image of the run (no
    correctness filter, as the reference)."""

    def __init__(self, out_dir: Path, *, methods: list[str] = (), per_image: bool = True,
                 bootstrap: BootstrapSettings | None = None) -> None:
        self.kernel = SegmentationIncrements(bool(per_image), replicates=bootstrap is not None)
        self.metrics: dict[str, CheferSegmentation] = {m: CheferSegmentation() for m in methods}
        self.rows = CsvRows(out_dir / ROWS_FILE, ROW_COLUMNS) if per_image else None
        self.replicates = ReplicateSumsByMethod({STATE_NAME: CONTRIBUTION_WIDTH}, bootstrap, methods) \
            if bootstrap is not None else None

    @classmethod
    def from_config(cls, cfg: DictConfig, context: RunContext) -> SegmentationScorer | None:
        node = cfg.get("segmentation")
        if not node:
            return None
        if node.protocol not in PROTOCOLS:
            raise SettingError(f"unknown segmentation.protocol {node.protocol!r}; valid: "
                               f"{', '.join(PROTOCOLS)}")
        if not context.has_masks:
            raise SettingError(f"segmentation={node.protocol} scores maps against segmentation masks, and "
                               f"dataset {context.dataset_name} has none; use a dataset with masks "
                               "(imagenet_segmentation, voc_segmentation, openimages)")
        return cls(context.out_dir, methods=list(context.methods), per_image=bool(node.per_image),
                   bootstrap=report_bootstrap(cfg))

    def add(self, method: str, part: tuple[dict[str, torch.Tensor], str, list[str], np.ndarray | None]) -> None:
        """Add a batch's state increments (and bootstrap contributions) to the method's totals
        and append its rows."""
        state, text, ids, contributions = part
        self.metrics.setdefault(method, CheferSegmentation()).merge_state(state)
        if self.replicates is not None and contributions is not None:
            self.replicates.add(method, ids, {STATE_NAME: contributions})
        if self.rows is not None:
            self.rows.write_text(text)

    def gather(self, ranks: Ranks, parts: list[Path]) -> None:
        """Sum every rank's states, method by method in the run's order; rank 0 appends the
        other ranks' per-image rows in rank order."""
        self.close()
        if ranks.distributed:
            for metric in self.metrics.values():
                metric.sync_ranks()
            if self.replicates is not None:
                self.replicates.sync_ranks()
        if self.rows is not None:
            append_rank_rows(ranks, parts, ROWS_FILE)

    def close(self) -> None:
        """Close the per-image rows file (idempotent)."""
        if self.rows is not None:
            self.rows.close()

    def compute(self) -> pd.DataFrame:
        """segmentation.csv's table (`segmentation_table`)."""
        return segmentation_table(self.metrics)

    def write(self, out_dir: Path) -> list[Path]:
        """states/segmentation.json (segmentation.csv is built from it with the run's other
        tables, `tables`) and the per-image rows, written as they came."""
        self.close()
        (out_dir / STATE_FILE).parent.mkdir(parents=True, exist_ok=True)
        paths = [save_states(out_dir / STATE_FILE, {m: {STATE_NAME: metric} for m, metric in self.metrics.items()})]
        if self.replicates is not None:
            paths.append(save_replicate_sums(out_dir / REPLICATE_FILE, self.replicates.sums))
        table = self.compute()
        log.info("segmentation (Chefer et al., percent; docs/protocol.md 4.4):\n%s",
                 table.to_string(index=False, float_format=lambda v: f"{v:.2f}"))
        if self.rows is not None:
            paths.append(self.rows.path)
        return paths

    @classmethod
    def tables(cls, run: RunFolder) -> MeasureTables | None:
        """segmentation.csv's table rebuilt from the states, with the bootstrap interval of
        every score where the run kept its replicates, and its pixel accuracy, mIoU and mAP per
        method for `table.csv` and the paper tables."""
        if not (run.path / STATE_FILE).is_file():
            return None
        table = segmentation_table(read_segmentation_states(run.path / STATE_FILE)).set_index("method")
        replicates = {}
        if run.bootstrap.level is not None and (run.path / REPLICATE_FILE).is_file():
            sums = load_replicate_sums(run.path / REPLICATE_FILE)
            check_replicate_settings(sums, run.bootstrap, run.path / REPLICATE_FILE)
            replicates = replicate_columns(sums, STATE_NAME, segmentation_values)
            table = with_bounds_after(table, interval_bounds(replicates, run.bootstrap.level))
        renamed = {bound: new for column, name in SUMMARY_NAMES.items()
                   for bound, new in zip((column, *bound_names(column)), (name, *bound_names(name)))}
        summary = table[[c for c in table.columns if c in renamed]].rename(columns=renamed)
        summary["n_images_seg"] = table["images"]
        replicated = {name: ReplicatedMeasure(summary[name], replicates[column], table["images"])
                      for column, name in SUMMARY_NAMES.items() if column in replicates}
        return MeasureTables(summary=summary, caption=CAPTION, files={TABLE_FILE.removesuffix(".csv"): table.reset_index()},
                             replicated=replicated, better=dict.fromkeys(SUMMARY_NAMES.values(), "higher"))


def segmentation_table(metrics: dict[str, CheferSegmentation]) -> pd.DataFrame:
    """One row per method: pixel accuracy, mIoU, mAP and the IoU of each class in percent, the
    number of images and of degenerate maps (methods without images have no row)."""
    rows = []
    for method, metric in metrics.items():
        if int(metric.images) == 0:
            continue
        scores = metric.compute()
        rows.append({"method": method, **{k: 100 * scores[k] for k in
                                           ("pixel_accuracy", "mIoU", "mAP", "iou_background", "iou_foreground")},
                     "images": scores["images"], "n_degenerate": scores["n_degenerate"]})
    return pd.DataFrame(rows, columns=TABLE_COLUMNS)


def read_segmentation_states(path: Path) -> dict[str, CheferSegmentation]:
    """Every method's `CheferSegmentation` from the state file (checked as it is read); a file
    holding anything else is an InputFileError naming it."""
    metrics = {}
    for method, named in load_states(path).items():
        metric = named.get(STATE_NAME)
        if set(named) != {STATE_NAME} or not isinstance(metric, CheferSegmentation):
            raise InputFileError(f"metric state file {path}: method {method} holds {sorted(named)}, expected "
                                 f"one {STATE_NAME} ({CheferSegmentation.__name__}); rerun the benchmark into "
                                 "this folder to write it again")
        metrics[method] = metric
    return metrics
