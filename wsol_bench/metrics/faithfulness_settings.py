"""The settings of a pixel-perturbation run (docs/protocol.md 5): which curves, how many steps,
the baseline, the integral, and the chunk size of the perturbed passes, checked once."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from wsol_bench.choices import FAITHFULNESS_INTEGRALS, FAITHFULNESS_MODES
from wsol_bench.errors import SettingError

MODES, INTEGRALS = FAITHFULNESS_MODES, FAITHFULNESS_INTEGRALS  # faithfulness.mode, faithfulness.integral
CURVES = {"abpc": ("morf", "lerf"), "deletion": ("deletion",), "insertion": ("insertion",)}
DEFAULT_INTEGRAL = {"abpc": "mean", "deletion": "trapezoid", "insertion": "trapezoid"}


@dataclass(frozen=True)
class FaithfulnessSettings:
    """How perturbation curves are built and integrated.

    mode: "abpc" (MoRF and LeRF curves), "deletion" or "insertion". steps: number of points
    per curve, fractions 0, 1/(steps-1), ..., 1. baseline: a constant in the normalised
    input, one constant per channel, or "blur". integral: "mean" or "trapezoid"; None picks
    the protocol default (mean for abpc, trapezoid for deletion/insertion). batch_size:
    perturbed images per forward pass; None picks `default_batch_size` of the model's device
    (the chunk size changes speed only, not the numbers). amp: run the perturbed passes under
    torch.autocast. compile: run them through `torch.compile` (every chunk padded to the full
    chunk size, so one graph serves the run; float rounding may differ from eager mode).
    """

    mode: str = "abpc"
    steps: int = 11
    baseline: float | tuple[float, ...] | str = 0.0
    integral: str | None = None
    batch_size: int | None = None
    amp: bool = False
    compile: bool = False
    blur_kernel_size: int = 11
    blur_sigma: float = 5.0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise SettingError(f"faithfulness mode {self.mode!r} is unknown; valid: {', '.join(MODES)}")
        if int(self.steps) != self.steps or self.steps < 2:
            raise SettingError(f"faithfulness steps must be an integer >= 2 (fractions 0..1), got "
                               f"{self.steps}")
        if self.integral is not None and self.integral not in INTEGRALS:
            raise SettingError(f"faithfulness integral {self.integral!r} is unknown; "
                               f"valid: {', '.join(INTEGRALS)}")
        if self.batch_size is not None and (int(self.batch_size) != self.batch_size or self.batch_size < 1):
            raise SettingError(f"faithfulness batch_size must be a positive integer, got {self.batch_size}")
        if self.blur_kernel_size < 1 or self.blur_kernel_size % 2 == 0 or self.blur_sigma <= 0:
            raise SettingError("faithfulness blur_kernel_size must be odd and positive and blur_sigma "
                               f"positive, got {self.blur_kernel_size} and {self.blur_sigma}")
        baseline = self.baseline
        if isinstance(baseline, str):
            if baseline != "blur":
                raise SettingError(f"faithfulness baseline {baseline!r} is unknown; give a number (value "
                                   "in the normalised input), one number per channel, or 'blur'")
        else:
            values = tuple(float(v) for v in baseline) if isinstance(baseline, Sequence) \
                else (float(baseline),)
            if not values or not all(math.isfinite(v) for v in values):
                raise SettingError(f"faithfulness baseline must be finite numbers, got {baseline!r}")
            object.__setattr__(self, "baseline", values[0] if len(values) == 1 else values)

    @property
    def curves(self) -> tuple[str, ...]:
        """Names of the curves this mode produces."""
        return CURVES[self.mode]

    @property
    def area_rule(self) -> str:
        """The integral in effect (the explicit choice, else the mode's default)."""
        return self.integral or DEFAULT_INTEGRAL[self.mode]

    @property
    def blurred(self) -> bool:
        """True for the blur baseline (its fully removed input differs per image)."""
        return self.baseline == "blur"


# Perturbed images per forward pass when `batch_size` is None. On CPU, small chunks win: the
# activations of 32 or more 197-token images fall out of cache (ViT-S/16 on 2 cores: 1.7x the
# batch-1 reference at 8 and 16, 1.3x at 32 and 64). Accelerators want large batches.
DEFAULT_BATCH_SIZE = {"cpu": 16}
ACCELERATOR_BATCH_SIZE = 256


def default_batch_size(device: torch.device) -> int:
    """Perturbed images per forward pass on `device` when the settings leave it open."""
    return DEFAULT_BATCH_SIZE.get(torch.device(device).type, ACCELERATOR_BATCH_SIZE)
