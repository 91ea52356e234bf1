"""Recording what explainers need from the attention blocks of a timm ViT.

`AttentionCapture` is a context manager: inside it (with fused attention switched off on
every attention module, and restored on exit), one forward pass of the model records,
per block and for the whole batch, the post-softmax attention matrix (kept in the autograd
graph when gradients are wanted) and, optionally, the scaled pre-softmax CLS-row scores
computed in float32 from the module's own q and k (after q_norm/k_norm). It can detach the
input of every attention branch (AG-CAM's modified forward). Every hook is removed on exit,
also when the body raises, because a leftover detach hook would silently corrupt every other
gradient method run on the same model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from wsol_bench.errors import SettingError
from wsol_bench.models import UnsupportedModelError, switch_off_fused

__all__ = ["AttentionCapture", "UnsupportedModelError", "attention_modules", "require_class_token"]


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The attention module of every block, checked for the pieces the hooks rely on."""
    name = type(model).__name__
    blocks = getattr(model, "blocks", None)
    if blocks is None or len(blocks) == 0:
        raise UnsupportedModelError(f"{name}: no `blocks`; wsol-bench explains timm "
                                    "VisionTransformer-style models")
    modules = []
    for i, block in enumerate(blocks):
        attn = getattr(block, "attn", None)
        missing = [p for p in ("qkv", "q_norm", "k_norm", "attn_drop", "scale")
                   if attn is None or not hasattr(attn, p)]
        if missing:
            raise UnsupportedModelError(
                f"{name}: block {i} ({type(block).__name__}) has no standard timm Attention "
                f"(missing {', '.join(missing)}); this block type is not supported")
        modules.append(attn)
    return modules


def require_class_token(model: nn.Module, method: str) -> None:
    """Refuse models whose prediction does not read the CLS token (e.g. global average pool)."""
    name = type(model).__name__
    if getattr(model, "cls_token", None) is None or getattr(model, "num_prefix_tokens", 0) < 1:
        raise UnsupportedModelError(f"{method} needs a class token, but {name} has none "
                                    "(class_token=False)")
    pool = getattr(model, "global_pool", "token")
    if pool != "token":
        raise UnsupportedModelError(f"{method} reads the CLS row of attention, but {name} "
                                    f"pools with global_pool={pool!r}; use a model with "
                                    "global_pool='token'")


class AttentionCapture:
    """Record attention (and optionally CLS-row scores) of every block in one forward pass.

    Args:
        model: a timm VisionTransformer with fused attention switched off.
        detach_input: detach the input of each attention branch and make it a fresh leaf that
            requires grad (AG-CAM): gradients then reach block k's attention only through the
            residual stream, never through a later attention branch.
        cls_scores: also record S = (q[:, :, :1] * scale) @ k^T in float32, [B, H, 1, N].
        gradients: keep the attention in the autograd graph so `attention_grads` can
            differentiate a score with respect to it.
    """

    def __init__(self, model: nn.Module, *, detach_input: bool = False, cls_scores: bool = False,
                 gradients: bool = False) -> None:
        self.model = model
        self.modules = attention_modules(model)
        self.detach_input = detach_input
        self.want_scores = cls_scores
        self.gradients = gradients or detach_input
        self.attentions: list[torch.Tensor] = []
        self.scores: list[torch.Tensor] = []
        self._queries: dict[int, torch.Tensor] = {}
        self._handles: list[RemovableHandle] = []
        self._fused_before: list[tuple[nn.Module, bool]] = []

    # -- hooks ------------------------------------------------------------------------------
    def _detach_hook(self, module: nn.Module, args: tuple, kwargs: dict):
        x = args[0].detach().requires_grad_(True)
        return (x, *args[1:]), kwargs

    def _attention_hook(self, index: int):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
            if self.gradients and not output.requires_grad:
                # Frozen weights and a plain input build no graph; making the attention a
                # leaf lets autograd reach it without computing any parameter gradient.
                output = output.detach().requires_grad_(True)
            self.attentions.append(output if self.gradients else output.detach())
            return output
        return hook

    def _query_hook(self, index: int):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            self._queries[index] = output[:, :, :1].detach()
        return hook

    def _key_hook(self, index: int, attn: nn.Module):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            q = self._queries.pop(index).float() * float(attn.scale)
            self.scores.append(q @ output.detach().float().transpose(-2, -1))
        return hook

    # -- context ----------------------------------------------------------------------------
    def __enter__(self) -> AttentionCapture:
        try:
            for i, attn in enumerate(self.modules):
                before = switch_off_fused(attn, f"{type(self.model).__name__} block {i}")
                if before is not None:
                    self._fused_before.append((attn, before))
                if self.detach_input:
                    self._handles.append(attn.register_forward_pre_hook(self._detach_hook, with_kwargs=True))
                self._handles.append(attn.attn_drop.register_forward_hook(self._attention_hook(i)))
                if self.want_scores:
                    self._handles.append(attn.q_norm.register_forward_hook(self._query_hook(i)))
                    self._handles.append(attn.k_norm.register_forward_hook(self._key_hook(i, attn)))
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def remove(self) -> None:
        """Remove every hook this capture registered."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._queries.clear()
        for attn, fused in reversed(self._fused_before):
            with contextlib.suppress(Exception):  # a module that refused the switch keeps its own setting
                attn.fused_attn = fused
        self._fused_before.clear()

    def reset(self) -> None:
        """Forget what was recorded (before a second forward inside the same context)."""
        self.attentions.clear()
        self.scores.clear()
        self._queries.clear()

    # -- results ----------------------------------------------------------------------------
    def check(self) -> None:
        """Assert that exactly one attention (and score) tensor was recorded per block."""
        expected = len(self.modules)
        if len(self.attentions) != expected:
            raise UnsupportedModelError(f"captured {len(self.attentions)} attention tensors for {expected} "
                                        "blocks: fused attention or a non-standard block skipped the hook")
        if self.want_scores and len(self.scores) != expected:
            raise UnsupportedModelError(f"captured {len(self.scores)} CLS score tensors for {expected} "
                                        "blocks")

    def attention_grads(self, score: torch.Tensor) -> list[torch.Tensor]:
        """d score / d A^l for every block l ([B, H, N, N] each), without parameter gradients."""
        self.check()
        if not self.gradients:
            raise SettingError("AttentionCapture(gradients=True) is needed for attention_grads")
        return list(torch.autograd.grad(score, self.attentions))


def hook_count(modules: Sequence[nn.Module]) -> int:
    """Number of forward/pre-forward hooks on `modules` (tests use it to prove cleanup)."""
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in modules)
