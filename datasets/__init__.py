"""Dataset families of wsol-bench (installed as wsol_bench.datasets)."""

from .base import Batch, EvalTransform, Sample, SkippedSample, collate_samples
from .registry import available, build_dataset

__all__ = ["Batch", "EvalTransform", "Sample", "SkippedSample", "available", "build_dataset", "collate_samples"]
