"""LeGrad (Bousselham et al., ICCV 2025), docs/protocol.md 2.10.

Every block l from `start_layer` on is read through the model's own final norm and head (its
"logit lens"): s^l = head(norm(x^l)), x^l the block's output tokens, pooled as the model pools
(class token, distillation heads, average). E^l = mean over heads and query rows of
ReLU(ds^l_c / dA^l), A^l the block's post-softmax attention; map = sum_l E^l over the patch
columns. The last block's lens is the model's own output, which is checked on every batch.
One forward, then one backward per block, each only from that block's lens to its attention.
"""

from __future__ import annotations

import torch
from torch import nn

from wsol_bench.errors import SettingError
from wsol_bench.methods.capture import AttentionCapture, UnsupportedModelError

from .base import Explainer, check_start_layer, target_score
from .registry import register_explainer


def minmax_rows(scores: torch.Tensor) -> torch.Tensor:
    """Each row of [B, P] scaled to [0, 1]; a constant row becomes 0 (it carries no ranking)."""
    low = scores.amin(1, keepdim=True)
    span = scores.amax(1, keepdim=True) - low
    return torch.where(span > 0, (scores - low) / span.clamp(min=torch.finfo(scores.dtype).tiny), 0.0)


@register_explainer("legrad")
class LeGrad(Explainer):
    """Layer-wise attention gradients of each block's own class score, summed over blocks."""

    # The lens reads the model's own pooling, so average-pooled models are explained too.
    needs_class_token = False
    passes_per_image = "1 forward + 1 backward per block from start_layer (from its lens to its attention)"

    def __init__(self, model: nn.Module, start_layer: int = 0, layer_minmax: bool = False) -> None:
        super().__init__(model)
        for part in ("blocks", "norm", "forward_head"):
            if not hasattr(model, part):
                raise UnsupportedModelError(f"legrad: {type(model).__name__} has no `{part}`; its logit "
                                            "lens reads each block through the model's final norm and "
                                            "forward_head")
        self.start_layer = check_start_layer(self.name, start_layer, len(model.blocks))
        if not isinstance(layer_minmax, bool):
            raise SettingError(f"legrad: layer_minmax={layer_minmax!r} must be true or false")
        self.layer_minmax = layer_minmax

    def explain(self, images, targets):
        blocks = list(self.model.blocks)
        outputs: list[torch.Tensor] = []
        handles = [blk.register_forward_hook(lambda _m, _a, out: outputs.append(out)) for blk in blocks]
        try:
            with torch.enable_grad(), AttentionCapture(self.model, gradients=True) as cap:
                logits = self.model(images)
                cap.check()  # one attention per block, indexed like the blocks below
                used = self.resolve_targets(logits, targets)
                self._check_lens(outputs[-1], logits)
                total = 0.0
                for index in range(self.start_layer, len(blocks)):
                    lens = logits if index == len(blocks) - 1 else self.lens(outputs[index])
                    # Each attention is a leaf, so the paths from each lens to its own block's
                    # attention share no node: every backward may free what it ran through.
                    (grad,) = torch.autograd.grad(target_score(lens, used), cap.attentions[index])
                    layer = self.patch_map(grad.float().clamp(min=0).mean((1, 2))).flatten(1)  # heads, queries
                    total = total + (minmax_rows(layer) if self.layer_minmax else layer)
        finally:
            for handle in handles:
                handle.remove()
        return total.reshape(len(images), *self.grid), logits, used

    def lens(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B, C] class scores of a block's output tokens through the model's final norm and head."""
        return self.model.forward_head(self.model.norm(tokens))

    @torch.no_grad()
    def _check_lens(self, last_tokens: torch.Tensor, logits: torch.Tensor) -> None:
        """The lens of the last block must be the model's output; a model whose forward adds
        anything after its blocks (or pools otherwise) would make every layer's score wrong."""
        lens = self.lens(last_tokens)
        scale = max(1.0, float(logits.abs().max()))
        if lens.shape != logits.shape or not torch.allclose(lens, logits, rtol=0, atol=1e-4 * scale):
            raise UnsupportedModelError(f"legrad: forward_head(norm(last block)) does not reproduce "
                                        f"{type(self.model).__name__}'s logits, so no block's logit lens is "
                                        "its class score; this model is not supported")
