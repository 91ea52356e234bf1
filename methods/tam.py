"""Transition Attention Maps (Yuan et al., 2021, "Explaining Information Flow Inside Vision
Transformers Using Markov Chain"), docs/protocol.md 2.11.

The class token's state after the last block is the last attention's CLS row; going down,
each block's head-mean attention with the residual, Abar^l + I, is the transition matrix of
a Markov chain: state = e_0^T Abar^{L-1} (Abar^{L-2} + I) ... (Abar^s + I), s = `start_layer`.
It is weighted by the integrated gradient of the target logit at the last attention:
W = mean_h ReLU(mean over alpha in linspace(0, 1, steps) of dy_c/dA^{L-1}(alpha * x))[CLS row];
map = state * W over the patch columns. One forward, then `steps` forward+backward passes, each
over the whole batch and differentiating only the last block.
"""

from __future__ import annotations

import torch
from torch import nn

from wsol_bench.errors import SettingError
from wsol_bench.methods.capture import AttentionCapture, attention_modules

from .base import Explainer, check_start_layer, target_score
from .registry import register_explainer


def transition_state(attentions: list[torch.Tensor], start_layer: int = 0) -> torch.Tensor:
    """[B, N] class-token state e_0^T Abar^{L-1} (Abar^{L-2} + I) ... (Abar^s + I) from the
    head-mean attentions [B, N, N] of every block, the chain read as a row vector (O(N^2) per
    block, never an N x N product)."""
    state = attentions[-1][:, 0]
    for attention in reversed(attentions[start_layer:-1]):
        state = state + (state.unsqueeze(1) @ attention).squeeze(1)
    return state


class LastAttentionLeaf:
    """Forward hook on the last block's attention dropout: its output becomes a fresh leaf
    that requires grad, so with frozen weights only the last block is recorded for autograd."""

    def __init__(self, attention: nn.Module) -> None:
        self.value: torch.Tensor | None = None
        self.handle = attention.attn_drop.register_forward_hook(self._hook)

    def _hook(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        self.value = output.detach().requires_grad_(True)
        return self.value


@register_explainer("tam")
class TransitionAttentionMaps(Explainer):
    """Markov-chain attention state weighted by the integrated last-attention gradient."""

    passes_per_image = "1 forward + steps (forward + backward through the last block)"

    def __init__(self, model: nn.Module, start_layer: int = 0, steps: int = 20) -> None:
        super().__init__(model)
        self.start_layer = check_start_layer(self.name, start_layer, len(attention_modules(model)))
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 2:
            raise SettingError(f"tam: steps={steps!r} must be an integer >= 2 (the path linspace(0, 1, "
                               "steps) holds both the zero image and the image)")
        self.steps = steps

    def explain(self, images, targets):
        with AttentionCapture(self.model) as cap:  # fused attention off for every pass below
            with torch.no_grad():
                logits = self.model(images)
            cap.check()  # one attention per block, or the chain would skip blocks
            used = self.resolve_targets(logits, targets)
            state = transition_state([a.float().mean(1) for a in cap.attentions], self.start_layer)
            weights = self._integrated_gradient(images, used, cap)
        return self.patch_map(state * weights), logits, used

    def _integrated_gradient(self, images: torch.Tensor, targets: torch.Tensor,
                             cap: AttentionCapture) -> torch.Tensor:
        """[B, N]: mean_h ReLU(path mean of dy_c / dA^{L-1}), class-token row."""
        leaf = LastAttentionLeaf(cap.modules[-1])
        total = None
        try:
            for alpha in (i / (self.steps - 1) for i in range(self.steps)):  # numpy's linspace(0, 1, steps)
                cap.reset()  # the capture would otherwise keep every pass's attentions
                with torch.enable_grad():
                    score = target_score(self.model(images * alpha), targets)
                    (grad,) = torch.autograd.grad(score, leaf.value)
                row = grad[:, :, 0].float()  # only the class-token row is read
                total = row if total is None else total + row
        finally:
            leaf.handle.remove()
        return (total / self.steps).clamp(min=0).mean(1)
