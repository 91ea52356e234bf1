"""ViT-CX (Xie, Li, Wong, Hou, Lu and Zhang, IJCAI 2023, "ViT-CX: Causal Explanation of Vision
Transformers").

Masks come from the patch embeddings at `target_layer` (default `blocks.-1.norm1`, the authors'
example): every embedding channel, on the patch grid, is upsampled (bilinear) to the input size
and min-max scaled to [0, 1]. Channels whose masks are alike are merged: complete-linkage
agglomerative clustering on the cosine distance, merging below `distance_threshold`; a merged
mask is the min-max scaled sum of its channels' masks. Each mask M_i is scored by its causal
impact with the noise correction of the paper: with Gaussian noise e_i of std `noise_std` on the
uncovered part, s_i = p(x M_i + e_i (1 - M_i)) - p(x + e_i (1 - M_i)) + p(x) for the target's
softmax probability p. The pixel map is the density-corrected sum
S = (1/N) sum_i s_i M_i / sum_j M_j. docs/protocol.md 2.14 states the departures from the
authors' code.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from scipy.cluster.hierarchy import linkage

from wsol_bench.errors import SettingError
from wsol_bench.models import UnsupportedModelError

from .base import Explainer
from .cam_library import DEFAULT_LAYER, check_batch_size, resolve_layer
from .registry import register_explainer
from .tis import content_generator

# largest full-resolution mask stack built at once (elements); images are grouped to fit it
MASK_CHUNK = 2 ** 26


def upsample(grids: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """[..., gh, gw] -> [..., H, W], bilinear with align_corners=False (torchvision's Resize)."""
    lead = grids.shape[:-2]
    full = F.interpolate(grids.reshape(-1, 1, *grids.shape[-2:]), size=size, mode="bilinear", align_corners=False)
    return full.reshape(*lead, *size)


def min_max(masks: torch.Tensor) -> torch.Tensor:
    """Each mask [..., H, W] scaled to [0, 1] by its own minimum and maximum."""
    flat = masks.flatten(-2)
    low, high = flat.amin(-1, keepdim=True), flat.amax(-1, keepdim=True)
    return ((flat - low) / (high - low)).reshape(masks.shape)


def merge_labels(distance: np.ndarray, threshold: float) -> np.ndarray:
    """Cluster label of each of n items from their [n, n] distances: complete linkage, every
    merge at a distance below `threshold` made (scikit-learn's AgglomerativeClustering with
    `distance_threshold`, which runs the same scipy linkage). Labels are numbered by each
    cluster's first item, so they do not depend on the linkage's internal order."""
    n = len(distance)
    parent = np.arange(2 * n - 1)
    if n > 1:
        rows, cols = np.triu_indices(n, k=1)
        for step, (a, b, height, _size) in enumerate(linkage(distance[rows, cols].astype(np.float64), "complete")):
            if height >= threshold:
                break  # complete-linkage heights never decrease: no later merge is below it
            parent[int(a)] = parent[int(b)] = n + step
    roots = np.array([_root(parent, i) for i in range(n)])
    _, first = np.unique(roots, return_index=True)
    order = {root: label for label, root in enumerate(roots[np.sort(first)])}
    return np.array([order[root] for root in roots], dtype=np.int64)


def _root(parent: np.ndarray, item: int) -> int:
    """The last merge that absorbed `item` (itself if none)."""
    while parent[item] != item:
        item = parent[item]
    return int(item)


@register_explainer("vit_cx")
class ViTCX(Explainer):
    """ViT-CX: masks = merged, min-max scaled channels of `target_layer`'s patch embeddings;
    causal impact scores with the noise correction; density-corrected pixel map."""

    resolution = "pixel"
    passes_per_image = ("1 forward + 2N forwards, N = masks left after merging target_layer's C channels "
                        "(N <= C: 384 ViT-S, 768 ViT-B, 96 the shipped model), batch_size inputs per pass")
    needs_class_token = False  # the masks perturb pixels; the model pools as it likes

    def __init__(self, model, target_layer: str = DEFAULT_LAYER, distance_threshold: float = 0.1,
                 noise_std: float = 0.1, batch_size: int = 50, seed: int = 0) -> None:
        super().__init__(model)
        self.layer, _parent, _key = resolve_layer(model, target_layer, self.name)
        for name, value in (("distance_threshold", distance_threshold), ("noise_std", noise_std)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value)
                                                                                       and value >= 0):
                raise SettingError(f"vit_cx: {name}={value!r}; valid: a finite number >= 0")
        self.threshold, self.noise_std = float(distance_threshold), float(noise_std)
        self.batch_size = check_batch_size(self.name, batch_size)
        self.seed = int(seed)

    @torch.no_grad()
    def explain(self, images, targets):
        logits, channels = self._record(images)
        used = self.resolve_targets(logits, targets)
        size = tuple(images.shape[-2:])
        merged = self._merged_grids(channels, size)  # per image: [N_b, gh, gw]
        class_p = logits.float().softmax(-1).gather(1, used[:, None])[:, 0]
        numerator = torch.zeros(len(images), *size, device=images.device)
        density = torch.zeros_like(numerator)
        generators = [content_generator(image, self.seed) for image in images]
        pairs = [(b, k) for b, grids in enumerate(merged) for k in range(len(grids))]
        per_pass = max(1, self.batch_size // 2)  # a mask and its noise-only twin share a pass
        for begin in range(0, len(pairs), per_pass):
            chunk = pairs[begin:begin + per_pass]
            owner = torch.tensor([b for b, _ in chunk], device=images.device)
            masks = min_max(upsample(torch.stack([merged[b][k] for b, k in chunk]), size))
            # mask k of image b takes the k-th draw of image b's generator: the same in any batch
            noise = torch.stack([torch.randn(3, *size, generator=generators[b]) for b, _ in chunk])
            outside = noise.to(images.device) * self.noise_std * (1 - masks[:, None])
            inputs = torch.cat([images[owner] * masks[:, None] + outside, images[owner] + outside])
            probabilities = self.model(inputs).float().softmax(-1)
            target_p = probabilities.gather(1, used[owner].repeat(2)[:, None])[:, 0]
            impact = target_p[:len(owner)] - target_p[len(owner):] + class_p[owner]
            numerator.index_add_(0, owner, impact[:, None, None] * masks)
            density.index_add_(0, owner, masks)
        counts = torch.tensor([len(grids) for grids in merged], device=images.device, dtype=torch.float32)
        # a pixel every mask leaves at 0 has no estimate: 0 / 0 = NaN, as in the authors' code
        return numerator / density / counts[:, None, None], logits, used

    def _record(self, images):
        """One forward: logits [B, C] and target_layer's patch tokens as channels [B, D, gh, gw]."""
        seen: list[torch.Tensor] = []
        handle = self.layer.register_forward_hook(lambda _m, _a, out: seen.append(out))
        try:
            logits = self.model(images)
        finally:
            handle.remove()
        gh, gw = self.grid
        tokens = seen[0] if len(seen) == 1 else None
        if not isinstance(tokens, torch.Tensor) or tokens.ndim != 3 or tokens.shape[1] != self.num_prefix + gh * gw:
            raise UnsupportedModelError(f"vit_cx: the target layer of {type(self.model).__name__} must run once and "
                                        f"give [B, {self.num_prefix} + {gh * gw} tokens, D]; choose another "
                                        "method.vit_cx.params.target_layer")
        patches = tokens[:, self.num_prefix:].float()
        return logits, patches.transpose(1, 2).reshape(len(images), -1, gh, gw)

    def _merged_grids(self, channels: torch.Tensor, size: tuple[int, int]) -> list[torch.Tensor]:
        """Per image, one grid per merged mask [N, gh, gw]. A merged mask is min_max(sum of its
        channels' min-max scaled masks) = min_max(upsample(sum of channel / its range)): bilinear
        upsampling is linear and keeps constants, and min_max removes the offsets, so the grids
        suffice and no full-size mask is kept. Constant channels (no spatial information) are
        left out."""
        group = max(1, MASK_CHUNK // (channels.shape[1] * size[0] * size[1]))
        merged = []
        for begin in range(0, len(channels), group):
            grids = channels[begin:begin + group]
            cosine, spread = mask_similarity(grids, size)
            # constant on the grid, so constant in exact arithmetic (upsampling rounds it unevenly)
            varying = grids.flatten(-2).amax(-1) > grids.flatten(-2).amin(-1)
            for b in range(len(grids)):  # the linkage is scipy's, one image at a time
                keep = varying[b].nonzero()[:, 0]
                labels = merge_labels((1 - cosine[b][keep][:, keep]).cpu().numpy(), self.threshold)
                sums = torch.zeros(int(labels.max(initial=-1)) + 1, *grids.shape[-2:], device=grids.device)
                merged.append(sums.index_add_(0, torch.as_tensor(labels, device=grids.device),
                                              grids[b][keep] / spread[b][keep, None, None]))
        return merged


def mask_similarity(grids: torch.Tensor, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Channels [B, D, gh, gw] upsampled to `size` and min-max scaled: their pairwise cosine
    similarity [B, D, D] and each channel's range at full size [B, D] (constant channels give
    NaN rows, for the caller to leave out)."""
    full = upsample(grids, size).flatten(-2)
    low, high = full.amin(-1), full.amax(-1)
    masks = (full - low[..., None]) / (high - low)[..., None]
    norms = masks.norm(dim=-1)
    return masks @ masks.transpose(1, 2) / (norms[..., :, None] * norms[..., None, :]), high - low
