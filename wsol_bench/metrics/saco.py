"""SaCo, the Salience-guided Faithfulness Coefficient (Wu et al., "On the Faithfulness of Vision
Transformer Explanations", CVPR 2024), batched.

Definition (each step is tested):
- Subsets: the pixels are ranked by descending salience (stable sort, ties by ascending
  row-major index, as `faithfulness.pixel_ranks`) and cut into K subsets G_1..G_K of equal size,
  G_1 the most salient: rank r goes to subset i when floor(n*i/K) <= r < floor(n*(i+1)/K), in
  exact integer arithmetic, so sizes differ by at most one and none is empty when n >= K. With
  `grouping="patch"` the units are the ViT patches instead: the map is pooled to the patch grid
  (mean over each patch), patches are ranked and cut the same way, and a subset holds every
  pixel of its patches.
- Salience of a subset: s(G_i) = the sum of the heatmap over its pixels.
- Perturbation: every channel of the subset's pixels is replaced by the baseline; "mean" is the
  image's own per-channel mean (the normalisation is affine per channel, so the mean of the
  normalised image is the normalised mean colour), or constants in the normalised input.
- Output drop: d_i = p(c | x) - p(c | x with G_i perturbed), softmax probabilities in float64 of
  the class c: the model's prediction on the clean image (the paper's y-hat) or a given target.
- Coefficient: F = sum_{i<j} sign_ij * (s_i - s_j) / sum_{i<j} |s_i - s_j|, with sign_ij = +1
  when d_i >= d_j (equal drops agree) and -1 otherwise; in [-1, 1]. Since s_1 >= ... >= s_K for
  equal sizes, a pair agrees when the more salient subset moves the output at least as much,
  and it weighs by how much more salient it is.
- Degenerate maps: a constant map, or one whose subsets all have the same salience (total
  weight 0), has no ordering to test: its SaCo is NaN, its row is flagged `saco_degenerate`,
  and none of its subsets goes through the model.

Cost: K perturbed inputs per image (10 by default) and no clean pass when the clean logits of
the explanation pass are given; they are stacked across the batch, built in one reused buffer
and sent through the model `batch_size` at a time with the fused attention kernel. SaCo depends only on the order of the
perturbed probabilities (the clean probability is common to all d_i of an image), so clean
logits from the explicit attention path change no coefficient.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.functional import avg_pool2d

from wsol_bench.errors import SettingError
from wsol_bench.metrics.faithfulness import default_batch_size, pixel_ranks
from wsol_bench.models import fused_attention

CLASS_SOURCES = ("predicted", "target")  # faithfulness.class_source
GROUPINGS = ("pixel", "patch")  # faithfulness.grouping


@dataclass(frozen=True)
class SacoSettings:
    """How SaCo groups, perturbs and scores.

    num_subsets: K, the number of equal-size subsets (the paper's 10). baseline: "mean" (the
    image's per-channel mean), a constant in the normalised input, or one constant per channel.
    class_source: "predicted" (the model's class on the clean image, as the paper) or "target"
    (the targets passed in). batch_size: perturbed images per forward pass; None picks the
    device default (speed only, not the numbers). grouping: "pixel" (the paper) or "patch".
    patch_size: side of a square patch in pixels for patch grouping; None reads it from the
    model (input size / token grid, so hybrid stems count in input pixels).
    """

    num_subsets: int = 10
    baseline: float | tuple[float, ...] | str = "mean"
    class_source: str = "predicted"
    batch_size: int | None = None
    grouping: str = "pixel"
    patch_size: int | None = None

    def __post_init__(self) -> None:
        if not _is_int(self.num_subsets) or self.num_subsets < 2:
            raise SettingError(f"faithfulness.num_subsets must be an integer >= 2 (pairs of subsets are "
                               f"compared), got {self.num_subsets!r}")
        if self.class_source not in CLASS_SOURCES:
            raise SettingError(f"faithfulness.class_source {self.class_source!r} is unknown; valid: "
                               f"{', '.join(CLASS_SOURCES)}")
        if self.grouping not in GROUPINGS:
            raise SettingError(f"faithfulness.grouping {self.grouping!r} is unknown; valid: {', '.join(GROUPINGS)}")
        for key in ("batch_size", "patch_size"):
            value = getattr(self, key)
            if value is not None and (not _is_int(value) or value < 1):
                raise SettingError(f"faithfulness.{key} must be a positive integer or null, got {value!r}")
        object.__setattr__(self, "baseline", _checked_baseline(self.baseline))


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _checked_baseline(baseline: object) -> float | tuple[float, ...] | str:
    if isinstance(baseline, str):
        if baseline != "mean":
            raise SettingError(f"faithfulness.baseline {baseline!r} is unknown for SaCo; give 'mean' (the "
                               "image's per-channel mean), a number or one number per channel (normalised input)")
        return baseline
    try:
        values = tuple(float(v) for v in baseline) if isinstance(baseline, Sequence) else (float(baseline),)
    except (TypeError, ValueError):
        values = ()
    if not values or not all(math.isfinite(v) for v in values):
        raise SettingError(f"faithfulness.baseline must be 'mean' or finite numbers, got {baseline!r}")
    return values[0] if len(values) == 1 else values


def model_patch_size(model: nn.Module) -> int:
    """Side in input pixels of the square region each token covers: input size / token grid of
    `model.patch_embed` (16 for ViT-B/16 and for the shipped hybrid model, whose conv stem
    makes 14x14 tokens of a 224 image although its patch_size is 1)."""
    embed = getattr(model, "patch_embed", None)
    grid, size = getattr(embed, "grid_size", None), getattr(embed, "img_size", None)
    if grid is None or size is None:
        raise SettingError("the model has no patch embedding to read the patch size from; set "
                           "faithfulness.patch_size")
    rows, cols = (int(s) // int(g) for s, g in zip(size, grid))
    if rows != cols or any(int(s) % int(g) for s, g in zip(size, grid)):
        raise SettingError(f"the model's tokens are not square patches ({rows}x{cols} pixels); set "
                           "faithfulness.patch_size")
    return rows


def salience_subsets(heatmaps: torch.Tensor, num_subsets: int, patch_size: int | None = None) -> torch.Tensor:
    """Subset index (0 = most salient) of every pixel: [B, H, W] -> int64 [B, H, W]. Pixels, or
    with `patch_size` the patches of the map pooled by their mean, are ranked and cut into
    `num_subsets` parts of sizes floor(n*(i+1)/K) - floor(n*i/K)."""
    units = heatmaps if patch_size is None else _pooled(heatmaps, patch_size)
    count = units.shape[1] * units.shape[2]
    if count < num_subsets:
        what = "pixels" if patch_size is None else f"{patch_size}x{patch_size} patches"
        raise SettingError(f"faithfulness.num_subsets={num_subsets} exceeds the {count} {what} of a map; "
                           "use fewer subsets")
    inner = torch.tensor([count * i // num_subsets for i in range(1, num_subsets)], device=heatmaps.device)
    ranks = pixel_ranks(units)
    subsets = torch.searchsorted(inner, ranks, right=True).view(units.shape)
    if patch_size is not None:  # every pixel of a patch belongs to the patch's subset
        subsets = subsets.repeat_interleave(patch_size, 1).repeat_interleave(patch_size, 2)
    return subsets


def _pooled(heatmaps: torch.Tensor, patch_size: int) -> torch.Tensor:
    height, width = heatmaps.shape[1:]
    if height % patch_size or width % patch_size:
        raise SettingError(f"{height}x{width} maps do not split into {patch_size}x{patch_size} patches; set "
                           "faithfulness.patch_size to a divisor of the input size or use grouping 'pixel'")
    return avg_pool2d(heatmaps[:, None].double(), patch_size)[:, 0]


def subset_saliences(heatmaps: torch.Tensor, subsets: torch.Tensor, num_subsets: int) -> torch.Tensor:
    """s(G_i): the heatmap summed over each subset, float64 [B, K]."""
    sums = torch.zeros(heatmaps.shape[0], num_subsets, dtype=torch.float64, device=heatmaps.device)
    return sums.scatter_add_(1, subsets.flatten(1), heatmaps.flatten(1).double())


def saco_coefficient(saliences: torch.Tensor, drops: torch.Tensor) -> torch.Tensor:
    """F from subset saliences and output drops ([B, K] each): the salience-difference-weighted
    agreement of every pair i < j (sign +1 when d_i >= d_j), over the total weight; float64 [B],
    NaN where the total weight is 0 (all subsets equally salient)."""
    s, d = saliences.double(), drops.double()
    gaps = s[:, :, None] - s[:, None, :]
    signs = torch.where(d[:, :, None] >= d[:, None, :], 1.0, -1.0).double()
    pairs = torch.ones(s.shape[1], s.shape[1], dtype=torch.bool, device=s.device).triu(1)
    total = (gaps.abs() * pairs).sum((1, 2))
    agreement = (signs * gaps * pairs).sum((1, 2))
    return torch.where(total > 0, agreement / total, torch.full_like(total, math.nan))


def _check_inputs(model: nn.Module, images: torch.Tensor, heatmaps: torch.Tensor) -> None:
    if model.training:
        raise SettingError("SaCo needs the model in eval mode (dropout and batch statistics would make each "
                           "image depend on its batch); call model.eval()")
    if images.ndim != 4:
        raise SettingError(f"SaCo images must be [B, C, H, W], got shape {tuple(images.shape)}")
    if heatmaps.shape != (images.shape[0], *images.shape[2:]):
        raise SettingError(f"heatmaps {tuple(heatmaps.shape)} do not match images {tuple(images.shape)}; "
                           "upsample the maps to the input size first (heatmaps.to_heatmaps)")
    if not torch.isfinite(heatmaps).all():
        raise SettingError("heatmaps hold NaN or inf; build them with heatmaps.to_heatmaps")


def _fill(settings: SacoSettings, images: torch.Tensor) -> torch.Tensor:
    """Replacement values: [B, C, 1, 1] image means, or [1, C, 1, 1] constants."""
    if settings.baseline == "mean":
        return images.mean((2, 3), keepdim=True)
    channels = images.shape[1]
    values = torch.as_tensor(settings.baseline, dtype=images.dtype, device=images.device).reshape(-1)
    if values.numel() not in (1, channels):
        raise SettingError(f"faithfulness.baseline has {values.numel()} values for {channels}-channel images; "
                           "give one value or one per channel")
    return values.expand(channels).reshape(1, channels, 1, 1)


def _run_jobs(model: nn.Module, images: torch.Tensor, subsets: torch.Tensor, fill: torch.Tensor,
              owners: torch.Tensor, perturbed: torch.Tensor, chunk: int) -> torch.Tensor:
    """Logits [jobs, classes] of image owners[j] with subset perturbed[j] replaced (-1: none),
    `chunk` jobs per pass, each chunk's inputs written into one reused buffer (no new pages)."""
    outputs = []
    buffer = torch.empty(min(chunk, len(owners)), *images.shape[1:], dtype=images.dtype, device=images.device)
    owner_list = owners.tolist()
    with fused_attention(model):  # these passes need no attention maps: the fused kernel is faster
        for start in range(0, len(owner_list), chunk):
            stop = min(start + chunk, len(owner_list))
            inputs = _perturbed(images, subsets, fill, owner_list, perturbed, start, stop, buffer[:stop - start])
            outputs.append(model(inputs).float())
    return torch.cat(outputs)


def _perturbed(images: torch.Tensor, subsets: torch.Tensor, fill: torch.Tensor, owners: list[int],
               perturbed: torch.Tensor, start: int, stop: int, out: torch.Tensor) -> torch.Tensor:
    """Jobs start..stop-1 written into `out`. Jobs come image by image, so each run of one
    image's jobs is built from that image by broadcasting, with no copy of it per job."""
    first = start
    for j in range(start + 1, stop + 1):
        if j == stop or owners[j] != owners[first]:
            b = owners[first]
            mask = (subsets[b] == perturbed[first:j, None, None])[:, None]
            torch.where(mask, fill[b if fill.shape[0] > 1 else 0], images[b], out=out[first - start:j - start])
            first = j
    return out


def _scored_classes(clean_logits: torch.Tensor, targets: torch.Tensor | None,
                    settings: SacoSettings) -> torch.Tensor:
    """The class whose probability SaCo reads: the clean prediction, or the checked targets."""
    if settings.class_source == "predicted":
        return clean_logits.argmax(1)
    bad = (targets < 0) | (targets >= clean_logits.shape[1])
    if bad.any():
        raise SettingError(f"SaCo target {int(targets[bad][0])} is out of range for a model with "
                           f"{clean_logits.shape[1]} classes")
    return targets


@torch.inference_mode()
def score_saco_batch(model: nn.Module, images: torch.Tensor, heatmaps: torch.Tensor,
                     targets: torch.Tensor | None = None, settings: SacoSettings | None = None,
                     clean_logits: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """SaCo of a batch. images: normalised [B, C, H, W]; heatmaps: [B, H, W] at image resolution
    (higher = more relevant); targets: [B] (needed for class_source "target"); clean_logits:
    [B, classes] of the unperturbed images (computed here, batched, when None).

    Returns CPU tensors: `saco` (float64 [B], NaN when degenerate), `degenerate` (bool [B]),
    `classes` (int64 [B], the scored class), `clean_probs` (float64 [B]), `drops` (float64
    [B, K], NaN rows for degenerate maps) and `saliences` (float64 [B, K], s(G_i))."""
    settings = settings or SacoSettings()
    first = next(model.parameters(), None)
    device = first.device if first is not None else images.device
    images, heatmaps = images.to(device, torch.float32), heatmaps.to(device, torch.float32)
    _check_inputs(model, images, heatmaps)
    batch, k = images.shape[0], settings.num_subsets
    if settings.class_source == "target":
        if targets is None:
            raise SettingError("faithfulness.class_source 'target' needs the targets; pass them or use 'predicted'")
        targets = torch.as_tensor(targets, dtype=torch.long, device=device).reshape(-1)
        if targets.shape != (batch,):
            raise SettingError(f"{targets.numel()} targets for {batch} images")
    if clean_logits is not None:
        clean_logits = clean_logits.to(device).float()
        if clean_logits.ndim != 2 or clean_logits.shape[0] != batch:
            raise SettingError(f"clean_logits {tuple(clean_logits.shape)} must be [B={batch}, classes]")

    patch = None if settings.grouping == "pixel" else (settings.patch_size or model_patch_size(model))
    subsets = salience_subsets(heatmaps, k, patch)
    saliences = subset_saliences(heatmaps, subsets, k)
    flat = heatmaps.flatten(1)
    degenerate = (flat.amax(1) == flat.amin(1)) | ~(saliences.amax(1) > saliences.amin(1))

    # Jobs, image by image: its clean pass (when no clean logits came), then its K subsets
    # (none for a degenerate map).
    per_image = [([-1] if clean_logits is None else []) + ([] if flagged else list(range(k)))
                 for flagged in degenerate.tolist()]
    owners = torch.tensor([b for b, jobs in enumerate(per_image) for _ in jobs], dtype=torch.long, device=device)
    perturbed = torch.tensor([s for jobs in per_image for s in jobs], dtype=torch.long, device=device)
    if clean_logits is not None:  # bad targets fail before any perturbed pass
        classes = _scored_classes(clean_logits, targets, settings)
    chunk = settings.batch_size or default_batch_size(device)
    logits = _run_jobs(model, images, subsets, _fill(settings, images), owners, perturbed, chunk) \
        if len(owners) else torch.empty(0, 0, device=device)
    if clean_logits is None:
        clean_logits = logits[perturbed == -1]
        classes = _scored_classes(clean_logits, targets, settings)

    clean_probs = clean_logits.double().softmax(1).gather(1, classes[:, None])[:, 0]
    drops = torch.full((batch, k), math.nan, dtype=torch.float64, device=device)
    scored = perturbed >= 0
    if scored.any():
        owner, subset = owners[scored], perturbed[scored]
        probs = logits[scored].double().softmax(1).gather(1, classes[owner][:, None])[:, 0]
        drops[owner, subset] = clean_probs[owner] - probs
    saco = saco_coefficient(saliences, drops)
    saco[degenerate] = math.nan
    return {"saco": saco.cpu(), "degenerate": degenerate.cpu(), "classes": classes.cpu(),
            "clean_probs": clean_probs.cpu(), "drops": drops.cpu(), "saliences": saliences.cpu()}


def saco_row_columns(settings: SacoSettings) -> list[str]:
    """The columns of `saco_rows` for these settings, in order."""
    width = max(2, len(str(settings.num_subsets - 1)))
    return (["saco", "saco_degenerate", "saco_class", "saco_clean_prob"]
            + [f"saco_drop_{i:0{width}d}" for i in range(settings.num_subsets)]
            + [f"saco_salience_{i:0{width}d}" for i in range(settings.num_subsets)])


def saco_rows(scores: dict[str, torch.Tensor]) -> list[dict[str, float]]:
    """One record row per image from `score_saco_batch`: `saco` (NaN when degenerate),
    `saco_degenerate` (1.0 / 0.0), `saco_class`, `saco_clean_prob`, and per subset (00 = most
    salient) its output drop `saco_drop_<ii>` and salience `saco_salience_<ii>`."""
    k = scores["drops"].shape[1]
    width = max(2, len(str(k - 1)))
    rows = []
    for b in range(len(scores["saco"])):
        row = {"saco": float(scores["saco"][b]), "saco_degenerate": float(scores["degenerate"][b]),
               "saco_class": float(scores["classes"][b]), "saco_clean_prob": float(scores["clean_probs"][b])}
        row.update({f"saco_drop_{i:0{width}d}": float(v) for i, v in enumerate(scores["drops"][b].tolist())})
        row.update({f"saco_salience_{i:0{width}d}": float(v) for i, v in enumerate(scores["saliences"][b].tolist())})
        rows.append(row)
    return rows
