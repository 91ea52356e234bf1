"""Explainers of wsol-bench (installed as wsol_bench.methods): one file per method."""

# Importing the modules registers the built-in methods.
from . import agcam, baselines, generic_attention, gradcam, rollout, transformer_attribution  # noqa: F401
from .base import Explainer, Explanation, target_score
from .registry import available, get_explainer, register_explainer

__all__ = ["Explainer", "Explanation", "available", "get_explainer", "register_explainer",
           "target_score"]
