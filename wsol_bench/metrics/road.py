"""ROAD: RemOve And Debias (Rong et al., ICML 2022) with noisy linear imputation, computed
as pytorch-grad-cam's `pytorch_grad_cam.metrics.road` computes it, batched (docs/protocol.md 5).

Conventions (each one is tested against the library):
- Removal: at percentile p, MoRF removes the pixels whose heatmap value is >= the p-th
  percentile of the image's heatmap values; LeRF removes the pixels whose value of
  (1 - heatmap) is >= the p-th percentile of those values. Either keeps about p % of the
  pixels (the least relevant for MoRF, the most relevant for LeRF) and removes about
  100 - p %, ties at the threshold all removed. The percentile is numpy's default (linear
  interpolation), evaluated in float32 as numpy evaluates it for a float32 map and a
  Python-number percentile.
- Imputation: `road_imputation` (each removed pixel the weighted mean of its 8 neighbours,
  solved exactly), rounded to float32, plus `noise` x N(0, 1) on every removed pixel and
  channel, drawn from a CPU generator seeded per image in the library's order (LeRF then
  MoRF for `order=both`, percentiles in the given order, one (C, count) draw per input,
  channel by channel, removed pixels in row-major order). An image with seed s gets the
  noise the library draws after `torch.manual_seed(s)` when it is called on that image alone.
- Score: the softmax probability of the target class (`score=softmax`, the library's
  `ClassifierOutputSoftmaxTarget`) or its logit (`score=logit`, `ClassifierOutputTarget`).
- Results: the score after each removal, the clean score, and the library's numbers:
  road_morf = mean over p of (score_morf(p) - clean) (`ROADMostRelevantFirstAverage`),
  road_lerf likewise (`ROADLeastRelevantFirstAverage`), road_combined = (road_lerf -
  road_morf) / 2 (`ROADCombined`), in float64 from the float32 scores.
- An input with every pixel removed (a constant map, or ties at the percentile covering the
  whole image) has nothing to impute from: its system is singular with a zero right-hand
  side, for which the library's sparse solver returns 0 at every pixel. So the input is 0
  (the channel mean of the normalised input) plus the noise, as in the library; such inputs
  are counted in `all_removed`, since their scores say nothing about the map.

Passes: the clean logits of the explanation pass are reused, so an image costs one forward
image per (curve, percentile): 18 for the defaults (the library: 36, the clean image once per
percentile and curve). The perturbed images of the whole batch are sent through the model
`batch_size` at a time, with the fused attention kernel.

Solves: a grid system costs the same whatever it removes, so an image's removal masks that are
pairwise disjoint share one (`pack_disjoint`: MoRF at p with LeRF at 100 - p, 9 to 10 systems
for the 18 default inputs instead of 18), each mask one part of it, solved exactly as alone.
On CPU, chunks of systems are solved by one single-threaded solver thread per torch thread
(`map_in_threads`), in order, while the model scores the finished ones.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import closing

import torch
from torch import nn

from wsol_bench.errors import SettingError
from wsol_bench.metrics.faithfulness import _check_inputs as check_perturbation_inputs
from wsol_bench.metrics.faithfulness_settings import default_batch_size
from wsol_bench.metrics.road_imputation import map_in_threads, solve_imputation, solver_threads
from wsol_bench.metrics.road_settings import (  # noqa: F401  (re-exported: one import for users)
    ACCELERATOR_SOLVE_BATCH_SIZE,
    DEFAULT_PERCENTILES,
    ORDERS,
    SCORES,
    SOLVE_BATCH_SIZE,
    RoadSettings,
)
from wsol_bench.models import fused_attention


def percentile_thresholds(values: torch.Tensor, percentiles: Sequence[float]) -> torch.Tensor:
    """np.percentile(v, p) of each row of `values` [B, n] (float32) for Python-number p, as
    numpy computes it: virtual index (n - 1) * (p / 100) in float64, then a + (b - a) * t
    (t < 0.5) or b - (b - a) * (1 - t), in float32 with t rounded to float32. -> [B, P]."""
    ordered = values.sort(dim=1).values
    n = ordered.shape[1]
    columns = []
    for p in percentiles:
        virtual = (n - 1) * (p / 100)
        below = min(math.floor(virtual), n - 1)
        above = min(below + 1, n - 1)
        t = virtual - below
        a, b = ordered[:, below], ordered[:, above]
        columns.append(b - (b - a) * (1 - t) if t >= 0.5 else a + (b - a) * t)
    return torch.stack(columns, 1)


def removal_masks(heatmaps: torch.Tensor, settings: RoadSettings) -> torch.Tensor:
    """Removed pixels of every input: bool [B, J, H, W], J = curves x percentiles in the
    library's order (`settings.curves`, then `settings.percentiles`)."""
    heat = heatmaps.float()
    masks = []
    for curve in settings.curves:
        values = heat if curve == "morf" else 1 - heat  # the library ranks LeRF by 1 - map
        flat = values.flatten(1)
        thresholds = percentile_thresholds(flat, settings.percentiles)
        masks.append(flat[:, None, :] >= thresholds[:, :, None])  # kept: value < threshold
    return torch.cat(masks, 1).view(heat.shape[0], -1, *heat.shape[1:])


def noise_draw(generator: torch.Generator, count: int, channels: int) -> torch.Tensor:
    """The library's noise for one input: `randn_like` of its solution transposed to (C, count).
    scipy returns that solution column-major, so the transpose is contiguous and the draw is
    a plain (C, count) row-major standard normal: channel by channel, pixels in order."""
    return torch.randn(channels, count, generator=generator)


def _model_device(model: nn.Module, fallback: torch.device) -> torch.device:
    first = next(model.parameters(), None)
    return first.device if first is not None else fallback


def _check_inputs(model: nn.Module, images: torch.Tensor, heatmaps: torch.Tensor, targets: torch.Tensor,
                  seeds: list[int]) -> None:
    check_perturbation_inputs(model, images, heatmaps, targets)
    if len(seeds) != images.shape[0] or any(isinstance(s, bool) or s < 0 for s in seeds):
        raise SettingError(f"ROAD noise seeds must be one non-negative integer per image ({images.shape[0]}), "
                           f"got {seeds}")


def _check_targets(targets: torch.Tensor, num_classes: int) -> None:
    bad = (targets < 0) | (targets >= num_classes)
    if bad.any():
        raise SettingError(f"ROAD target {int(targets[bad][0])} is out of range for a model with "
                           f"{num_classes} classes")


def target_scores(logits: torch.Tensor, targets: torch.Tensor, score: str) -> torch.Tensor:
    """The score of each row's target: softmax probability or logit, float32 [n]."""
    values = logits.float().softmax(1) if score == "softmax" else logits.float()
    return values.gather(1, targets[:, None])[:, 0]


class _Passes:
    """Perturbed inputs queued from the solves and sent through the model `size` at a time;
    each score lands in scores[owner, slot]."""

    def __init__(self, model: nn.Module, targets: torch.Tensor, settings: RoadSettings, size: int,
                 scores: torch.Tensor) -> None:
        self.model, self.targets, self.settings, self.size, self.scores = model, targets, settings, size, scores
        self.queue: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.queued = 0

    def add(self, inputs: torch.Tensor, owners: torch.Tensor, slots: torch.Tensor) -> None:
        """Queue inputs [n, C, H, W] of images `owners` at input slots `slots`; run full chunks."""
        self.queue.append((inputs, owners, slots))
        self.queued += len(inputs)
        while self.queued >= self.size:
            self._run(self.size)

    def flush(self) -> None:
        """Run what is left in the queue."""
        if self.queued:
            self._run(self.queued)

    def _run(self, count: int) -> None:
        inputs, owners, slots = (torch.cat(parts) for parts in zip(*self.queue))
        self.queue = [(inputs[count:], owners[count:], slots[count:])] if count < len(inputs) else []
        self.queued = len(inputs) - count
        logits = self.model(inputs[:count])
        _check_targets(self.targets, logits.shape[1])
        owners, slots = owners[:count], slots[:count]
        self.scores[owners, slots] = target_scores(logits, self.targets[owners], self.settings.score)


@torch.inference_mode()
def road_scores(model: nn.Module, images: torch.Tensor, heatmaps: torch.Tensor, targets: torch.Tensor,
                settings: RoadSettings | None = None, clean_logits: torch.Tensor | None = None,
                noise_seeds: Sequence[int] | None = None) -> dict[str, torch.Tensor]:
    """ROAD for a batch.

    images: normalised [B, C, H, W]; heatmaps: [B, H, W] at image resolution (higher = more
    relevant; taken in float32); targets: [B] class indices; clean_logits: [B, K] logits of the
    unperturbed images (computed here, one more pass per image, when None); noise_seeds: one
    seed per image (default: `settings.seed` for every image). Returns CPU tensors: `clean`
    [B], each curve's scores [B, P] (`morf`, `lerf`), `road_morf` / `road_lerf` [B]
    (float64), `road_combined` [B] for order=both, and `all_removed` [B] (int64: inputs with
    every pixel removed).
    """
    settings = settings or RoadSettings()
    device = _model_device(model, images.device)
    images = images.to(device, torch.float32)
    heatmaps = heatmaps.to(device, torch.float32)
    targets = torch.as_tensor(targets, dtype=torch.long, device=device).reshape(-1)
    seeds = [settings.seed] * len(images) if noise_seeds is None else [int(s) for s in noise_seeds]
    _check_inputs(model, images, heatmaps, targets, seeds)
    batch, channels, height, width = images.shape
    size = settings.batch_size or default_batch_size(device)

    masks = removal_masks(heatmaps, settings)  # [B, J, H, W]
    counts = masks.flatten(2).sum(-1).cpu()
    masks_cpu = masks.cpu() if settings.noise else None
    scores = torch.zeros(counts.shape, device=device)
    passes = _Passes(model, targets, settings, size, scores)
    with fused_attention(model):  # no attention maps are needed here: the fused kernel is faster
        if clean_logits is None:
            clean_logits = torch.cat([model(images[s:s + size]) for s in range(0, batch, size)])
        clean_logits = clean_logits.to(device)
        if clean_logits.ndim != 2 or clean_logits.shape[0] != batch:
            raise SettingError(f"clean_logits {tuple(clean_logits.shape)} must be [B={batch}, classes]")
        _check_targets(targets, clean_logits.shape[1])
        chunk = settings.solve_batch_size or SOLVE_BATCH_SIZE.get(device.type, ACCELERATOR_SOLVE_BATCH_SIZE)
        systems: list[tuple[int, list[int], list[torch.Tensor | None]]] = []
        for b in range(batch):
            generator = torch.Generator().manual_seed(seeds[b]) if settings.noise else None
            # the library's draw order: every input of the image, in slot order, before packing
            draws = [noise_draw(generator, int(count), channels) if generator is not None else None
                     for count in counts[b].tolist()]
            systems += [(b, slots, [draws[j] for j in slots]) for slots in pack_disjoint(masks[b], counts[b])]
        chunks = [systems[s:s + chunk] for s in range(0, len(systems), chunk)]
        solved = map_in_threads(lambda jobs: _impute(images, masks, masks_cpu, jobs, settings.noise), chunks,
                                solver_threads(device))
        with closing(solved):  # on an error: the solver threads stop and the thread count is restored
            for inputs in solved:
                passes.add(*inputs)
        passes.flush()
    return _summarise(scores.cpu(), target_scores(clean_logits, targets, settings.score).cpu(), counts,
                      settings, height * width)


def pack_disjoint(masks: torch.Tensor, counts: torch.Tensor) -> list[list[int]]:
    """Slots of one image's removal masks [J, H, W] grouped into grid systems: each group's
    masks are pairwise disjoint, so one factorisation serves them all (a grid system costs
    the same however many pixels it removes). First fit, largest mask first: MoRF at p takes
    LeRF at 100 - p, its near complement. Masks removing every pixel stay alone (unsolvable)."""
    total = masks[0].numel()
    order = sorted(range(len(counts)), key=lambda j: -int(counts[j]))
    systems: list[tuple[list[int], torch.Tensor, int]] = []  # slots, union of their masks, count
    for j in order:
        count = int(counts[j])
        for i, (slots, union, used) in enumerate(systems):
            if used + count <= total and used < total and count < total and not (union & masks[j]).any():
                systems[i] = (slots + [j], union | masks[j], used + count)
                break
        else:
            systems.append(([j], masks[j].clone(), count))
    return [sorted(slots) for slots, _, _ in systems]


def _impute(images: torch.Tensor, masks: torch.Tensor, masks_cpu: torch.Tensor | None,
            systems: list[tuple[int, list[int], list[torch.Tensor | None]]], noise: float
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The perturbed inputs of `systems` (image, its input slots, their noise draws): each
    system's slots solved as the parts of one grid system, rounded to float32, noise added
    at the removed pixels. -> (inputs, owners, slots), one input per slot."""
    device = images.device
    owners = torch.tensor([b for b, slots, _ in systems], device=device)
    height, width = masks.shape[-2:]
    parts = torch.zeros(len(systems), height, width, dtype=torch.int64, device=device)
    for i, (b, slots, _) in enumerate(systems):
        for label, j in enumerate(slots, 1):
            parts[i][masks[b, j]] = label
    # a lone part removing every pixel has nothing to impute from: 0, the library's solution there
    solvable = ~(parts != 0).flatten(1).all(1) | (parts.flatten(1).amax(1) > 1)
    values = torch.zeros(len(systems), *images.shape[1:], device=device)
    if solvable.any():
        values[solvable] = solve_imputation(images[owners[solvable]], parts[solvable]).float()
    row = torch.tensor([i for i, (_, slots, _) in enumerate(systems) for _ in slots], device=device)
    input_owners = owners[row]
    input_slots = torch.tensor([j for _, slots, _ in systems for j in slots], device=device)
    removed = masks[input_owners, input_slots]
    values = values[row]  # every part's own solution sits at its removed pixels
    if noise:
        noise_field = torch.zeros(len(row), images.shape[1], removed[0].numel())
        draws = [(b, j, draw) for b, slots, system_draws in systems for j, draw in zip(slots, system_draws)]
        for i, (b, j, draw) in enumerate(draws):
            noise_field[i][:, masks_cpu[b, j].flatten()] = draw  # removed pixels in row-major order
        # float32 as the library: solution + (noise * draw), the product rounded first
        values = values + noise_field.view(values.shape).to(device) * noise
    return torch.where(removed[:, None], values, images[input_owners]), input_owners, input_slots


def _summarise(scores: torch.Tensor, clean: torch.Tensor, counts: torch.Tensor, settings: RoadSettings,
               num_pixels: int) -> dict[str, torch.Tensor]:
    """Split the [B, J] scores by curve and average the differences to the clean score."""
    out = {"clean": clean, "all_removed": (counts == num_pixels).sum(1)}
    per_curve = len(settings.percentiles)
    for c, curve in enumerate(settings.curves):
        out[curve] = scores[:, c * per_curve:(c + 1) * per_curve]
        out[f"road_{curve}"] = (out[curve].double() - clean.double()[:, None]).mean(1)
    if settings.order == "both":
        out["road_combined"] = (out["road_lerf"] - out["road_morf"]) / 2
    return out


def road_columns(settings: RoadSettings) -> list[str]:
    """The columns of `road_rows` for these settings, in order."""
    curves = [c for c in ("morf", "lerf") if c in settings.curves]
    return ([f"road_{c}" for c in curves] + (["road_combined"] if settings.order == "both" else [])
            + ["road_clean", "road_all_removed"]
            + [f"road_{c}_p{p:g}" for c in curves for p in settings.percentiles])


def road_rows(scores: dict[str, torch.Tensor], settings: RoadSettings) -> list[dict[str, float]]:
    """One record row per image from `road_scores` output: the summary numbers, the clean
    score, the count of fully removed inputs, and each percentile's score."""
    rows = []
    for b in range(len(scores["clean"])):
        row = {"road_clean": float(scores["clean"][b]), "road_all_removed": float(scores["all_removed"][b])}
        for curve in settings.curves:
            row[f"road_{curve}"] = float(scores[f"road_{curve}"][b])
            row.update({f"road_{curve}_p{p:g}": float(v) for p, v in zip(settings.percentiles, scores[curve][b])})
        if "road_combined" in scores:
            row["road_combined"] = float(scores["road_combined"][b])
        rows.append({name: row[name] for name in road_columns(settings)})
    return rows
