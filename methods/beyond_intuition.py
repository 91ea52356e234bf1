"""Beyond Intuition (Chen, Li, Yu, Dou & Xiong, TMLR 2023), docs/protocol.md 2.12: token
attributions as attention perception times reasoning feedback.

- Attention perception, per block l from `start_layer` s to the last, at the image itself:
  `bt_h` (head-wise) weights each head by I_h = mean_ij |(A_h^T G_h)_ij|, normalised over the
  heads of each image (G = dy_c/dA), and fuses Abar = sum_h I_h A_h; `bt_t` (token-wise) scales
  column j of the head-mean attention by o_j = ||v_j W_proj^T|| / ||z_j||, the norm of token j's
  value as the branch adds it to the residual stream over the norm of the block's input z.
  P = (I + Abar^{L-1}) ... (I + Abar^s).
- Reasoning feedback: integrated gradients of the last block's attention, W = mean_h
  max(mean_k dy_c/dA^{L-1}(alpha_k x), 0) over alpha_k = linspace(0, 1, steps) (a zero baseline
  in the normalised input).
- Map = W[CLS, patches] * P[CLS, patches]. (The authors' `bt_t` takes |P|; P has no negative
  entry in either method, attention and the weights I_h and o_j being non-negative.)
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from wsol_bench.errors import SettingError
from wsol_bench.methods.capture import AttentionCapture, UnsupportedModelError

from .base import Explainer, check_start_layer, target_score
from .registry import register_explainer


def check_steps(method: str, steps: int) -> int:
    """The number of integration points, an integer >= 2 (the grid must hold both the zero
    baseline and the image itself); anything else is a SettingError naming the method."""
    if isinstance(steps, bool) or int(steps) != steps or steps < 2:
        raise SettingError(f"{method}: steps={steps!r} must be an integer >= 2 (the integrated gradients run "
                           "from the zero input to the image itself)")
    return int(steps)


def head_weighted_attention(attention: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """BT-H's fused attention of one block, [B, N, N]: sum_h I_h A_h with I_h = mean |A_h^T G_h|,
    normalised to sum 1 over each image's heads. `attention`, `grad`: [B, H, N, N]."""
    importance = (attention.transpose(-1, -2) @ grad).abs().mean((-1, -2))
    importance = importance / importance.sum(1, keepdim=True)
    return (importance[:, :, None, None] * attention).sum(1)


def cls_rollout(matrices: list[torch.Tensor], column_scales: list[torch.Tensor] | None = None) -> torch.Tensor:
    """The CLS row of (I + M^{L-1}) ... (I + M^s) for `matrices` [M^s .. M^{L-1}] ([B, N, N]),
    M^l = matrices[l] diag(column_scales[l]) when scales ([B, N]) are given. Only the row is
    needed, so a row vector is multiplied from the left, last block first: O(N^2) a block."""
    row = torch.zeros(matrices[0].shape[0], matrices[0].shape[-1], device=matrices[0].device)
    row[:, 0] = 1.0
    scales = column_scales if column_scales is not None else [None] * len(matrices)
    for matrix, scale in zip(reversed(matrices), reversed(scales)):
        step = (row.unsqueeze(1) @ matrix).squeeze(1)
        row = row + (step if scale is None else step * scale)
    return row


class ValueCapture:
    """Record, per block, its input z (the residual stream) and the value of every token as the
    attention branch adds it to that stream, v W_proj^T (times LayerScale's gamma when the block
    has one), both detached, [B, N, D]. Hooks are removed on exit."""

    def __init__(self, model: nn.Module, method: str) -> None:
        self.blocks = list(model.blocks)
        for i, block in enumerate(self.blocks):
            attn = block.attn
            if not isinstance(getattr(attn, "norm", nn.Identity()), nn.Identity) or getattr(attn, "gate", None) is not None:
                raise UnsupportedModelError(f"{method}: {type(model).__name__} block {i} normalises or gates the "
                                            "attention output, so a token's value is not v W_proj^T")
            if not isinstance(getattr(attn, "proj", None), nn.Linear):
                raise UnsupportedModelError(f"{method}: {type(model).__name__} block {i} has no linear "
                                            "attention output projection `attn.proj`")
        self.inputs: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self._handles: list = []

    def _input_hook(self, module: nn.Module, args: tuple) -> None:
        self.inputs.append(args[0].detach().float())

    def _value_hook(self, block: nn.Module):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            attn = block.attn
            b, n = output.shape[:2]
            v = output.detach().float().reshape(b, n, 3, attn.num_heads, -1)[:, :, 2].reshape(b, n, -1)
            value = v @ attn.proj.weight.float().t()  # the output projection without its bias
            gamma = getattr(getattr(block, "ls1", None), "gamma", None)
            self.values.append(value if gamma is None else value * gamma.detach().float())
        return hook

    def __enter__(self) -> ValueCapture:
        for block in self.blocks:
            self._handles.append(block.register_forward_pre_hook(self._input_hook))
            self._handles.append(block.attn.qkv.register_forward_hook(self._value_hook(block)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def token_scales(self) -> list[torch.Tensor]:
        """o^l = ||value_j|| / ||z_j|| per block and token, [B, N] each."""
        if len(self.inputs) != len(self.blocks) or len(self.values) != len(self.blocks):
            raise UnsupportedModelError(f"captured {len(self.inputs)} block inputs and {len(self.values)} values "
                                        f"for {len(self.blocks)} blocks: a non-standard block skipped the hooks")
        return [value.norm(dim=-1) / z.norm(dim=-1) for z, value in zip(self.inputs, self.values)]


class BeyondIntuition(Explainer):
    """Shared by `bt_h` and `bt_t`: the pass at the image (logits, targets, the perception's
    inputs) and the integrated gradients of the last attention."""

    passes_per_image = "steps (forward + backward), one of them at the image itself: 20 at the default"
    token_wise = False

    def __init__(self, model, start_layer: int = 0, steps: int = 20) -> None:
        super().__init__(model)
        self.start_layer = check_start_layer(self.name, start_layer, len(model.blocks))
        self.steps = check_steps(self.name, steps)
        if self.token_wise:
            ValueCapture(model, self.name)  # refuses blocks whose value path it cannot read

    def explain(self, images, targets):
        # alpha_k = k / (steps - 1), the last exactly 1 (the image itself), as numpy's linspace
        alphas = [k * (1.0 / (self.steps - 1)) for k in range(self.steps - 1)] + [1.0]
        perception, logits, used, last_at_image = self._pass_at_image(images, targets)
        # dy_c/dA^{L-1} at every alpha_k * x, in the grid's order; alpha = 1 is the pass above
        rows = [last_at_image if alpha == 1.0 else self._last_attention_grad(images * alpha, used)
                for alpha in alphas]
        feedback = (torch.stack(rows).sum(0) / self.steps).clamp(min=0).mean(1)
        return self.patch_map(feedback * perception), logits, used

    def _pass_at_image(self, images, targets):
        """One forward and backward at the image: (the CLS row of P [B, N], logits, targets, the
        CLS row of dy_c/dA^{L-1} [B, H, N])."""
        values = ValueCapture(self.model, self.name) if self.token_wise else contextlib.nullcontext()
        with torch.enable_grad(), AttentionCapture(self.model, gradients=True) as cap, values:
            logits = self.model(images)
            used = self.resolve_targets(logits.detach(), targets)
            score = target_score(logits, used)
            if self.token_wise:
                cap.check()
                grads = [None] * (len(cap.attentions) - 1) + list(torch.autograd.grad(score, cap.attentions[-1]))
            else:
                grads = cap.attention_grads(score)
        attentions = [a.detach().float() for a in cap.attentions[self.start_layer:]]
        if self.token_wise:
            scales = values.token_scales()[self.start_layer:]
            perception = cls_rollout([a.mean(1) for a in attentions], scales)
        else:
            fused = [head_weighted_attention(a, g.float()) for a, g in zip(attentions, grads[self.start_layer:])]
            perception = cls_rollout(fused)
        return perception, logits.detach(), used, grads[-1][:, :, 0].float()

    def _last_attention_grad(self, images, targets) -> torch.Tensor:
        """The CLS row of dy_c/dA^{L-1} at `images`, [B, H, N]."""
        with torch.enable_grad(), AttentionCapture(self.model, gradients=True) as cap:
            logits = self.model(images)
            cap.check()
            (grad,) = torch.autograd.grad(target_score(logits, targets), cap.attentions[-1])
        return grad[:, :, 0].float()


@register_explainer("bt_h")
class BeyondIntuitionHeadWise(BeyondIntuition):
    """Beyond Intuition, head-wise (BT-H): gradient-weighted heads rolled out, times the
    integrated gradients of the last attention."""


@register_explainer("bt_t")
class BeyondIntuitionTokenWise(BeyondIntuition):
    """Beyond Intuition, token-wise (BT-T): head-mean attention scaled by each token's value
    norm over its input norm, rolled out, times the integrated gradients of the last attention."""

    token_wise = True
