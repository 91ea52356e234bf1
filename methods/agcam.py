"""AG-CAM (Leem & Seo, AAAI 2024): gradients of the target logit w.r.t. each block's
attention, ReLU'd and guided by sigmoid-normalised CLS-row attention scores.

M = sum_l sum_h ReLU(dy_c/dA^l)[CLS row] * sigmoid(S^l)[CLS row], with the input of every
attention branch detached (the authors' model), over the patch keys. One forward, one backward.
"""

from __future__ import annotations

import torch

from wsol_bench.errors import SettingError
from wsol_bench.methods.capture import AttentionCapture

from .base import Explainer, target_score
from .registry import register_explainer

FUSIONS = ("sum", "mean")


@register_explainer("agcam")
class AGCAM(Explainer):
    """Attention-guided CAM; `head_fusion` and `layer_fusion` are "sum" (paper) or "mean"."""

    passes_per_image = "1 forward + 1 backward"

    def __init__(self, model, head_fusion: str = "sum", layer_fusion: str = "sum") -> None:
        super().__init__(model)
        for key, value in (("head_fusion", head_fusion), ("layer_fusion", layer_fusion)):
            if value not in FUSIONS:
                raise SettingError(f"agcam: {key}={value!r}; valid: {FUSIONS}")
        self.head_fusion, self.layer_fusion = head_fusion, layer_fusion

    def explain(self, images, targets):
        with torch.enable_grad(), AttentionCapture(self.model, detach_input=True, cls_scores=True) as cap:
            logits = self.model(images)
            used = self.resolve_targets(logits, targets)
            grads = cap.attention_grads(target_score(logits, used))
        cls_grads = torch.stack([g[:, :, 0, :] for g in grads], 1).float()  # [B, L, H, N]
        scores = torch.stack([s[:, :, 0, :] for s in cap.scores], 1)  # [B, L, H, N] float32
        contrib = cls_grads.clamp(min=0) * scores.sigmoid()
        contrib = getattr(contrib, self.head_fusion)(2)
        contrib = getattr(contrib, self.layer_fusion)(1)
        return self.patch_map(contrib), logits, used
