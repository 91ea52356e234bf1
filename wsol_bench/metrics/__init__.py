"""Metrics: pure per-image scores (one value per image) and the dataset-level metrics with
mergeable sum states (importing this package registers them, so saved states can be read)."""

from . import box_accuracy, pxap, replicate_sums, segmentation, sweep  # noqa: F401  (registers the RunMetric classes)
from .pixel import PIXEL_METRICS, confusion_counts, pixel_scores

__all__ = ["PIXEL_METRICS", "confusion_counts", "pixel_scores"]
