"""Attention Rollout (Abnar & Zuidema 2020), with the AG-CAM evaluation's settings as
defaults (mean head fusion, no discarding, all layers). Class-agnostic: the target only
labels the record, it does not change the map."""

from __future__ import annotations

import torch

from wsol_bench.errors import SettingError
from wsol_bench.methods.capture import AttentionCapture

from .base import Explainer, check_start_layer
from .registry import register_explainer

HEAD_FUSIONS = ("mean", "max", "min")


def fuse_heads(attention: torch.Tensor, how: str) -> torch.Tensor:
    """[B, H, N, N] -> [B, N, N] by mean, max or min over heads."""
    if how == "mean":
        return attention.mean(1)
    return attention.amax(1) if how == "max" else attention.amin(1)


def discard_lowest(fused: torch.Tensor, ratio: float) -> torch.Tensor:
    """Zero the `ratio` smallest entries of each image's matrix, never the CLS->CLS entry."""
    if ratio <= 0:
        return fused
    b, n, _ = fused.shape
    flat = fused.reshape(b, n * n).clone()
    k = int(n * n * ratio)
    lowest = flat.topk(k, dim=1, largest=False).indices
    drop = torch.zeros_like(flat, dtype=torch.bool).scatter_(1, lowest, True)
    drop[:, 0] = False  # as the reference: CLS->CLS is skipped, not replaced by the next lowest
    return flat.masked_fill(drop, 0.0).reshape(b, n, n)


@register_explainer("rollout")
class AttentionRollout(Explainer):
    """R = a^L ... a^(s+1) with a = rownorm((fused A + I) / 2) and s = `start_layer` (0: every
    block, the AG-CAM evaluation; Chefer et al.'s segmentation script: 1); map = R[:, CLS, patches]."""

    passes_per_image = "1 forward"
    class_specific = False

    def __init__(self, model, head_fusion: str = "mean", discard_ratio: float = 0.0, start_layer: int = 0) -> None:
        super().__init__(model)
        if head_fusion not in HEAD_FUSIONS:
            raise SettingError(f"rollout: head_fusion={head_fusion!r}; valid: {HEAD_FUSIONS}")
        if not 0.0 <= discard_ratio < 1.0:
            raise SettingError(f"rollout: discard_ratio={discard_ratio} must be in [0, 1)")
        self.start_layer = check_start_layer(self.name, start_layer, len(model.blocks))
        self.head_fusion, self.discard_ratio = head_fusion, float(discard_ratio)

    @torch.no_grad()
    def explain(self, images, targets):
        with AttentionCapture(self.model) as cap:
            logits = self.model(images)
        cap.check()
        used = self.resolve_targets(logits, targets)
        n = cap.attentions[0].shape[-1]
        eye = torch.eye(n, device=images.device, dtype=torch.float32)
        rollout = eye.expand(len(images), n, n)
        for attention in cap.attentions[self.start_layer:]:
            fused = discard_lowest(fuse_heads(attention.float(), self.head_fusion), self.discard_ratio)
            a = (fused + eye) / 2
            a = a / a.sum(-1, keepdim=True)
            rollout = a @ rollout
        return self.patch_map(rollout[:, 0]), logits, used
