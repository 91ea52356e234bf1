"""The scorer contract and its registry.

A scorer is fed every method's batches, computes its results once all images are in
(`compute`), and writes them into the run folder (`write`). Its model-free work is a `kernel`:
a picklable function of one method batch whose result the scorer takes with `add`, so the
work can run in a scoring worker process (`run.scoring_pool`); a scorer that needs the model
has no kernel and takes each batch in the main process (`update`). In a data-parallel run
every rank feeds its own scorers, then `gather` brings the ranks' results to rank 0, which
writes. Scorers register with
`@register_scorer(name)`; `from_config` returns None when the run's configuration does not ask
for the scorer, so the runner assembles the list of active scorers from the registry alone.

A scorer also owns its tables: `tables(run)` rebuilds, from the files it wrote into a finished
run folder alone, what it adds to the run's tables (per-method columns for `table.csv` and the
paper-layout tables, a sentence of their caption, notes, and whole tables of its own). The run
and `wsol-bench-report` both build every table by asking each registered scorer
(`wsol_bench.run.run_tables`), so a measure is one file: its scorer module.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import pandas as pd
from omegaconf import DictConfig
from torch import nn
from torch.utils.data import Dataset

from wsol_bench.errors import SettingError
from wsol_bench.files import append_csv_bodies
from wsol_bench.metrics.bootstrap import BootstrapSettings
from wsol_bench.registry import Registry
from wsol_bench.report.replicated import ReplicatedMeasure
from wsol_bench.report.run_folder import RunFolder
from wsol_bench.run.batch import MethodBatch
from wsol_bench.run.distributed import ONE_PROCESS, Ranks
from wsol_bench.run.store import MapStore

ENTRY_POINT_GROUP = "wsol_bench.measures"  # third-party measures: a Scorer subclass per entry point
SCORERS: Registry[type[Scorer]] = Registry(
    "scorer", group=ENTRY_POINT_GROUP, accepts=lambda obj: isinstance(obj, type) and issubclass(obj, Scorer))


@dataclass
class MeasureTables:
    """What one scorer adds to a finished run's tables, rebuilt from the run folder alone.

    `localization`: the per (method, threshold) table that `table.csv` holds (the records
    scorer's). `summary`: per-method columns (methods as the index), joined onto every row of
    `table.csv` and onto the paper-layout tables, in percent where they are scores, each count
    column named `n_images_<measure>`. `caption`: this scorer's sentence in the caption of the
    paper-layout tables (a dict: one per ground-truth variant, "box" or "mask"). `notes`: lines
    under those tables. `files`: whole tables of the scorer's own, written as `<name>.csv` and
    compared by `wsol-bench-report --check`. `per_image`: for each table column that averages
    per-image scores, those scores (columns image_id, method, value; NaN: not scored), from which
    the paired comparisons between methods are bootstrapped; `replicated`: the same for the
    dataset-level columns, as bootstrap replicates; `better`: which way each of those columns is
    better, for the rankings across measures."""

    localization: pd.DataFrame | None = None
    summary: pd.DataFrame | None = None
    caption: str | dict[str, str] = ""
    notes: list[str] = field(default_factory=list)
    files: dict[str, pd.DataFrame] = field(default_factory=dict)
    per_image: dict[str, pd.DataFrame] = field(default_factory=dict)
    # dataset-level table columns (MaxBoxAccV2, PxAP, the segmentation totals): each method's
    # value and its bootstrap replicates, for the paired comparisons and the rankings
    replicated: dict[str, ReplicatedMeasure] = field(default_factory=dict)
    # "higher" or "lower": which way is better, for the columns of `per_image` and `replicated`
    # that the rankings order methods by (a column absent here is not ranked)
    better: dict[str, str] = field(default_factory=dict)

    def caption_for(self, variant: str) -> str:
        """The caption sentence for the paper table of ground-truth `variant`."""
        return self.caption.get(variant, "") if isinstance(self.caption, dict) else self.caption


@dataclass
class RunContext:
    """What a scorer may need besides its own config: the dataset, where this rank writes, the
    run's methods, lazy access to the model, and the map stores: of the ground-truth class's
    maps and of the run's own maps (target policy `target`), per method."""

    out_dir: Path
    dataset: Dataset
    dataset_name: str
    split: str
    has_masks: bool
    class_names: list[str] | None
    model: Callable[[], nn.Module]
    label_stores: dict[str, MapStore]
    methods: list[str]
    ranks: Ranks = ONE_PROCESS
    target_stores: dict[str, MapStore] = field(default_factory=dict)
    # the run's explainer of a method key, built on first use; `explainers.on(model, key)` builds
    # the method's explainer on another model (a randomised copy)
    explainers: Any = None


class Scorer:
    """Base class of the scorers a run feeds."""

    name: ClassVar[str] = "scorer"
    # model-free work on one MethodBatch, picklable and without side effects on the scorer;
    # None for a scorer that needs the main process (it implements `update` instead)
    kernel: Callable[[MethodBatch], Any] | None = None

    @classmethod
    def from_config(cls, cfg: DictConfig, context: RunContext) -> Scorer | None:
        """The scorer for this run, or None when the configuration does not ask for it."""
        raise NotImplementedError

    @classmethod
    def wants_label_maps(cls, cfg: DictConfig) -> bool:
        """Whether a run with `cfg` must also explain the ground-truth class for this scorer
        (decided before the scorers are built: the map stores come first). No by default."""
        return False

    def update(self, mb: MethodBatch) -> None:
        """Take one method's batch in the main process (a scorer with a kernel: the kernel's
        result)."""
        if self.kernel is None:
            raise NotImplementedError
        self.add(mb.method, self.kernel(mb))

    def end_shard(self, shard_index: int) -> None:
        """Every image of shard `shard_index` has been fed (main-process scorers); nothing by default."""

    def add(self, method: str, part: Any) -> None:
        """Take what the kernel computed for one batch of `method`."""
        raise NotImplementedError

    def gather(self, ranks: Ranks, parts: list[Path]) -> None:
        """After every rank's pass (called on every rank, in the same scorer order): bring the
        other ranks' results to rank 0. `parts` are the ranks' output folders in rank order;
        the first is this scorer's own on rank 0. Nothing to do in a one-process run."""

    def close(self) -> None:
        """Release open files, also when the run fails; nothing by default."""

    def compute(self) -> Any:
        """The results, once every batch is in."""
        raise NotImplementedError

    def write(self, out_dir: Path) -> list[Path]:
        """Write the results into the run folder; returns the files written."""
        raise NotImplementedError

    @classmethod
    def tables(cls, run: RunFolder) -> MeasureTables | None:
        """What this scorer adds to the tables of the finished run `run`, from the files it
        wrote there alone; None when the folder has none of them (the run did not ask for it)."""
        return None


def report_bootstrap(cfg: DictConfig) -> BootstrapSettings | None:
    """The run's interval settings (`report.ci`, `report.resamples`, `report.seed`), or None
    when intervals are off: what a scorer needs to keep the bootstrap replicates of its
    dataset-level measures."""
    node = cfg.get("report")
    if node is None or node.get("ci") is None:
        return None
    return BootstrapSettings(level=float(node.ci), resamples=int(node.resamples), seed=int(node.seed))


def append_rank_rows(ranks: Ranks, parts: list[Path], name: str) -> None:
    """Rank 0 appends the rows of the other ranks' `name` CSV files to its own, in rank order (the
    order of the shards, so the file equals a one-process run's)."""
    if ranks.main and len(parts) > 1:
        append_csv_bodies(parts[0] / name, [part / name for part in parts[1:]])


def register_scorer(name: str) -> Callable[[type[Scorer]], type[Scorer]]:
    """Class decorator: make a Scorer subclass part of every run that asks for it, and of the
    tables of every run folder that holds its files."""
    return SCORERS.register(name)


def needs_label_maps(cfg: DictConfig) -> bool:
    """Whether any scorer the configuration asks for scores the ground-truth class's maps."""
    return any(cls.wants_label_maps(cfg) for _, cls in SCORERS.entries())


def build_scorers(cfg: DictConfig, context: RunContext) -> list[Scorer]:
    """Every registered scorer the configuration asks for, in registration order (plugins last).
    An entry of `measure` that names no registered measure is a SettingError listing them."""
    measures = sorted(name for name, cls in SCORERS.entries() if getattr(cls, "measure_group", False))
    for key, entry in (cfg.get("measure") or {}).items():
        if entry.name not in measures:
            raise SettingError(f"measure.{key}: unknown measure {entry.name!r}; valid: {', '.join(measures)}")
    scorers = [cls.from_config(cfg, context) for _, cls in SCORERS.entries()]
    return [s for s in scorers if s is not None]
