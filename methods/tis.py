"""Transformer Input Sampling, TIS (Englebert, Stassin, Nanfack, Mahmoudi, Siebert, Cornu and
De Vleeschouwer, ICCV 2023 workshops, "Explaining through Transformer Input Sampling").

One forward records every block's output tokens. Their patch tokens, concatenated over the
blocks, give one point per embedding channel (depth x width points, each a vector over the
patches); k-means groups these points into `n_masks` centroids. Each centroid keeps its
`tokens_ratio` highest patches: a token subset. The model is then run on each subset alone (the
other patch tokens are removed from the sequence after the position embedding, not blacked out
in the image), and the map is the sum of the subsets' masks weighted by the softmax score of the
target, divided by how many masks hold each patch. docs/protocol.md 2.13 states the
departures from the authors' code.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence

import torch
from torch import nn

from wsol_bench.errors import SettingError
from wsol_bench.models import UnsupportedModelError

from .base import Explainer
from .registry import register_explainer

log = logging.getLogger("wsol_bench")

# the authors' k-means (fast-pytorch-kmeans' defaults): at most 100 Lloyd steps, stopping once
# the summed squared shift of all centroids is at most 1e-4
KMEANS_MAX_ITER = 100
KMEANS_TOL = 1e-4
# largest point-to-centroid similarity tensor built at once (elements); images are clustered in
# groups that fit it
KMEANS_CHUNK = 2 ** 26


def content_generator(image: torch.Tensor, seed: int) -> torch.Generator:
    """A CPU generator seeded by (seed, the image's bytes): an image draws the same numbers in
    any batch, at any position, on any device."""
    digest = hashlib.blake2b(image.detach().float().cpu().contiguous().numpy().tobytes(), digest_size=8,
                             key=int(seed).to_bytes(8, "little", signed=True)).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & (2 ** 63 - 1))


def euclidean_similarity(points: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """[B, P, F] x [B, K, F] -> [B, P, K]: minus the squared distance, in the authors' form
    2 x.c - |x|^2 - |c|^2."""
    return (2 * points @ centroids.transpose(-2, -1) - (points ** 2).sum(-1)[..., :, None]
            - (centroids ** 2).sum(-1)[..., None, :])


def batched_kmeans(points: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
    """Lloyd's k-means of each image's points [B, P, F] from the points indexed by `start`
    [B, K]; returns the centroids [B, K, F]. Each image stops on its own, after the step whose
    summed squared centroid shift is at most KMEANS_TOL; a cluster left empty becomes the zero
    vector, as in the authors' k-means."""
    centroids = points.gather(1, start[..., None].expand(-1, -1, points.shape[-1]))
    active = torch.ones(len(points), dtype=torch.bool, device=points.device)
    clusters = torch.arange(start.shape[1], device=points.device)
    for _ in range(KMEANS_MAX_ITER):
        closest = euclidean_similarity(points, centroids).argmax(-1)  # [B, P]; first of ties
        members = (closest[:, None, :] == clusters[None, :, None]).to(points.dtype)  # [B, K, P]
        means = torch.nan_to_num(members @ points / members.sum(-1, keepdim=True), nan=0.0)
        shift = (means - centroids).pow(2).sum((1, 2))
        centroids = torch.where(active[:, None, None], means, centroids)
        active = active & (shift > KMEANS_TOL)
        if not active.any():
            break
    return centroids


def check_ratios(tokens_ratio, patches: int) -> list[float]:
    """`tokens_ratio` as a list of ratios in (0, 1], each keeping at least one of `patches`."""
    ratios = [tokens_ratio] if isinstance(tokens_ratio, (int, float)) else tokens_ratio
    if isinstance(ratios, (str, bytes)) or not isinstance(ratios, Sequence) or not len(ratios) or any(
            isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 < r <= 1 for r in ratios):
        raise SettingError(f"tis: tokens_ratio={tokens_ratio!r}; valid: a number in (0, 1] or a list of them "
                           "(the share of patch tokens each mask keeps)")
    too_small = [r for r in ratios if int(r * patches) < 1]
    if too_small:
        raise SettingError(f"tis: tokens_ratio={too_small[0]} keeps no token of the model's {patches} patches; "
                           f"use a ratio of at least {1 / patches:.3g}")
    return [float(r) for r in ratios]


def positive_int(name: str, value) -> int:
    """`value` as an integer >= 1, else a SettingError naming tis.`name`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise SettingError(f"tis: {name}={value!r}; valid: an integer >= 1")
    return value


@register_explainer("tis")
class TransformerInputSampling(Explainer):
    """TIS: masks = top `tokens_ratio` patches of the k-means centroids of the blocks' embedding
    channels; score of a mask = softmax probability of the target with only its patch tokens
    (and the prefix tokens) in the sequence; map = sum of score x mask / sum of masks."""

    passes_per_image = ("1 forward + min(n_masks, depth x embed_dim) x len(tokens_ratio) forwards on token "
                        "subsets (prefix + int(ratio x gh*gw) patch tokens), batch_size subsets per pass: 1 + 1024 "
                        "at the defaults on ViT-S/B, 1 + 576 on the shipped model")
    needs_class_token = False  # the subsets keep every prefix token; pooled heads average what is left

    def __init__(self, model, n_masks: int = 1024, batch_size: int = 128, tokens_ratio=0.5, seed: int = 0) -> None:
        super().__init__(model)
        if not isinstance(getattr(model, "pos_drop", None), nn.Module) or getattr(model, "blocks", None) is None:
            raise UnsupportedModelError(f"tis: {type(model).__name__} has no `pos_drop` and `blocks`; TIS removes "
                                        "tokens after the position embedding of a timm VisionTransformer")
        self.n_masks = positive_int("n_masks", n_masks)
        self.batch_size = positive_int("batch_size", batch_size)
        self.ratios = check_ratios(tokens_ratio, self.grid[0] * self.grid[1])
        self.seed = int(seed)
        channels = int(getattr(model, "embed_dim", 0)) * len(model.blocks)
        if 0 < channels < self.n_masks:
            # k-means cannot make more clusters than points; with K >= points each channel is its
            # own cluster, so K = points is what any larger n_masks computes
            log.warning("tis: n_masks=%d > the %d embedding channels of %s (%d blocks x %d); each channel is "
                        "one mask (%d masks)", self.n_masks, channels, type(model).__name__, len(model.blocks),
                        channels // len(model.blocks), channels)

    @torch.no_grad()
    def explain(self, images, targets):
        logits, tokens, channels = self._record(images)
        used = self.resolve_targets(logits, targets)
        count = min(self.n_masks, channels.shape[1])
        start = torch.stack([torch.randperm(channels.shape[1], generator=content_generator(image, self.seed))[:count]
                             for image in images]).to(images.device)
        centroids = torch.cat([batched_kmeans(channels[group], start[group]) for group in self._groups(channels, count)])
        gh, gw = self.grid
        numerator = torch.zeros(len(images), gh * gw, device=images.device)
        coverage = torch.zeros_like(numerator)
        for ratio in self.ratios:
            kept = centroids.topk(int(ratio * gh * gw), dim=-1).indices  # [B, M, k], the authors' token order
            masks = torch.zeros(*centroids.shape, device=images.device).scatter_(-1, kept, 1.0)
            scores = self._subset_scores(images, tokens, kept, used)  # [B, M]
            numerator += (scores[..., None] * masks).sum(1)
            coverage += masks.sum(1)
        # a patch that no mask keeps has no estimate: 0 / 0 = NaN, as in the authors' code
        return (numerator / coverage).reshape(-1, gh, gw), logits, used

    def _record(self, images):
        """One forward: logits [B, C], the embedded tokens entering the blocks [B, N, D], and the
        patch tokens of every block output, channels as points: [B, depth x D, gh*gw]."""
        outputs: list[torch.Tensor] = []
        embedded: list[torch.Tensor] = []
        handles = [block.register_forward_hook(lambda _m, _a, out: outputs.append(out)) for block in self.model.blocks]
        handles.append(self.model.pos_drop.register_forward_hook(lambda _m, _a, out: embedded.append(out)))
        try:
            logits = self.model(images)
        finally:
            for handle in handles:
                handle.remove()
        patches = self.grid[0] * self.grid[1]
        if len(embedded) != 1 or len(outputs) != len(self.model.blocks) or any(
                o.ndim != 3 or o.shape[1] != self.num_prefix + patches for o in [*embedded, *outputs]):
            raise UnsupportedModelError(f"tis: {type(self.model).__name__} does not pass [B, {self.num_prefix} + "
                                        f"{patches} tokens, D] from `pos_drop` through every block once")
        channels = torch.cat(outputs, dim=-1)[:, self.num_prefix:].transpose(1, 2).float()
        return logits, embedded[0], channels

    def _groups(self, channels: torch.Tensor, count: int) -> list[slice]:
        """Slices of images whose k-means similarity tensors fit KMEANS_CHUNK elements together."""
        per_group = max(1, KMEANS_CHUNK // (channels.shape[1] * count))
        return [slice(i, i + per_group) for i in range(0, len(channels), per_group)]

    def _subset_scores(self, images, tokens, kept, targets) -> torch.Tensor:
        """softmax(model(prefix tokens + kept patch tokens))[target] for every image and mask:
        [B, M]; `batch_size` subsets per forward, the model's own blocks, norm and head."""
        batch, masks, keep = kept.shape
        owner = torch.arange(batch, device=kept.device).repeat_interleave(masks)  # subset -> image
        flat = kept.reshape(batch * masks, keep)
        prefix, patch_tokens = tokens[:, :self.num_prefix], tokens[:, self.num_prefix:]
        subset: list[torch.Tensor] = []
        # the hook replaces the embedded tokens of the image passed (any one) by the chunk's subsets
        handle = self.model.pos_drop.register_forward_hook(lambda _m, _a, _out: subset[0])
        scores = []
        try:
            for begin in range(0, len(flat), self.batch_size):
                index, who = flat[begin:begin + self.batch_size], owner[begin:begin + self.batch_size]
                picked = patch_tokens[who].gather(1, index[..., None].expand(-1, -1, tokens.shape[-1]))
                subset[:] = [torch.cat([prefix[who], picked], dim=1)]
                probabilities = self.model(images[:1]).float().softmax(-1)
                scores.append(probabilities.gather(1, targets[who][:, None])[:, 0])
        finally:
            handle.remove()
        return torch.cat(scores).reshape(batch, masks)
