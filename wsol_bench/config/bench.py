"""Schema of the `wsol-bench` configuration (conf/config.yaml and the groups it selects)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING

from .datasets import DatasetConfig
from .groups import MetricConfig, ModelConfig


@dataclass
class StoreConfig:
    """The map store: where raw maps are cached and how many images a shard holds."""

    root: str = MISSING
    shard_size: int = MISSING
    dtype: str = "float32"


@dataclass
class InputConfig:
    """Preprocessing values that override the model's own (None: the model's)."""

    input_size: list[int] | None = None
    mean: list[float] | None = None
    std: list[float] | None = None
    interpolation: str | None = None


@dataclass
class PreprocessConfig(InputConfig):
    """The benchmark's preprocessing: also the resize mode and timm's crop fraction."""

    resize: str = MISSING
    crop_pct: float | None = None


@dataclass
class ReportConfig:
    """Confidence intervals of the tables (docs/protocol.md 7.1): the level (None: none), the
    number of bootstrap resamples and their seed; `BootstrapSettings` checks the values."""

    ci: float | None = 0.95
    resamples: int = 1000
    seed: int = 0


@dataclass
class BenchConfig:
    """Top level of `wsol-bench`. The optional groups (faithfulness, sweep, segmentation) are
    None when not selected and typed by the schema their YAML files list when selected: a None node typed
    with a dataclass breaks OmegaConf on an override below it (`sweep.step=0.1` without
    `sweep=grid`), an untyped one reports it. `progress` takes auto, true or false, so it is
    typed loosely and checked where it is read."""

    dataset: DatasetConfig = MISSING
    model: ModelConfig = MISSING
    # {key: MethodConfig}: untyped here because OmegaConf cannot add a typed entry from the command
    # line (`+method.agcam_mean={name:agcam,params:{head_fusion:mean}}`); `check_method_entries`
    # checks every entry against MethodConfig before any work instead
    method: dict[str, Any] = field(default_factory=dict)
    metric: MetricConfig = MISSING
    # {key: MeasureConfig}: the sanity, pointing, complexity and robustness measures; untyped for
    # the reason `method` is, each entry checked by its measure's settings class
    measure: dict[str, Any] = field(default_factory=dict)
    faithfulness: Any = None  # FaithfulnessConfig when selected
    sweep: Any = None         # SweepConfig when selected
    segmentation: Any = None  # SegmentationConfig when selected
    run_name: str = MISSING
    mode: str = MISSING
    check_images: bool = MISSING
    device: str = MISSING
    seed: int = MISSING
    batch_size: int = MISSING
    num_workers: int | None = None
    scoring_workers: int | None = None
    tf32: bool = MISSING
    target: str = MISSING
    progress: Any = MISSING
    verbose: bool = False  # other libraries' INFO log lines on the console too (timm, Hydra, torch)
    export_masks: bool = MISSING
    gallery_images: int = MISSING
    store: StoreConfig = field(default_factory=StoreConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
