"""Metrics: pure functions on tensors returning one value per image."""

from .pixel import PIXEL_METRICS, confusion_counts, pixel_scores

__all__ = ["PIXEL_METRICS", "confusion_counts", "pixel_scores"]
