"""Generic attention explainability (Chefer, Gur, Wolf, ICCV 2021), docs/protocol.md 2.4:
R = I; for every block, R = R + mean_h(clamp(dy_c/dA * A, min=0)) @ R; map = R[CLS, patches].
One forward and one backward, gradients through the unmodified model."""

from __future__ import annotations

import torch

from wsol_bench.methods.capture import AttentionCapture

from .base import Explainer, target_score
from .registry import register_explainer


@register_explainer("generic_attention")
class GenericAttention(Explainer):
    """Gradient-weighted attention accumulated over the layers."""

    passes_per_image = "1 forward + 1 backward"

    def explain(self, images, targets):
        with torch.enable_grad(), AttentionCapture(self.model, gradients=True) as cap:
            logits = self.model(images)
            used = self.resolve_targets(logits, targets)
            grads = cap.attention_grads(target_score(logits, used))
        n = grads[0].shape[-1]
        relevance = torch.eye(n, device=images.device).expand(len(images), n, n)
        for attention, grad in zip(cap.attentions, grads):
            weighted = (grad.float() * attention.detach().float()).clamp(min=0).mean(1)
            relevance = relevance + weighted @ relevance
        return self.patch_map(relevance[:, 0]), logits, used
