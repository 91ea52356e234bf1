"""The scorers a run feeds, one file each; importing this package registers them (in this
order, which is the order they are fed and write their files)."""

from . import records, faithfulness, masks, sweep, segmentation  # noqa: F401, I001  (registration, in this order)
from .base import SCORERS, RunContext, Scorer, build_scorers, register_scorer

__all__ = ["SCORERS", "RunContext", "Scorer", "build_scorers", "register_scorer"]
