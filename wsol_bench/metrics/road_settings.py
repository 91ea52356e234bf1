"""The settings of a ROAD run (docs/protocol.md 5): which percentiles and curves, the noise,
the score, and the chunk sizes of the solves and of the perturbed passes, checked once."""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass

from wsol_bench.errors import SettingError

ORDERS = {"both": ("lerf", "morf"), "morf": ("morf",), "lerf": ("lerf",)}  # library order: LeRF first
SCORES = ("softmax", "logit")
DEFAULT_PERCENTILES = (10, 20, 30, 40, 50, 60, 70, 80, 90)  # ROADCombined's default
# Grid systems factored together (each holds one to a few disjoint inputs, see road.py). On
# CPU small stacks win: each solver thread factors its own stack single-threaded, and the
# fronts of a few 224 x 224 systems (~45 MB each in float32) stay nearer the caches; 2 to 10
# measured alike within the load's noise. Accelerators want large batches.
SOLVE_BATCH_SIZE = {"cpu": 6}
ACCELERATOR_SOLVE_BATCH_SIZE = 256


@dataclass(frozen=True)
class RoadSettings:
    """How ROAD removes, imputes and scores.

    percentiles: the library's percentile list (numbers in (0, 100)); at p, MoRF and LeRF
    both remove about 100 - p % of the pixels (most / least relevant ones). order: "both",
    "morf" or "lerf". noise: standard deviation of the Gaussian noise added to imputed pixels
    (in the normalised input). seed: the noise seed of every image unless `road_scores` gets
    per-image seeds. score: "softmax" or "logit". batch_size: perturbed images per forward
    pass; solve_batch_size: grid systems (each one to a few inputs) solved together (None: the
    device's default; neither changes the numbers beyond the float rounding of the model).
    """

    percentiles: tuple[float, ...] = DEFAULT_PERCENTILES
    order: str = "both"
    noise: float = 0.01
    seed: int = 0
    score: str = "softmax"
    batch_size: int | None = None
    solve_batch_size: int | None = None

    def __post_init__(self) -> None:
        values = tuple(self.percentiles) if isinstance(self.percentiles, Sequence) else (self.percentiles,)
        if not values or any(isinstance(p, bool) or not isinstance(p, numbers.Real) for p in values):
            raise SettingError(f"faithfulness.percentiles must be a list of numbers, got {self.percentiles!r}")
        # Python numbers: numpy evaluates np.percentile differently for numpy-typed percentiles
        values = tuple(int(p) if isinstance(p, numbers.Integral) else float(p) for p in values)
        if not all(0 < p < 100 for p in values):
            raise SettingError(f"faithfulness.percentiles must lie strictly between 0 and 100 (0 removes "
                               f"every pixel), got {list(values)}")
        if len(set(values)) != len(values):
            raise SettingError(f"faithfulness.percentiles has repeated values: {list(values)}")
        object.__setattr__(self, "percentiles", values)
        if self.order not in ORDERS:
            raise SettingError(f"faithfulness.order {self.order!r} is unknown; valid: {', '.join(ORDERS)}")
        if self.score not in SCORES:
            raise SettingError(f"faithfulness.score {self.score!r} is unknown; valid: {', '.join(SCORES)}")
        if not (isinstance(self.noise, int | float) and math.isfinite(self.noise) and self.noise >= 0):
            raise SettingError(f"faithfulness.noise must be a finite number >= 0, got {self.noise!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise SettingError(f"faithfulness.seed must be a non-negative integer, got {self.seed!r}")
        for key in ("batch_size", "solve_batch_size"):
            value = getattr(self, key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise SettingError(f"faithfulness.{key} must be a positive integer or null, got {value!r}")

    @property
    def curves(self) -> tuple[str, ...]:
        """The curves computed, in the library's order of noise draws."""
        return ORDERS[self.order]
