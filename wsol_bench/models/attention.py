"""Switching timm's fused attention kernel off (so hooks see the attention matrix) and back on
(for passes that need only the outputs)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from wsol_bench.errors import UserError


class UnsupportedModelError(UserError, ValueError):
    """The model lacks a structure an explainer relies on; the message names it."""


def switch_off_fused(module: nn.Module, label: str) -> bool | None:
    """Set `module.fused_attn = False` so the attention matrix is formed (and hookable);
    returns the previous value (None when the module has no such switch)."""
    if not hasattr(module, "fused_attn"):
        return None
    before = bool(module.fused_attn)
    try:
        module.fused_attn = False
    except Exception as exc:
        raise UnsupportedModelError(f"{label}: cannot switch off fused attention: {exc}") from exc
    if module.fused_attn:
        raise UnsupportedModelError(f"{label}: fused attention cannot be switched off; its attention "
                                    "matrix is never formed, so it cannot be explained")
    return before


@contextmanager
def fused_attention(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, every attention module of `model` uses the fused kernel
    (`F.scaled_dot_product_attention`), for passes that need only the outputs (faithfulness
    perturbations): faster on CPU and GPU, equal to the explicit path up to float rounding.
    The previous switches are restored on exit, also after an exception."""
    saved = {m: m.fused_attn for m in model.modules() if hasattr(m, "fused_attn")}
    try:
        for m in saved:
            m.fused_attn = True
        yield model
    finally:
        for m, value in saved.items():
            m.fused_attn = value


def disable_fused_attention(model: nn.Module) -> int:
    """Switch every attention module to the explicit softmax path so hooks see the attention
    matrix; returns how many modules were switched. Raises if one cannot be switched."""
    switched = [switch_off_fused(m, f"{type(model).__name__}.{name}") for name, m in model.named_modules()]
    return sum(s is not None for s in switched)


@torch.inference_mode()
def forward_alone(model: nn.Module, images: torch.Tensor, batch: int, count: int) -> int:
    """`count` images (`images` repeated as needed) through the model alone, `batch` per pass,
    fused attention; returns the number of images passed. A benchmark's bound: what the model's
    forward passes cost without the work around them."""
    inputs = images[torch.arange(count) % len(images)]
    with fused_attention(model):
        for start in range(0, count, batch):
            model(inputs[start:start + batch])
    return count
