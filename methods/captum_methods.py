"""Captum attributions as explainers: Integrated Gradients, Saliency, Input x Gradient,
SmoothGrad, GradientShap (pixel maps [B, H, W]) and patch Occlusion and Feature Ablation
(patch-grid maps [B, gh, gw]), on any timm ViT, a whole batch per call.

Captum is optional (`pip install "wsol-bench[explainers]"`): it is imported when a method is
built, so the suite imports without it. Every attribution explains the target *logit* (the
model's output, no softmax). Baselines and noise are in the normalised input, where 0.0 is
the channel mean. Pixel maps reduce captum's [B, 3, H, W] attributions over the channels with
`reduce`: "sum" (signed; the completeness-preserving sum, as Captum's tutorials visualise
IG), "abs_sum" (sum of |a_c|) or "l2" (sqrt(sum_c a_c^2)).

Noise (smoothgrad, gradient_shap) is drawn by captum per batch, from torch's global generator
(and NumPy's, for gradient_shap's baseline choices and interpolation points), seeded with
`seed` just before the draws and restored afterwards: the same call gives the same maps, but
an image's noise depends on its batch (its position and neighbours), so batched and one at a
time agree only in expectation (exactly when the noise is off).
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F

from wsol_bench.errors import SettingError

from .base import Explainer, require_library
from .registry import register_explainer

REDUCTIONS = ("sum", "abs_sum", "l2")


def reduce_channels(attributions: torch.Tensor, reduce: str) -> torch.Tensor:
    """[B, C, H, W] -> [B, H, W]: "sum", "abs_sum" or "l2" over the channels."""
    if reduce == "sum":
        return attributions.sum(1)
    if reduce == "abs_sum":
        return attributions.abs().sum(1)
    if reduce == "l2":
        return attributions.pow(2).sum(1).sqrt()
    raise SettingError(f"reduce={reduce!r}; valid: {REDUCTIONS}")


# -- parameter checks: one line naming the method and the parameter ---------------------------
def _integer(method: str, key: str, value, low: int, *, optional: bool = False) -> int | None:
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        extra = " or null" if optional else ""
        raise SettingError(f"{method}: {key}={value!r} must be an integer of at least {low}{extra}")
    return int(value)


def _number(method: str, key: str, value, *, low: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or (low is not None and value < low):
        bound = f" >= {low}" if low is not None else ""
        raise SettingError(f"{method}: {key}={value!r} must be a finite number{bound}")
    return float(value)


def _reduce(method: str, value) -> str:
    if value not in REDUCTIONS:
        raise SettingError(f"{method}: reduce={value!r}; valid: {', '.join(REDUCTIONS)}")
    return value


@contextmanager
def seeded(seed: int, device: torch.device):
    """Seed torch's CPU generator (and the CUDA ones when `device` is a GPU) and NumPy's global
    generator, restoring all of them on exit so a run's other random draws are untouched."""
    cuda = [*range(torch.cuda.device_count())] if device.type == "cuda" else []
    state = np.random.get_state()
    try:
        with torch.random.fork_rng(devices=cuda):
            torch.manual_seed(seed)
            np.random.seed(seed)
            yield
    finally:
        np.random.set_state(state)


class CaptumExplainer(Explainer):
    """Shared plumbing: the lazy captum import, the plain logits pass, and the call into
    captum with gradients on (the runner may call under no_grad; the model's weights may be
    frozen: gradients flow to a detached copy of the input that requires grad)."""

    library = "captum"
    needs_class_token = False
    resolution = "pixel"
    captum_class = ""  # the class in captum.attr
    input_grad = True  # gradient methods: hand captum an input that requires grad

    def _setup(self, reduce: str | None = None) -> None:
        """Check `reduce` (pixel methods), then import captum and build the attribution."""
        if self.resolution == "pixel":
            self.reduce = _reduce(self.name, reduce)
        self.captum = require_library("captum.attr", self.name)
        self.attribution = getattr(self.captum, self.captum_class)(self.model)

    def explain(self, images, targets):
        with torch.no_grad():
            logits = self.model(images)
        used = self.resolve_targets(logits, targets)
        with torch.enable_grad():
            # a detached copy: captum's gradient methods need a leaf that requires grad (and would
            # set it, with a warning, on the caller's tensor)
            attributions = self.attribute(images.detach().requires_grad_(self.input_grad), used)
        return self.to_map(attributions.detach().float(), images), logits, used

    def attribute(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def to_map(self, attributions: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        return reduce_channels(attributions, self.reduce)

    def patch_size(self, images: torch.Tensor) -> tuple[int, int]:
        """Pixels per patch for these inputs: input size / patch grid (a hybrid stem's
        `patch_embed.patch_size` counts feature-map cells, not pixels)."""
        (height, width), (gh, gw) = images.shape[-2:], self.grid
        if height % gh or width % gw:
            raise SettingError(f"{self.name}: {height}x{width} inputs do not split into the model's "
                               f"{gh}x{gw} patch grid")
        return height // gh, width // gw


@register_explainer("ig")
class IntegratedGradients(CaptumExplainer):
    """Integrated Gradients (Sundararajan et al., 2017) from a constant `baseline` (0.0: the
    channel mean) with captum's default Gauss-Legendre rule over `steps` points.
    internal_batch_size: images per forward+backward (default 64, which bounds memory whatever
    the batch; null: all B * steps at once). reduce="sum" by default: IG's attributions
    are signed contributions that sum to f(x) - f(baseline), and the channel sum keeps that,
    as Captum's tutorials visualise IG."""

    captum_class = "IntegratedGradients"
    passes_per_image = "1 forward + steps (forward+backward)"

    def __init__(self, model, steps: int = 50, baseline: float = 0.0, internal_batch_size: int | None = 64,
                 reduce: str = "sum") -> None:
        super().__init__(model)
        self.steps = _integer(self.name, "steps", steps, 1)
        self.baseline = _number(self.name, "baseline", baseline)
        self.internal_batch_size = _integer(self.name, "internal_batch_size", internal_batch_size, 1,
                                            optional=True)
        self._setup(reduce)

    def attribute(self, inputs, targets):
        return self.attribution.attribute(inputs, baselines=self.baseline, target=targets, n_steps=self.steps,
                                          internal_batch_size=self.internal_batch_size)


@register_explainer("saliency")
class Saliency(CaptumExplainer):
    """Saliency (Simonyan et al., 2014): |d logit / d input|, one backward. reduce="abs_sum" by
    default (the gradient is already absolute: the sum of its channels' magnitudes)."""

    captum_class = "Saliency"
    passes_per_image = "1 forward + 1 (forward+backward)"

    def __init__(self, model, reduce: str = "abs_sum") -> None:
        super().__init__(model)
        self._setup(reduce)

    def attribute(self, inputs, targets):
        return self.attribution.attribute(inputs, target=targets, abs=True)


@register_explainer("input_x_gradient")
class InputXGradient(CaptumExplainer):
    """Input x Gradient (Shrikumar et al., 2016): x * d logit / dx, signed. reduce="sum" by
    default, as IG (it is IG's first-order relative with a zero baseline)."""

    captum_class = "InputXGradient"
    passes_per_image = "1 forward + 1 (forward+backward)"

    def __init__(self, model, reduce: str = "sum") -> None:
        super().__init__(model)
        self._setup(reduce)

    def attribute(self, inputs, targets):
        return self.attribution.attribute(inputs, target=targets)


@register_explainer("smoothgrad")
class SmoothGrad(CaptumExplainer):
    """SmoothGrad (Smilkov et al., 2017): captum's NoiseTunnel over Saliency, the mean of
    |gradient| over `samples` copies of the image with Gaussian noise of std `stdev` (absolute,
    in the normalised input: 0.15 is about 3 % of an ImageNet-normalised image's range).
    Seeded with `seed` (torch's generator) before the draws; noise is drawn per batch (module
    docstring). samples_per_pass: noisy copies of each image per forward+backward (null: all
    of them). reduce="abs_sum" by default, as saliency."""

    captum_class = "Saliency"
    passes_per_image = "1 forward + samples (forward+backward)"

    def __init__(self, model, samples: int = 16, stdev: float = 0.15, seed: int = 0,
                 samples_per_pass: int | None = None, reduce: str = "abs_sum") -> None:
        super().__init__(model)
        self.samples = _integer(self.name, "samples", samples, 1)
        self.stdev = _number(self.name, "stdev", stdev, low=0.0)
        self.seed = _integer(self.name, "seed", seed, 0)
        self.samples_per_pass = _integer(self.name, "samples_per_pass", samples_per_pass, 1, optional=True)
        self._setup(reduce)
        self.tunnel = self.captum.NoiseTunnel(self.attribution)

    def attribute(self, inputs, targets):
        with seeded(self.seed, inputs.device):
            return self.tunnel.attribute(inputs, nt_type="smoothgrad", nt_samples=self.samples,
                                         nt_samples_batch_size=self.samples_per_pass, stdevs=self.stdev,
                                         target=targets, abs=True)


@register_explainer("gradient_shap")
class GradientShap(CaptumExplainer):
    """GradientShap (Lundberg & Lee, 2017; captum): expected gradients x (input - baseline) over
    `samples` draws of a baseline, a point on the line to it, and input noise of std `stdev`.

    Baseline distribution (no data at hand, so none from the data): the constant `baseline`
    image (0.0, the channel mean, as IG), plus `random_baselines` Gaussian images of mean
    `baseline` and std 1 (the normalised data's per-channel std: images with the data's first
    two moments and no structure), drawn from a generator seeded with `seed` and the input
    size, so they are the same for every batch. random_baselines=0 keeps only the constant
    (GradientShap is then a Monte-Carlo IG). Captum's draws (baseline choice and interpolation
    points from NumPy, noise from torch) are seeded with `seed` per batch (module docstring).
    All B * samples points go through one forward+backward (captum's GradientShap has no
    chunking option). reduce="sum" by default, as IG (signed contributions)."""

    captum_class = "GradientShap"
    passes_per_image = "1 forward + samples (forward+backward)"

    def __init__(self, model, samples: int = 16, stdev: float = 0.0, baseline: float = 0.0,
                 random_baselines: int = 3, seed: int = 0, reduce: str = "sum") -> None:
        super().__init__(model)
        self.samples = _integer(self.name, "samples", samples, 1)
        self.stdev = _number(self.name, "stdev", stdev, low=0.0)
        self.baseline = _number(self.name, "baseline", baseline)
        self.random_baselines = _integer(self.name, "random_baselines", random_baselines, 0)
        self.seed = _integer(self.name, "seed", seed, 0)
        self._setup(reduce)

    def baselines(self, inputs: torch.Tensor) -> torch.Tensor:
        """[1 + random_baselines, C, H, W]: the constant baseline, then the Gaussian ones."""
        gen = torch.Generator().manual_seed(self.seed)
        noise = torch.randn(self.random_baselines, *inputs.shape[1:], generator=gen)
        base = torch.cat([torch.zeros(1, *inputs.shape[1:]), noise]) + self.baseline
        return base.to(inputs.device, inputs.dtype)

    def attribute(self, inputs, targets):
        baselines = self.baselines(inputs)
        with seeded(self.seed, inputs.device):
            return self.attribution.attribute(inputs, baselines=baselines, n_samples=self.samples,
                                              stdevs=self.stdev, target=targets)


class PatchPerturbation(CaptumExplainer):
    """Perturbation methods: a patch-grid map, and captum's perturbations batched (each forward
    holds B * perturbations_per_eval images)."""

    resolution = "grid"
    input_grad = False

    def _check_common(self, baseline, perturbations_per_eval) -> None:
        self.baseline = _number(self.name, "baseline", baseline)
        self.perturbations_per_eval = _integer(self.name, "perturbations_per_eval", perturbations_per_eval, 1)


@register_explainer("occlusion")
class Occlusion(PatchPerturbation):
    """Occlusion (Zeiler & Fergus, 2014): f(x) - f(x with a window set to `baseline`) for the
    target logit, the window sliding over all channels. window and stride are in pixels (null:
    the model's patch, input size / patch grid, read per batch), so by default each patch is
    occluded once and every pixel of a patch gets the same value.

    Resolution "grid": the map is the mean of captum's pixel attribution over each patch's
    pixels, which at the defaults is exactly that patch's occlusion score; a smaller window or
    stride gives overlapping windows whose pixel averages are pooled the same way."""

    captum_class = "Occlusion"
    passes_per_image = ("2 forwards + one per window position, ((H-window)/stride+1)*((W-window)/stride+1): "
                        "gh*gw + 2 at the defaults")

    def __init__(self, model, window: int | None = None, stride: int | None = None, baseline: float = 0.0,
                 perturbations_per_eval: int = 16) -> None:
        super().__init__(model)
        self.window = _integer(self.name, "window", window, 1, optional=True)
        self.stride = _integer(self.name, "stride", stride, 1, optional=True)
        self._check_common(baseline, perturbations_per_eval)
        self._setup()

    def windows(self, images: torch.Tensor) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
        """captum's sliding_window_shapes and strides for `images`: all channels at once."""
        ph, pw = self.patch_size(images)
        window = (self.window, self.window) if self.window else (ph, pw)
        stride = (self.stride, self.stride) if self.stride else (ph, pw)
        height, width = images.shape[-2:]
        if window[0] > height or window[1] > width:
            raise SettingError(f"{self.name}: window={self.window} is larger than the {height}x{width} "
                               "inputs")
        channels = images.shape[1]
        return (channels, *window), (channels, *stride)

    def attribute(self, inputs, targets):
        window, stride = self.windows(inputs)
        return self.attribution.attribute(inputs, sliding_window_shapes=window, strides=stride,
                                          baselines=self.baseline, target=targets,
                                          perturbations_per_eval=self.perturbations_per_eval)

    def to_map(self, attributions, images):
        return F.avg_pool2d(attributions.mean(1, keepdim=True), self.patch_size(images))[:, 0]


@register_explainer("feature_ablation")
class FeatureAblation(PatchPerturbation):
    """Feature Ablation over the model's patches: one feature per patch (all its pixels and
    channels set to `baseline` together), score f(x) - f(ablated x) for the target logit.
    Resolution "grid": captum gives every pixel of a patch its patch's score; the map takes one
    value per patch. The same numbers as occlusion at its defaults, through captum's mask API."""

    captum_class = "FeatureAblation"
    passes_per_image = "2 forwards + gh*gw (one per patch)"

    def __init__(self, model, baseline: float = 0.0, perturbations_per_eval: int = 16) -> None:
        super().__init__(model)
        self._check_common(baseline, perturbations_per_eval)
        self._setup()

    def feature_mask(self, images: torch.Tensor) -> torch.Tensor:
        """[1, 1, H, W] long: the index of each pixel's patch, row-major, shared by the batch
        and the channels."""
        (ph, pw), (gh, gw) = self.patch_size(images), self.grid
        ids = torch.arange(gh * gw, device=images.device).reshape(gh, gw)
        return ids.repeat_interleave(ph, 0).repeat_interleave(pw, 1)[None, None]

    def attribute(self, inputs, targets):
        return self.attribution.attribute(inputs, baselines=self.baseline, target=targets,
                                          feature_mask=self.feature_mask(inputs),
                                          perturbations_per_eval=self.perturbations_per_eval)

    def to_map(self, attributions, images):
        ph, pw = self.patch_size(images)
        return attributions[:, 0, ::ph, ::pw].contiguous()
