"""Grad-CAM for ViT (docs/protocol.md 2.5): channel weights = grid mean of the gradient of the target
logit w.r.t. the tokens entering the last attention (`blocks[-1].norm1`); map =
ReLU(sum_c w_c T_c) over the patch tokens. Later layers are useless here: after the last
attention the patch tokens no longer reach the CLS output, so their gradients are zero."""

from __future__ import annotations

import torch

from .base import Explainer, target_score
from .registry import register_explainer


@register_explainer("gradcam")
class GradCAM(Explainer):
    """Grad-CAM on the activations of `blocks[-1].norm1`; works with fused attention and with
    average-pooled models (it never reads the CLS row)."""

    passes_per_image = "1 forward + 1 backward"
    needs_class_token = False

    def explain(self, images, targets):
        captured: list[torch.Tensor] = []

        def keep(module, args, output):
            if not output.requires_grad:  # frozen weights: make the activation a graph leaf
                output = output.detach().requires_grad_(True)
            captured.append(output)
            return output

        handle = self.model.blocks[-1].norm1.register_forward_hook(keep)
        try:
            with torch.enable_grad():
                logits = self.model(images)
                used = self.resolve_targets(logits, targets)
                (grads,) = torch.autograd.grad(target_score(logits, used), captured)
        finally:
            handle.remove()
        tokens = captured[0][:, self.num_prefix:].float()  # [B, G, C]
        weights = grads[:, self.num_prefix:].float().mean(1, keepdim=True)  # grid mean, [B, 1, C]
        cam = (tokens * weights).sum(-1).clamp(min=0)  # [B, G]
        gh, gw = self.grid
        return cam.reshape(-1, gh, gw), logits, used
