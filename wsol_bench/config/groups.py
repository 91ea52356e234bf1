"""Schemas of the single-schema config groups: model, method entries, metric, faithfulness and
sweep. Defaults mirror the code that reads them; the YAML files give the values used."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING


@dataclass
class ModelConfig:
    """`load_model` arguments: a timm (or shipped) name, weights and timm keyword arguments.
    `checkpoint` has no default: a YAML's `???` (a preset that needs a file) only stays
    mandatory when the schema has none (merging `???` never replaces a value)."""

    name: str = MISSING
    pretrained: bool = False
    checkpoint: str | None = MISSING
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class MethodConfig:
    """One entry of `method`: a registered explainer and its constructor's keyword arguments
    (plugins define their own, so they are checked against the constructor at run time by
    `check_method_params`, not here)."""

    name: str = MISSING
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class MeasureConfig:
    """One entry of `measure`: a registered measure (a scorer of the `measure` group) and its
    settings, checked by the measure's own settings class before any model pass."""

    name: str = MISSING
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class MetricConfig:
    """AG-CAM pixel scores: thresholds, box rasterisation and which images count."""

    thresholds: list[float] = MISSING
    box_protocol: str = MISSING
    image_filter: str = MISSING


@dataclass
class FaithfulnessConfig:
    """Mirrors `wsol_bench.metrics.faithfulness.FaithfulnessSettings`, which checks the values.
    `baseline` is a number, a list of numbers or "blur": OmegaConf has no such union type."""

    mode: str = "abpc"
    steps: int = 11
    baseline: Any = 0.0
    integral: str | None = None
    batch_size: int | None = None
    amp: bool = False
    compile: bool = False
    blur_kernel_size: int = 11
    blur_sigma: float = 5.0


@dataclass
class CheferPerturbationConfig:
    """Mirrors `wsol_bench.metrics.chefer_perturbation.CheferSettings`, which checks the values."""

    mode: str = "chefer_perturbation"
    steps: list[float] = field(default_factory=lambda: [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9])
    test: str = "both"
    vis_class: str = "predicted"
    batch_size: int | None = None
    baseline: float = 0.0
    mean: list[float] | None = None
    std: list[float] | None = None


@dataclass
class RoadConfig:
    """Mirrors `wsol_bench.metrics.road.RoadSettings`, which checks the values."""

    mode: str = "road"
    percentiles: list[float] = field(default_factory=lambda: [10, 20, 30, 40, 50, 60, 70, 80, 90])
    order: str = "both"
    noise: float = 0.01
    seed: int = 0
    score: str = "softmax"
    batch_size: int | None = None
    solve_batch_size: int | None = None


@dataclass
class SacoConfig:
    """Mirrors `wsol_bench.metrics.saco.SacoSettings`, which checks the values. `baseline` is
    "mean", a number or a list of numbers: OmegaConf has no such union type."""

    mode: str = "saco"
    num_subsets: int = 10
    baseline: Any = "mean"
    class_source: str = "predicted"
    batch_size: int | None = None
    grouping: str = "pixel"
    patch_size: int | None = None


@dataclass
class SweepConfig:
    """The threshold sweep: numpy.arange(start, stop, step) or an explicit list, the IoU levels
    (percent) of MaxBoxAccV2, the box extraction, and the bootstrap replicates of the curve's
    intervals (0: none)."""

    start: float = MISSING
    stop: float = MISSING
    step: float = MISSING
    thresholds: list[float] | None = None
    iou_thresholds: list[int] = MISSING
    boxes: str = "opencv"
    resamples: int = 200


@dataclass
class SegmentationConfig:
    """Segmentation scores of the maps against the dataset's masks (docs/protocol.md 4.4):
    the protocol (`chefer`: Chefer et al.'s pixel accuracy, mIoU and mAP) and whether to write
    one row per image and method (segmentation_records.csv)."""

    protocol: str = "chefer"
    per_image: bool = True
