"""sweep.csv, wsoleval.csv and sweep.png (`sweep=grid`): the AG-CAM pixel scores at every
threshold of a grid, and wsolevaluation's MaxBoxAcc (v1, v2), GT-known / Top-1 Loc and, with
masks, PxAP (docs/protocol.md 4.2, 4.3). The metric states are kept in states/sweep.json, and
both tables are built from them (here and by `wsol-bench-report`, from the run folder alone);
with intervals on, the bootstrap replicates of MaxBoxAcc and PxAP are kept beside them
(states/sweep_replicates.npz), and those of every sweep.csv cell (states/sweep_curve_replicates.npz,
`sweep.resamples` of them; docs/protocol.md 7.1)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig

from wsol_bench.config.checks import check_sweep
from wsol_bench.errors import InputFileError
from wsol_bench.metrics.base import RunMetric, save_states
from wsol_bench.metrics.bootstrap import BootstrapSettings, bound_names
from wsol_bench.metrics.box_accuracy import BoxAccuracy, box_contributions, box_values
from wsol_bench.metrics.localization import metric_columns, region_scores
from wsol_bench.metrics.pxap import PxAP, pxap_values
from wsol_bench.metrics.replicate_sums import ReplicateSumsByMethod, load_replicate_sums, save_replicate_sums
from wsol_bench.metrics.sweep import (
    SweepMeans,
    curve_contributions,
    curve_width,
)
from wsol_bench.regions.contours import require_cv2
from wsol_bench.regions.engine import find_regions
from wsol_bench.regions.rasterize import wsoleval_gt_boxes
from wsol_bench.regions.thresholds import threshold_array
from wsol_bench.report.figures import plot_sweep
from wsol_bench.report.replicated import (
    ReplicatedMeasure,
    check_replicate_settings,
    interval_bounds,
    replicate_columns,
)
from wsol_bench.report.run_folder import RunFolder
from wsol_bench.report.sweep_tables import (
    BOX_STATE,
    PXAP_STATE,
    SWEEP_STATE,
    best_iou_bounds,
    curve_means,
    read_sweep_states,
    sweep_table,
    with_curve_bounds,
    wsoleval_table,
)
from wsol_bench.report.tables import WSOL_NAMES, require_columns, with_bounds_after
from wsol_bench.run.batch import MethodBatch
from wsol_bench.run.distributed import Ranks
from wsol_bench.run.scorers.base import MeasureTables, RunContext, Scorer, register_scorer, report_bootstrap

STATE_FILE = Path("states") / "sweep.json"
REPLICATE_FILE = Path("states") / "sweep_replicates.npz"  # the bootstrap replicates of MaxBoxAcc and PxAP
CURVE_FILE = Path("states") / "sweep_curve_replicates.npz"  # those of every sweep.csv cell
CURVE_STATE = "curve"
WSOLEVAL_FILE = "wsoleval.csv"
log = logging.getLogger("wsol_bench")


@dataclass
class SweepPart:
    """What the kernel computed for one batch of one method: the increments of the metric states
    (exact integer sums, so adding them up in any order gives the same totals) and, with
    intervals on, the batch's image ids and each image's bootstrap contributions per metric
    (`contributions`) and to the curve (`curve`; `metrics.sweep.curve_contributions`)."""

    states: dict[str, dict[str, torch.Tensor]]
    image_ids: list[str] = field(default_factory=list)
    contributions: dict[str, np.ndarray] = field(default_factory=dict)
    curve: np.ndarray | None = None


@dataclass
class SweepIncrements:
    """The kernel of `SweepScorer`: one batch of one method -> its `SweepPart`."""

    thresholds: tuple[float, ...]
    iou_thresholds: tuple[int, ...]
    boxes: str
    has_masks: bool
    box_protocol: str
    replicates: bool = False  # also each image's bootstrap contributions (report.ci set)
    curve_filter: str | None = None  # also each image's curve contributions, for this image filter
    _metrics: dict[str, RunMetric] | None = field(default=None, repr=False, compare=False)

    def fresh_metrics(self) -> dict[str, RunMetric]:
        """Empty metrics of these settings, by state name."""
        thresholds = list(self.thresholds)
        named = {SWEEP_STATE: SweepMeans(thresholds, metric_columns(self.has_masks)),
                 BOX_STATE: BoxAccuracy(thresholds, self.iou_thresholds, self.boxes)}
        if self.has_masks:
            named[PXAP_STATE] = PxAP(thresholds)
        return named

    def replicate_widths(self) -> dict[str, int]:
        """The width of each metric's bootstrap contributions (`box_contributions`, PxAP's
        histograms)."""
        levels = len(self.thresholds)
        widths = {BOX_STATE: 1 + (2 + len(self.iou_thresholds)) * levels}
        if self.has_masks:
            widths[PXAP_STATE] = 2 * (levels + 2)
        return widths

    def __call__(self, mb: MethodBatch) -> SweepPart:
        if self._metrics is None:  # built once per process, reset per batch
            self._metrics = self.fresh_metrics()
        metrics = self._metrics
        for metric in metrics.values():
            metric.reset()
        thresholds = list(self.thresholds)
        correct = (mb.predictions == mb.labels).numpy()
        components = find_regions(mb.heatmaps, thresholds, "components")
        scores = region_scores(components, mb.gt, self.box_protocol)
        metrics[SWEEP_STATE].update(scores, correct)
        regions = components if self.boxes == "components" else metrics[BOX_STATE].regions(mb.heatmaps)
        gt_boxes = [wsoleval_gt_boxes(s, tuple(mb.heatmaps.shape[-2:])) for s in mb.samples]
        hits = metrics[BOX_STATE].image_hits(regions, gt_boxes, correct)
        metrics[BOX_STATE].add_hits(hits)
        contributions = {BOX_STATE: box_contributions(hits, self.iou_thresholds)} if self.replicates else {}
        if PXAP_STATE in metrics and mb.gt.seg_masks is not None:
            histograms = metrics[PXAP_STATE].image_histograms(mb.heatmaps, mb.gt.seg_masks, mb.gt.seg_valid)
            metrics[PXAP_STATE].add_histograms(histograms)
            if self.replicates:
                contributions[PXAP_STATE] = histograms.reshape(len(histograms), -1)
        curve = None
        if self.curve_filter is not None:
            keep = np.ones_like(correct, dtype=bool) if self.curve_filter == "all" else correct.astype(bool)
            curve = curve_contributions(scores, keep, metrics[SWEEP_STATE].columns)
        states = {name: {state: value.clone() for state, value in metric.metric_state.items()}
                  for name, metric in metrics.items()}
        ids = [s.image_id for s in mb.samples] if self.replicates or curve is not None else []
        return SweepPart(states, ids, contributions, curve)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_metrics": None}  # workers build their own


@register_scorer("sweep")
class SweepScorer(Scorer):
    """Threshold sweep of one run, per method: `SweepMeans` of the AG-CAM scores of the
    float components, `BoxAccuracy` of the regions of `boxes` ("opencv": wsolevaluation's own
    contours; "components": the same float components, found once for both), and `PxAP`."""

    def __init__(self, thresholds, iou_thresholds, *, box_protocol: str, image_filter: str, has_masks: bool,
                 dataset_name: str, split: str, boxes: str = "opencv", methods: list[str] = (),
                 bootstrap: BootstrapSettings | None = None, curve_resamples: int = 0) -> None:
        threshold_array(thresholds, np.float64)  # names the problem with a bad grid
        self.thresholds = [float(t) for t in thresholds]
        self.iou_thresholds = tuple(int(d) for d in iou_thresholds)
        self.boxes = boxes
        BoxAccuracy(self.thresholds, self.iou_thresholds, boxes)  # names a bad setting before any work
        if boxes == "opencv":
            require_cv2()  # a missing OpenCV is named now, not after the explanation pass
        self.image_filter, self.has_masks = image_filter, has_masks
        self.dataset_name, self.split = dataset_name, split
        intervals = bootstrap is not None and bootstrap.level is not None
        curve = intervals and curve_resamples > 0
        self.kernel = SweepIncrements(tuple(self.thresholds), self.iou_thresholds, boxes, has_masks, box_protocol,
                                      replicates=intervals, curve_filter=image_filter if curve else None)
        self.metrics: dict[str, dict[str, RunMetric]] = {}
        self.replicates = ReplicateSumsByMethod(self.kernel.replicate_widths(), bootstrap, methods) \
            if intervals else None
        # the curve's replicates: the first `curve_resamples` of the tables' (same seed, same draws)
        width = curve_width(len(self.thresholds), metric_columns(has_masks))
        self.curve = ReplicateSumsByMethod({CURVE_STATE: width}, BootstrapSettings(
            bootstrap.level, curve_resamples, bootstrap.seed), methods) if curve else None
        for method in methods:  # every rank holds every method's metrics, so they reduce in step
            self._metrics(method)

    @classmethod
    def from_config(cls, cfg: DictConfig, context: RunContext) -> SweepScorer | None:
        if not cfg.sweep:
            return None
        return cls(check_sweep(cfg.sweep), cfg.sweep.iou_thresholds, box_protocol=cfg.metric.box_protocol,
                   image_filter=cfg.metric.image_filter, has_masks=context.has_masks,
                   dataset_name=context.dataset_name, split=context.split, boxes=cfg.sweep.boxes,
                   methods=list(context.methods), bootstrap=report_bootstrap(cfg),
                   curve_resamples=int(cfg.sweep.get("resamples", 0)))

    def _metrics(self, method: str) -> dict[str, RunMetric]:
        if method not in self.metrics:
            self.metrics[method] = self.kernel.fresh_metrics()
        return self.metrics[method]

    def add(self, method: str, part: SweepPart) -> None:
        metrics = self._metrics(method)
        for name, state in part.states.items():
            metrics[name].merge_state(state)
        if self.replicates is not None:
            self.replicates.add(method, part.image_ids, part.contributions)
        if self.curve is not None and part.curve is not None:
            self.curve.add(method, part.image_ids, {CURVE_STATE: part.curve})

    def gather(self, ranks: Ranks, parts: list[Path]) -> None:
        """Sum every rank's states (torchmetrics' gather and reduction), method by method in the
        run's order, so every rank takes part in the same collectives."""
        if ranks.distributed:
            for method in self.metrics:
                for metric in self.metrics[method].values():
                    metric.sync_ranks()
            if self.replicates is not None:
                self.replicates.sync_ranks()
            if self.curve is not None:
                self.curve.sync_ranks()

    def compute(self) -> dict:
        """{"sweep": sweep.csv's table, "wsoleval": wsoleval.csv's table}."""
        return {"sweep": sweep_table(self.metrics, self.image_filter),
                "wsoleval": wsoleval_table(self.metrics, self.image_filter, dataset=self.dataset_name,
                                           split=self.split)}

    def write(self, out_dir: Path) -> list[Path]:
        """The metric states (states/sweep.json) and sweep.png; sweep.csv and wsoleval.csv are
        built from the states with the run's other tables (`tables`)."""
        (out_dir / STATE_FILE).parent.mkdir(parents=True, exist_ok=True)
        paths = [save_states(out_dir / STATE_FILE, self.metrics)]
        if self.replicates is not None:
            paths.append(save_replicate_sums(out_dir / REPLICATE_FILE, self.replicates.sums))
        if self.curve is not None:
            paths.append(save_replicate_sums(out_dir / CURVE_FILE, self.curve.sums))
        sweep = self.compute()["sweep"]
        if self.curve is not None:  # the figure's bands
            totals = {method: named[CURVE_STATE].totals() for method, named in self.curve.sums.items()}
            sweep = with_curve_bounds(sweep, curve_means(totals, self.metrics), self.curve.settings.level)
        if len(sweep):
            plot_sweep(sweep, out_dir / "sweep.png", states=self.metrics,
                       level=self.curve.settings.level if self.curve is not None else None)
            paths.append(out_dir / "sweep.png")
        else:
            log.warning("sweep: no image passes metric.image_filter=%s; sweep.csv is empty (try "
                        "metric.image_filter=all)", self.image_filter)
        return paths

    @classmethod
    def tables(cls, run: RunFolder) -> MeasureTables | None:
        """sweep.csv's and wsoleval.csv's tables rebuilt from the metric states, with the
        bootstrap interval of every wsoleval value where the run kept its replicates, and
        MaxBoxAccV2 (and PxAP) per method for the paper tables. A folder written before the
        states existed keeps only wsoleval.csv, which is read as it is."""
        states_file = run.path / STATE_FILE
        files, replicates = {}, {}
        if states_file.is_file():
            image_filter = run.setting("metric.image_filter", "correct")
            states = read_sweep_states(states_file)
            wsoleval = wsoleval_table(states, image_filter, dataset=str(run.setting("dataset.name")),
                                      split=str(run.setting("dataset.split")))
            sweep = sweep_table(states, image_filter)
            if run.bootstrap.level is not None and (run.path / REPLICATE_FILE).is_file():
                replicates = sweep_replicates(run, states)
                bounds = interval_bounds(replicates, run.bootstrap.level)
                wsoleval = with_bounds_after(wsoleval.set_index("method"), bounds).reset_index()
            if run.bootstrap.level is not None and (run.path / CURVE_FILE).is_file():
                means = curve_replicates(run, states)
                sweep = with_curve_bounds(sweep, means, run.bootstrap.level)
                best = best_iou_bounds(means, run.bootstrap.level)
                wsoleval = with_bounds_after(wsoleval.set_index("method"), best).reset_index()
            files = {"sweep": sweep, "wsoleval": wsoleval}
        else:
            wsoleval = run.table_file(WSOLEVAL_FILE)
            if wsoleval is None:
                return None
        summary = wsoleval_summary(wsoleval, str(run.path / WSOLEVAL_FILE))
        replicated = {name: ReplicatedMeasure(summary[name], replicates[column], summary["n_images_wsol"])
                      for column, name in WSOL_NAMES.items() if column in replicates and name in summary}
        better = {name: "higher" for name in WSOL_NAMES.values() if name in summary}
        return MeasureTables(summary=summary, caption=caption(wsoleval), files=files, replicated=replicated,
                             better=better)


def sweep_replicates(run: RunFolder, states: dict[str, dict[str, RunMetric]]) -> dict[str, pd.DataFrame]:
    """{wsoleval column: replicates x methods} of MaxBoxAcc (v1, v2, per IoU), Top-1 and
    GT-known Loc, and PxAP, from the run's replicate states."""
    path = run.path / REPLICATE_FILE
    sums = load_replicate_sums(path)
    check_replicate_settings(sums, run.bootstrap, path)
    iou_thresholds = next(iter(states.values()))[BOX_STATE].iou_thresholds
    columns = replicate_columns(sums, BOX_STATE, lambda totals: box_values(totals, iou_thresholds))
    pxap = replicate_columns(sums, PXAP_STATE, lambda totals: {"pxap": pxap_values(*np.split(totals, 2, axis=1))})
    return columns | pxap


def curve_replicates(run: RunFolder, states: dict[str, dict[str, RunMetric]]) -> dict[str, dict[str, np.ndarray]]:
    """{method: {sweep.csv column: replicate means [R, T]}} from the run's curve replicate
    states, drawn as its settings say (`sweep.resamples`, `report.seed`)."""
    path = run.path / CURVE_FILE
    sums = load_replicate_sums(path)
    resamples = int(run.setting("sweep.resamples", 0))
    if resamples < 2:
        raise InputFileError(f"{path} holds curve replicates, but the run's config.yaml says sweep.resamples="
                             f"{resamples}; restore config.yaml, or rerun the benchmark into this folder")
    settings = BootstrapSettings(run.bootstrap.level, resamples, run.bootstrap.seed)
    check_replicate_settings(sums, settings, path, resamples_key="sweep.resamples")
    unknown = sorted(set(sums) - set(states))
    if unknown or any(CURVE_STATE not in named for named in sums.values()):
        raise InputFileError(f"{path} holds curve replicates of methods {unknown or sorted(sums)} that "
                             f"{STATE_FILE} does not match; rerun the benchmark into this folder")
    try:
        return curve_means({method: named[CURVE_STATE].totals() for method, named in sums.items()}, states)
    except ValueError as exc:
        raise InputFileError(f"{path}: {exc}; rerun the benchmark into this folder") from exc


def caption(wsoleval: pd.DataFrame) -> str:
    """The paper tables' sentence on MaxBoxAccV2 and PxAP: which boxes they were measured on."""
    # wsoleval.csv files written before the OpenCV mode have no `boxes` column: float components
    boxes = ", ".join(sorted(set(wsoleval.get("boxes", [])))) or "components"
    source = ("its own OpenCV contours" if boxes == "opencv"
              else f"the float variant sweep.boxes={boxes}, not the published procedure")
    return f"MaxBoxAccV2 (and PxAP): wsolevaluation, boxes from {source}, percent (n_images_wsol)."


def wsoleval_summary(wsoleval: pd.DataFrame, source: str = WSOLEVAL_FILE) -> pd.DataFrame:
    """Per method: MaxBoxAccV2 and, where the dataset has masks (not NaN), PxAP, as written
    (percent) with their interval bounds where the table has them, and the number of images
    (`n_images_wsol`)."""
    require_columns(wsoleval, ["method", "n_images", "maxboxacc_v2"], source)
    if wsoleval["method"].duplicated().any():
        repeated = sorted(set(wsoleval.loc[wsoleval["method"].duplicated(), "method"]))
        raise InputFileError(f"{source}: methods {repeated} appear more than once; it must hold one row "
                             "per method")
    summary = wsoleval.set_index("method")
    columns = ["maxboxacc_v2"] + (["pxap"] if "pxap" in summary and summary["pxap"].notna().any() else [])
    columns = [name for column in columns for name in (column, *bound_names(column)) if name in summary]
    renamed = {bound: new for column, name in WSOL_NAMES.items()
               for bound, new in zip((column, *bound_names(column)), (name, *bound_names(name)))}
    out = summary[columns].astype(float).rename(columns=renamed)
    out["n_images_wsol"] = summary["n_images"]
    return out
