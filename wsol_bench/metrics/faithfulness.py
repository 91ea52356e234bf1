"""Pixel-perturbation faithfulness (docs/protocol.md 5): MoRF/LeRF curves and ABPC (the AG-CAM
protocol), and RISE deletion/insertion, from one batched perturbation engine.

Conventions (each one is tested):
- Steps: step i of S covers the fraction s_i = i/(S-1) of the n = H*W pixels; its pixel
  count is int(n * s_i) in float64, truncated, as the AG-CAM reference computes it from the
  literal list [0.0, 0.1, ..., 1.0] (i/10 is that list's float exactly). For 224 x 224 that
  is 5017 pixels at s = 0.1 (5017.6 truncated) and 15052 at 0.3.
- Ranking: the MoRF order is a stable sort by descending heatmap value, ties broken by
  ascending row-major pixel index. The LeRF order is exactly the reverse of the MoRF order
  (so tied pixels go in descending index order): LeRF removing m pixels removes the last m
  pixels of the MoRF order.
- Removal sets every channel of a removed pixel to the baseline: a constant in the normalised
  input (AG-CAM: 0, the channel mean), per-channel constants, or a Gaussian-blurred copy of
  the image (RISE). Blurring commutes with the per-channel normalisation (a kernel summing to
  one is affine-invariant), so blurring the normalised input equals normalising the blur.
- Deletion is MoRF removal. Insertion starts from the baseline and reveals the most relevant
  pixels first: with m pixels revealed, all pixels after the first m of the MoRF order are at
  the baseline.
- Score: softmax probability of the target class (docs/protocol.md 5: the ground-truth class).
  AUC: plain mean over the steps (AG-CAM) or the trapezoid rule over the fractions i/(S-1)
  (RISE). ABPC = AUC_LeRF - AUC_MoRF, as a fraction (tables multiply by 100).

No input is passed through the model twice: a step with nothing removed reuses the clean
logits of the explanation pass, and the fully removed input of a constant baseline is one
image shared by every image (pass `full_removal_probs` from `constant_baseline_probs` so a
run computes it once). With 11 steps that leaves 9 x 2 = 18 perturbed inputs per image for
ABPC, stacked across images and steps and sent through the model `batch_size` at a time, with
the fused attention kernel (these passes need no attention maps; the outputs equal the
explicit path's up to float rounding).
Images never interact in an eval-mode model, so batched curves equal one-image curves to
float32 precision; on CUDA that holds with TF32 off (cuDNN convolutions use TF32 by default
and pick algorithms per batch size, which moves ABPC by ~1e-4).
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence

import torch
from torch import nn
from torchvision.transforms.functional import gaussian_blur

from wsol_bench.errors import SettingError
from wsol_bench.metrics.faithfulness_settings import (  # noqa: F401  (re-exported: one import for users)
    CURVES,
    DEFAULT_INTEGRAL,
    INTEGRALS,
    MODES,
    FaithfulnessSettings,
    default_batch_size,
)
from wsol_bench.models import fused_attention


def step_counts(num_pixels: int, steps: int) -> list[int]:
    """Pixels affected at each step: int(n * s) for s = i / (steps - 1), i = 0..steps-1, in
    float64 and truncated, exactly as the reference (5017 of 50176 pixels at s = 0.1)."""
    return [int(num_pixels * fraction) for fraction in step_fractions(steps)]


def step_fractions(steps: int) -> list[float]:
    """The nominal fraction i / (steps - 1) of each step (the x axis of the curves)."""
    return [i / (steps - 1) for i in range(steps)]


def pixel_ranks(heatmaps: torch.Tensor) -> torch.Tensor:
    """Position of every pixel in the MoRF order: [B, H, W] -> int64 [B, H*W] (row-major).
    Stable descending sort, so tied pixels keep ascending index order."""
    flat = heatmaps.flatten(1)
    order = torch.sort(flat, dim=1, descending=True, stable=True).indices
    ranks = torch.empty_like(order)
    positions = torch.arange(flat.shape[1], device=flat.device).expand_as(order)
    return ranks.scatter_(1, order, positions)


def removal_window(curve: str, count: int, num_pixels: int) -> tuple[int, int]:
    """The MoRF-rank interval [lo, hi) of pixels set to the baseline at a step of `count`."""
    if curve in ("morf", "deletion"):
        return 0, count
    if curve == "lerf":  # the last `count` of the MoRF order
        return num_pixels - count, num_pixels
    if curve == "insertion":  # `count` most relevant revealed, the rest at the baseline
        return count, num_pixels
    raise SettingError(f"unknown perturbation curve {curve!r}")


def area_under_curve(curves: torch.Tensor, rule: str) -> torch.Tensor:
    """AUC of [..., S] curves over x = 0..1 in float64: plain mean or trapezoid rule."""
    values = curves.double()
    if rule == "mean":
        return values.mean(-1)
    if rule == "trapezoid":
        return torch.trapezoid(values, dx=1.0 / (values.shape[-1] - 1), dim=-1)
    raise SettingError(f"unknown integral {rule!r}; valid: {', '.join(INTEGRALS)}")


_COMPILED: weakref.WeakKeyDictionary[nn.Module, nn.Module] = weakref.WeakKeyDictionary()


def compiled(model: nn.Module) -> nn.Module:
    """`torch.compile(model)`, made once per model (the compiled graphs are kept with it)."""
    if model not in _COMPILED:
        _COMPILED[model] = torch.compile(model, dynamic=False)
    return _COMPILED[model]


def _model_device(model: nn.Module, fallback: torch.device) -> torch.device:
    first = next(model.parameters(), None)
    return first.device if first is not None else fallback


def _constant_fill(settings: FaithfulnessSettings, channels: int, device: torch.device) -> torch.Tensor:
    values = torch.as_tensor(settings.baseline, dtype=torch.float32, device=device).reshape(-1)
    if values.numel() not in (1, channels):
        raise SettingError(f"faithfulness baseline has {values.numel()} values for {channels}-channel "
                           "images; give one value or one per channel")
    return values.expand(channels).reshape(1, channels, 1, 1)


@torch.inference_mode()
def constant_baseline_probs(model: nn.Module, image_shape: Sequence[int],
                            settings: FaithfulnessSettings) -> torch.Tensor:
    """Softmax [C] of the fully removed input of a constant baseline: one image, the same for
    every image of a run, so a run computes it once and passes it to `score_batch`."""
    if settings.blurred:
        raise SettingError("the blur baseline's fully removed input differs per image; there is no shared "
                           "full-removal input (leave full_removal_probs=None)")
    channels, height, width = (int(s) for s in image_shape)
    device = _model_device(model, torch.device("cpu"))
    image = _constant_fill(settings, channels, device).expand(1, channels, height, width).contiguous()
    with fused_attention(model), torch.autocast(device.type, enabled=settings.amp):
        logits = model(image)
    return logits.float().softmax(1)[0]


def _check_inputs(model: nn.Module, images: torch.Tensor, heatmaps: torch.Tensor,
                  targets: torch.Tensor) -> None:
    if model.training:
        raise SettingError("faithfulness needs the model in eval mode (dropout and batch statistics would "
                           "make each image depend on its batch); call model.eval()")
    if images.ndim != 4:
        raise SettingError(f"faithfulness images must be [B, C, H, W], got shape {tuple(images.shape)}")
    if heatmaps.shape != (images.shape[0], *images.shape[2:]):
        raise SettingError(f"heatmaps {tuple(heatmaps.shape)} do not match images {tuple(images.shape)}; "
                           "upsample the maps to the input size first (heatmaps.to_heatmaps)")
    if not torch.isfinite(heatmaps).all():
        raise SettingError("heatmaps hold NaN or inf; build them with heatmaps.to_heatmaps, which maps "
                           "degenerate maps to zeros")
    if targets.shape != (images.shape[0],):
        raise SettingError(f"{targets.numel()} targets for {images.shape[0]} images")


def _plan_steps(settings: FaithfulnessSettings, num_pixels: int
                ) -> tuple[list[tuple[int, int, int, int]], dict[tuple[int, int], str]]:
    """(curve, step, lo, hi) of every input that needs its own pass, and for the other
    (curve, step) pairs which shared input they equal: "clean" or "full" (all removed)."""
    plan, shared = [], {}
    for c, curve in enumerate(settings.curves):
        for s, count in enumerate(step_counts(num_pixels, settings.steps)):
            lo, hi = removal_window(curve, count, num_pixels)
            if hi - lo == 0:
                shared[(c, s)] = "clean"
            elif hi - lo == num_pixels:
                shared[(c, s)] = "full"
            else:
                plan.append((c, s, lo, hi))
    return plan, shared


@torch.inference_mode()
def score_batch(model: nn.Module, images: torch.Tensor, heatmaps: torch.Tensor, targets: torch.Tensor,
                settings: FaithfulnessSettings | None = None, clean_logits: torch.Tensor | None = None,
                full_removal_probs: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Perturbation curves and their areas for a batch.

    images: normalised [B, C, H, W]; heatmaps: [B, H, W] (upsampled, normalised); targets:
    [B] class indices. clean_logits: [B, C] logits of the unperturbed images (computed here
    when None). full_removal_probs: [C] softmax of the constant baseline image (computed here
    when None; must be None for the blur baseline). Returns CPU tensors: each curve of the
    mode ([B, steps] probabilities: `morf` and `lerf`, or `deletion`, or `insertion`), its
    `auc_<curve>` (float64 [B]), and for abpc `abpc` = auc_lerf - auc_morf.
    """
    settings = settings or FaithfulnessSettings()
    device = _model_device(model, images.device)
    images = images.to(device, torch.float32, non_blocking=True)  # pinned batches copy asynchronously
    heatmaps = heatmaps.to(device, torch.float32)
    targets = torch.as_tensor(targets, dtype=torch.long, device=device).reshape(-1)
    _check_inputs(model, images, heatmaps, targets)
    batch, channels, height, width = images.shape
    num_pixels = height * width

    largest_kernel = 2 * min(height, width) - 1  # reflect padding needs pad < image side
    if settings.blurred and settings.blur_kernel_size > largest_kernel:
        raise SettingError(f"faithfulness blur_kernel_size {settings.blur_kernel_size} is too large for "
                           f"{height}x{width} images; use at most {largest_kernel}")
    plan, shared = _plan_steps(settings, num_pixels)

    # The shared probabilities first: they tell the number of classes, so bad targets fail
    # before any perturbed pass.
    num_classes = None
    if clean_logits is not None:
        clean_logits = clean_logits.to(device).float()
        if clean_logits.ndim != 2 or clean_logits.shape[0] != batch:
            raise SettingError(f"clean_logits {tuple(clean_logits.shape)} must be [B={batch}, classes]")
        num_classes = clean_logits.shape[1]
        _check_targets(targets, num_classes)
    if settings.blurred:
        if full_removal_probs is not None:
            raise SettingError("full_removal_probs was given but the blur baseline's fully removed input "
                               "differs per image; pass None")
    else:
        if full_removal_probs is None:
            full_removal_probs = constant_baseline_probs(model, images.shape[1:], settings)
        full_removal_probs = full_removal_probs.to(device).float().reshape(-1)
        if num_classes is not None and full_removal_probs.numel() != num_classes:
            raise SettingError(f"full_removal_probs has {full_removal_probs.numel()} classes, clean_logits "
                               f"{num_classes}; compute both with the same model")
        num_classes = full_removal_probs.numel()
        _check_targets(targets, num_classes)

    # Jobs: (image, lo, hi). The clean and the per-image fully removed inputs join the same
    # stream when they are needed, so they are batched with the rest.
    per_image = [torch.tensor([(lo, hi) for _, _, lo, hi in plan], dtype=torch.long).reshape(-1, 2)]
    if clean_logits is None:
        per_image.append(torch.tensor([[0, 0]]))
    if settings.blurred:
        per_image.append(torch.tensor([[0, num_pixels]]))
    windows = torch.cat(per_image).to(device)
    owners = torch.arange(batch, device=device).repeat_interleave(len(windows))
    jobs = torch.cat([owners[:, None], windows.repeat(batch, 1)], dim=1)

    ranks = pixel_ranks(heatmaps)
    fill = gaussian_blur(images, [settings.blur_kernel_size] * 2, [settings.blur_sigma] * 2) \
        if settings.blurred else _constant_fill(settings, channels, device)
    probs = torch.empty(len(jobs), device=device)
    chunk = settings.batch_size or default_batch_size(device)
    forward = compiled(model) if settings.compile else model
    with fused_attention(model):  # no attention maps are needed here: the fused kernel is faster
        for start in range(0, len(jobs), chunk):
            owner, lo, hi = jobs[start:start + chunk].unbind(1)
            rank = ranks[owner]
            removed = ((rank >= lo[:, None]) & (rank < hi[:, None])).view(-1, 1, height, width)
            inputs = torch.where(removed, fill[owner] if settings.blurred else fill, images[owner])
            if settings.compile and len(inputs) < chunk:  # one input shape: no recompilation per remainder
                inputs = torch.cat([inputs, inputs[-1:].expand(chunk - len(inputs), -1, -1, -1)])
            with torch.autocast(device.type, enabled=settings.amp):
                logits = forward(inputs)[:len(owner)].float()
            if num_classes is None:
                num_classes = logits.shape[1]
                _check_targets(targets, num_classes)
            probs[start:start + len(owner)] = logits.softmax(1).gather(1, targets[owner][:, None])[:, 0]
    probs = probs.view(batch, len(windows))

    clean = probs[:, len(plan)] if clean_logits is None else \
        clean_logits.softmax(1).gather(1, targets[:, None])[:, 0]
    full = probs[:, -1] if settings.blurred else full_removal_probs[targets]

    curves = torch.empty(len(settings.curves), batch, settings.steps, device=device)
    for (c, s), source in shared.items():
        curves[c, :, s] = clean if source == "clean" else full
    for j, (c, s, _, _) in enumerate(plan):
        curves[c, :, s] = probs[:, j]

    out: dict[str, torch.Tensor] = {}
    for c, curve in enumerate(settings.curves):
        out[curve] = curves[c].cpu()
        out[f"auc_{curve}"] = area_under_curve(out[curve], settings.area_rule)
    if settings.mode == "abpc":
        out["abpc"] = out["auc_lerf"] - out["auc_morf"]
    return out


def _check_targets(targets: torch.Tensor, num_classes: int) -> None:
    bad = (targets < 0) | (targets >= num_classes)
    if bad.any():
        raise SettingError(f"faithfulness target {int(targets[bad][0])} is out of range for a model with "
                           f"{num_classes} classes")


def row_columns(settings: FaithfulnessSettings) -> list[str]:
    """The score columns of `faithfulness_rows` for these settings, in order."""
    width = max(2, len(str(settings.steps - 1)))
    return ([f"auc_{c}" for c in settings.curves] + (["abpc"] if settings.mode == "abpc" else [])
            + [f"{c}_{s:0{width}d}" for c in settings.curves for s in range(settings.steps)])


def faithfulness_rows(scores: dict[str, torch.Tensor]) -> list[dict[str, float]]:
    """One record row per image from `score_batch` output: every `auc_<curve>`, `abpc` (abpc
    mode), and each step as `<curve>_<ii>` (two-digit step index, e.g. morf_00..morf_10)."""
    curves = [name for name in ("morf", "lerf", "deletion", "insertion") if name in scores]
    if not curves:
        raise SettingError(f"no perturbation curves in scores (keys: {sorted(scores)})")
    steps = scores[curves[0]].shape[1]
    width = max(2, len(str(steps - 1)))
    columns = [f"auc_{c}" for c in curves] + (["abpc"] if "abpc" in scores else [])
    batch = scores[curves[0]].shape[0]
    rows = []
    for b in range(batch):
        row = {name: float(scores[name][b]) for name in columns}
        for curve in curves:
            row.update({f"{curve}_{s:0{width}d}": float(v) for s, v in enumerate(scores[curve][b].tolist())})
        rows.append(row)
    return rows
