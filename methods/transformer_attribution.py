"""Transformer Attribution (Chefer, Gur & Wolf, CVPR 2021), docs/protocol.md 2.3.

LRP relevance of the target logit at every attention matrix, weighted by the gradient there,
rolled out from the CLS row. timm blocks have no `relprop` and the residual adds and attention
matmuls are inline, so this module runs its own float32 forward over the model's own
parameters (recording what each rule needs), checks once that it reproduces the model's
logits, and propagates relevance back from a one-hot at the logits with the reference rules:

- Linear: alpha=1, beta=0 (z+ on the positive/negative parts of input and weight, bias ignored,
  the two parts sharing the relevance);
- LayerNorm, activation, softmax, dropout: relevance passes unchanged;
- Q K^T and A V: LRP-0, half of the relevance to each operand;
- residual add: LRP-0, then each branch rescaled to keep its share of the total, PER IMAGE;
- clone (a tensor read by two branches): sum of the branches.

Abar^l = mean_h clamp(dy_c/dA^l * R_A^l, min=0); C = (Abar^{L-1}+I)...(Abar^s+I);
map = C[:, CLS, patches]. One forward, one backward (for dy_c/dA), one relevance pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.layers import DropPath, Mlp
from timm.layers.attention import Attention
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

from wsol_bench.methods.capture import UnsupportedModelError

from .base import Explainer, check_start_layer, target_score
from .registry import register_explainer

EPS = 1e-9


def safe_divide(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a / (b + 1e-9), and 0 where b == 0: the reference's stabiliser, which adds the same
    1e-9 whatever the sign of b (clamp(b, min=eps) + clamp(b, max=eps)); a sign-aware b + eps *
    sign(b) moves the maps measurably where a residual split divides by a sum near 0."""
    den = b.clamp(min=EPS) + b.clamp(max=EPS)
    den = den + (den == 0).to(den.dtype) * EPS
    return a / den * (b != 0).to(b.dtype)


# The relevance rules of Chefer et al.'s release: `conserving` (ViT_LRP, layers_ours: the rules
# of Transformer Attribution) and `chefer_original` (ViT_orig_LRP, layers_lrp: the rules their
# scripts build the partial-LRP and full-LRP rows with), docs/protocol.md 2.7.
LRP_RULES = ("conserving", "chefer_original")


def linear_relprop(x: torch.Tensor, weight: torch.Tensor, relevance: torch.Tensor,
                   conserving: bool = True) -> torch.Tensor:
    """alpha=1, beta=0: each output's relevance goes to the positive contributions x+ W+ and
    x- W- of the inputs, the bias takes none. `conserving` shares it between the two in
    proportion (the total is kept); otherwise each of the two receives all of it, normalised by
    its own sum (the original rule: the relevance of a layer whose inputs have both signs grows)."""
    px, nx = x.clamp(min=0), x.clamp(max=0)
    pw, nw = weight.clamp(min=0), weight.clamp(max=0)
    z_pos, z_neg = F.linear(px, pw), F.linear(nx, nw)
    if conserving:
        s_pos = s_neg = safe_divide(relevance, z_pos + z_neg)
    else:
        s_pos, s_neg = safe_divide(relevance, z_pos), safe_divide(relevance, z_neg)
    return px * (s_pos @ pw) + nx * (s_neg @ nw)


def matmul_relprop(a: torch.Tensor, b: torch.Tensor, relevance: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """LRP-0 for z = a @ b; each operand gets half, so the two together keep the total."""
    s = safe_divide(relevance, a @ b) / 2
    return a * (s @ b.transpose(-2, -1)), b * (a.transpose(-2, -1) @ s)


def residual_relprop(x: torch.Tensor, y: torch.Tensor, relevance: torch.Tensor, conserving: bool = True
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """LRP-0 split of z = x + y; `conserving` then rescales each part to |its sum| / (|sum_x| +
    |sum_y|) of the incoming total (sums over each image; the reference sums over the batch),
    the original rule keeps the plain split."""
    s = safe_divide(relevance, x + y)
    rx, ry = x * s, y * s
    if not conserving:
        return rx, ry
    dims = tuple(range(1, relevance.dim()))
    sx, sy, total = (t.sum(dims, keepdim=True) for t in (rx, ry, relevance))
    both = sx.abs() + sy.abs()
    rx = rx * safe_divide(safe_divide(sx.abs(), both) * total, sx)
    ry = ry * safe_divide(safe_divide(sy.abs(), both) * total, sy)
    return rx, ry


@dataclass
class BlockRecord:
    """What the relevance rules of one block read: x (block input), h1 = norm1(x), scaled q,
    k, v and attention [B, H, N, *], o (proj input), a (attention branch), mid = x + a,
    h2 = norm2(mid), f (fc2 input), m (MLP branch). `attn` stays in the autograd graph."""

    x: torch.Tensor
    h1: torch.Tensor
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    attn: torch.Tensor
    o: torch.Tensor
    a: torch.Tensor
    mid: torch.Tensor
    h2: torch.Tensor
    f: torch.Tensor
    m: torch.Tensor


@dataclass
class Trace:
    """Output of `lrp_forward`: logits, per-block records, and the classifier seen as one
    Linear: head_in [B, T*D] (the T tokens it reads, after the final norm), head_weight."""

    logits: torch.Tensor
    blocks: list[BlockRecord]
    head_in: torch.Tensor
    head_weight: torch.Tensor


def _norm(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if isinstance(norm, nn.Identity):
        return x
    weight = None if norm.weight is None else norm.weight.float()
    bias = None if norm.bias is None else norm.bias.float()
    return F.layer_norm(x, norm.normalized_shape, weight, bias, norm.eps)  # the model's own eps


def _linear(linear: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x, linear.weight.float(), None if linear.bias is None else linear.bias.float())


def lrp_forward(model: VisionTransformer, images: torch.Tensor, *, track_attention: bool = False
                ) -> Trace:
    """The model's eval-mode forward on its own parameters, in float32, recording every block.
    With `track_attention`, the attention matrices stay in an autograd graph (even for frozen
    weights) so dy_c/dA can be taken; the other records are detached."""
    dtype = next(model.parameters()).dtype
    # Embedding: the model's own modules (relevance never goes below the first block).
    x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(images.to(dtype)))))
    x = x.float()
    if track_attention:
        x = x.detach().requires_grad_(True)
    records = []
    for blk in model.blocks:
        at = blk.attn
        b, n, _ = x.shape
        h1 = _norm(blk.norm1, x)
        qkv = _linear(at.qkv, h1).reshape(b, n, 3, at.num_heads, at.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q = q * at.scale  # as timm; the scalar does not change the LRP-0 shares of Q K^T
        attn = (q @ k.transpose(-2, -1)).softmax(-1)
        o = (attn @ v).transpose(1, 2).reshape(b, n, -1)
        a = _linear(at.proj, o)
        mid = x + a
        h2 = _norm(blk.norm2, mid)
        f = _norm(blk.mlp.norm, blk.mlp.act(_linear(blk.mlp.fc1, h2)))
        m = _linear(blk.mlp.fc2, f)
        d = [t.detach() for t in (x, h1, q, k, v)]
        records.append(BlockRecord(*d, attn, *(t.detach() for t in (o, a, mid, h2, f, m))))
        x = mid + m
    final = _norm(model.norm, x)
    # DeiT-distilled averages two heads on tokens 0 and 1: one Linear over both, halved.
    heads = [model.head] + ([model.head_dist] if getattr(model, "head_dist", None) is not None else [])
    head_in = final[:, :len(heads)].flatten(1)
    weight = torch.cat([h.weight.float() for h in heads], 1) / len(heads)
    bias = sum(h.bias.float() for h in heads if h.bias is not None) / len(heads)
    logits = F.linear(head_in, weight) + bias
    return Trace(logits, records, head_in.detach(), weight)


@torch.no_grad()
def relevance_pass(model: VisionTransformer, trace: Trace, targets: torch.Tensor,
                   start_layer: int = 0, rules: str = "conserving") -> tuple[list[torch.Tensor], torch.Tensor]:
    """Relevance from a one-hot (value 1) at the target logits down to the input of block
    `start_layer`, by `rules` (LRP_RULES: the linear layers and residual adds differ). Returns
    ([R_A^l, l = start_layer..L-1], relevance at that block's input)."""
    keep = rules == "conserving"
    onehot = F.one_hot(targets, trace.logits.shape[1]).float()
    r_head = linear_relprop(trace.head_in, trace.head_weight, onehot, keep)
    b, n, d = trace.blocks[-1].x.shape
    # The final norm passes relevance unchanged; only the tokens the head reads receive any.
    r = torch.zeros(b, n, d, device=r_head.device)
    r[:, :r_head.shape[1] // d] = r_head.view(b, -1, d)
    r_attn = []
    for blk, rec in reversed(list(zip(model.blocks, trace.blocks))[start_layer:]):
        at = blk.attn
        r_mid, r_m = residual_relprop(rec.mid, rec.m, r, keep)
        r_f = linear_relprop(rec.f, blk.mlp.fc2.weight.float(), r_m, keep)  # mlp.norm, act: unchanged
        r_mid = r_mid + linear_relprop(rec.h2, blk.mlp.fc1.weight.float(), r_f, keep)  # clone: sum
        r_x, r_a = residual_relprop(rec.x, rec.a, r_mid, keep)
        r_o = linear_relprop(rec.o, at.proj.weight.float(), r_a, keep)
        r_heads = r_o.reshape(b, n, at.num_heads, at.head_dim).transpose(1, 2)
        r_A, r_v = matmul_relprop(rec.attn.detach(), rec.v, r_heads)
        r_q, r_kt = matmul_relprop(rec.q, rec.k.transpose(-2, -1), r_A)  # softmax: unchanged
        r_qkv = torch.stack([r_q, r_kt.transpose(-2, -1), r_v]).permute(1, 3, 0, 2, 4).reshape(b, n, -1)
        r = r_x + linear_relprop(rec.h1, at.qkv.weight.float(), r_qkv, keep)  # norm1: unchanged
        r_attn.append(r_A)
    return r_attn[::-1], r


def check_supported(model: nn.Module, method: str = "transformer_attribution") -> None:
    """Raise UnsupportedModelError naming the first feature the relevance rules do not cover."""
    name = type(model).__name__

    def refuse(feature: str, where: str) -> None:
        raise UnsupportedModelError(f"{method}: {name} uses {feature} ({where}), which its LRP "
                                    "relevance rules do not cover")

    def is_norm(m: nn.Module) -> bool:  # LayerNorm passes relevance unchanged; others unknown
        return isinstance(m, (nn.Identity, nn.LayerNorm))

    if not isinstance(model, VisionTransformer):
        refuse("an architecture other than timm VisionTransformer", "model")
    if getattr(model, "attn_pool", None) is not None:
        refuse("attention pooling", "attn_pool")
    if not isinstance(model.fc_norm, nn.Identity):
        refuse("a norm after pooling", "fc_norm")
    for where in ("head", "head_dist"):
        head = getattr(model, where, None)
        if (head is not None or where == "head") and not isinstance(head, nn.Linear):
            refuse(f"a {type(head).__name__} classifier instead of nn.Linear", where)
    if not is_norm(model.norm):
        refuse(f"final norm {type(model.norm).__name__}", "norm")
    for i, blk in enumerate(model.blocks):
        where = f"blocks[{i}]"
        if type(blk) is not Block:
            refuse(f"block type {type(blk).__name__}", where)
        if not (isinstance(blk.ls1, nn.Identity) and isinstance(blk.ls2, nn.Identity)):
            refuse("LayerScale", f"{where}.ls1/ls2")
        if not all(isinstance(p, (nn.Identity, DropPath)) for p in (blk.drop_path1, blk.drop_path2)):
            refuse("a non-standard drop path", f"{where}.drop_path")
        at = blk.attn
        if type(at) is not Attention:
            refuse(f"attention type {type(at).__name__}", f"{where}.attn")
        if not (isinstance(at.q_norm, nn.Identity) and isinstance(at.k_norm, nn.Identity)):
            refuse("qk-norm", f"{where}.attn.q_norm/k_norm")
        if not isinstance(at.norm, nn.Identity):
            refuse("attention scale_norm", f"{where}.attn.norm")
        if getattr(at, "gate", None) is not None:
            refuse("gated attention", f"{where}.attn.gate")
        if type(blk.mlp) is not Mlp:
            refuse(f"MLP type {type(blk.mlp).__name__}", f"{where}.mlp")
        for part in ("norm1", "norm2"):
            if not is_norm(getattr(blk, part)):
                refuse(f"norm {type(getattr(blk, part)).__name__}", f"{where}.{part}")
        if not is_norm(blk.mlp.norm):
            refuse(f"MLP norm {type(blk.mlp.norm).__name__}", f"{where}.mlp.norm")


@torch.no_grad()
def check_forward(model: VisionTransformer, rel_tol: float = 1e-4,
                  method: str = "transformer_attribution") -> float:
    """Refuse the model unless `lrp_forward` reproduces its logits on a seeded random input
    (max abs difference <= rel_tol * max(1, max |logit|)); returns the difference."""
    h, w = model.patch_embed.img_size
    # HybridEmbed records its input channels; a plain PatchEmbed's projection reads them.
    channels = getattr(model.patch_embed, "in_chans", None) or getattr(
        getattr(model.patch_embed, "proj", None), "in_channels", 3)
    param = next(model.parameters())
    gen = torch.Generator().manual_seed(0)  # leaves the global RNG alone
    images = torch.randn(1, channels, h, w, generator=gen).to(param.device, param.dtype)
    expected = model(images).float()
    diff = float((lrp_forward(model, images).logits - expected).abs().max())
    if not diff <= rel_tol * max(1.0, float(expected.abs().max())):
        raise UnsupportedModelError(f"{method}: its forward differs from {type(model).__name__}'s "
                                    f"logits by {diff:.3g} (is the model in eval mode?); an "
                                    "unsupported feature would make the relevance map wrong")
    return diff


@register_explainer("transformer_attribution")
class TransformerAttribution(Explainer):
    """Chefer et al.'s relevance x gradient rollout from block `start_layer` (0: the AG-CAM
    evaluation; Chefer's own scripts use 1)."""

    passes_per_image = "1 forward + 1 backward, and its own float32 forward"

    def __init__(self, model, start_layer: int = 0) -> None:
        super().__init__(model)
        check_supported(model, self.name)
        self.start_layer = check_start_layer(self.name, start_layer, len(model.blocks))
        check_forward(model, method=self.name)

    def explain(self, images, targets):
        with torch.enable_grad():
            trace = lrp_forward(self.model, images, track_attention=True)
            used = self.resolve_targets(trace.logits.detach(), targets)
            attns = [rec.attn for rec in trace.blocks[self.start_layer:]]
            grads = torch.autograd.grad(target_score(trace.logits, used), attns)
        r_attn, _ = relevance_pass(self.model, trace, used, self.start_layer)
        # Only the CLS row of C is read: multiply a row vector from the left, layer L-1 first,
        # e0^T (Abar^{L-1}+I)...(Abar^s+I): O(N^2) per layer instead of an N x N product.
        row = torch.zeros(len(images), attns[0].shape[-1], device=images.device)
        row[:, 0] = 1.0
        for grad, rel in zip(reversed(grads), reversed(r_attn)):
            abar = (grad * rel).clamp(min=0).mean(1)
            row = row + (row.unsqueeze(1) @ abar).squeeze(1)
        return self.patch_map(row), trace.logits.detach(), used
