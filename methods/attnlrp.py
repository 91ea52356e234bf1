"""AttnLRP (Achtibat et al., ICML 2024), docs/protocol.md 2.15: layer-wise relevance propagation
through the whole ViT, attention included, in one forward and one backward pass.

Every rule is written as a modified gradient, so that input x gradient at any tensor equals its
LRP relevance (R = x * g); the backward of the target logit y_c then carries relevance y_c:
- Linear layers: the epsilon rule, R_in = x W^T (R_out / (z + eps sign z)): the gradient times
  z / (z + eps sign z) (the bias keeps its share); `epsilon` = 0 (default) is the plain gradient,
  as the authors' library (LXT) computes it;
- softmax s = softmax(x): R_in = x (R_out - s sum_j R_out_j) (the paper's rule from a Taylor
  expansion at x, its bias absorbed); with R_out = s g this is x times the softmax's own
  Jacobian product, s g - s sum_j s_j g_j, so the softmax keeps its plain gradient;
- q k^T and A v: the uniform rule, each operand half of the product's relevance (the gradient
  to each operand halved); `attention="cp"` instead holds A constant (CP-LRP, Ali et al. 2022:
  all relevance to v, none through the softmax), as the authors' library does for torchvision's ViT;
- LayerNorm: the identity rule for the normalisation, 1/std held constant (the centring and the
  affine map are linear);
- GELU (any element-wise activation): the identity rule, R_in = R_out (the gradient times f(x) / x);
- residual and position-embedding adds, LayerScale, pooling: plain gradients (LRP-0).
Below the tokens (`input_rule`): `zb` (default) takes the relevance of the patch tokens through
the embedding with lrp_stem's rules (z^B at the pixels; z+ through a convolutional stem,
BatchNorm folded); `epsilon` keeps the plain gradient down to the pixels (input x gradient).
Map = pixel relevance summed over the colour channels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import LayerScale, Mlp
from timm.layers.attention import Attention
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn
from torch.autograd import Function

from wsol_bench.errors import SettingError
from wsol_bench.methods.capture import UnsupportedModelError

from .base import Explainer, target_score
from .lrp_stem import check_embedding, embedding_relprop, embedding_units
from .registry import register_explainer

ATTENTION_RULES = ("attnlrp", "cp")
INPUT_RULES = ("zb", "epsilon")


def stabilised(z: torch.Tensor, eps: float) -> torch.Tensor:
    """z + eps * sign(z), with sign(0) = 1 (the epsilon rule's denominator; never 0 for eps > 0)."""
    return z + eps * torch.where(z >= 0, 1.0, -1.0).to(z.dtype)


class ScaleGradient(Function):
    """Identity forward; the backward multiplies the incoming gradient by `factor`."""

    @staticmethod
    def forward(ctx, x, factor):
        ctx.save_for_backward(factor)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        (factor,) = ctx.saved_tensors
        return grad * factor, None


class IdentityRule(Function):
    """y = fn(x) for an element-wise fn; the backward gives g * fn(x) / x, so x * grad = y * g:
    the relevance passes unchanged (0 where x = 0, whose relevance x * grad is 0 anyway)."""

    @staticmethod
    def forward(ctx, x, fn):
        y = fn(x)
        ratio = torch.where(x == 0, torch.zeros_like(x), y / torch.where(x == 0, torch.ones_like(x), x))
        ctx.save_for_backward(ratio)
        return y

    @staticmethod
    def backward(ctx, grad):
        (ratio,) = ctx.saved_tensors
        return grad * ratio, None


class UniformMatmul(Function):
    """a @ b; the backward halves both operands' gradients (the uniform rule for a bilinear
    product: a and b each receive half of the product's relevance)."""

    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(a, b)
        return a @ b

    @staticmethod
    def backward(ctx, grad):
        a, b = ctx.saved_tensors
        return 0.5 * (grad @ b.transpose(-2, -1)), 0.5 * (a.transpose(-2, -1) @ grad)


def linear_eps(layer: nn.Linear, x: torch.Tensor, eps: float) -> torch.Tensor:
    """The layer's output z in float32 with the epsilon rule's gradient, g z / (z + eps sign z)."""
    z = F.linear(x, layer.weight.float(), None if layer.bias is None else layer.bias.float())
    if eps <= 0:
        return z
    return ScaleGradient.apply(z, (z / stabilised(z, eps)).detach())


def layer_norm_identity(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """LayerNorm with its 1/std held constant in the backward (the identity rule); the model's eps."""
    if isinstance(norm, nn.Identity):
        return x
    centred = x - x.mean(-1, keepdim=True)
    std = (centred.pow(2).mean(-1, keepdim=True) + norm.eps).sqrt()
    y = centred / std.detach()
    if norm.weight is not None:
        y = y * norm.weight.float()
    return y if norm.bias is None else y + norm.bias.float()


def attention_branch(at: Attention, x: torch.Tensor, eps: float, rule: str) -> torch.Tensor:
    """The attention module's output for its (normed) input x, with the AttnLRP or CP rules."""
    b, n, _ = x.shape
    qkv = linear_eps(at.qkv, x, eps).reshape(b, n, 3, at.num_heads, at.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q = q * at.scale
    if rule == "cp":  # attention as a constant: v receives all relevance
        attn = (q @ k.transpose(-2, -1)).softmax(-1).detach()
        out = attn @ v
    else:  # softmax: its own gradient is the AttnLRP rule
        attn = UniformMatmul.apply(q, k.transpose(-2, -1)).softmax(-1)
        out = UniformMatmul.apply(attn, v)
    return linear_eps(at.proj, out.transpose(1, 2).reshape(b, n, -1), eps)


def mlp_branch(mlp: Mlp, x: torch.Tensor, eps: float) -> torch.Tensor:
    """fc1, the activation by the identity rule, the MLP's norm, fc2."""
    hidden = IdentityRule.apply(linear_eps(mlp.fc1, x, eps), mlp.act)
    return linear_eps(mlp.fc2, layer_norm_identity(mlp.norm, hidden), eps)


def head_logits(model: VisionTransformer, x: torch.Tensor, eps: float) -> torch.Tensor:
    """Final norm, pooling (class token, or the mean of the patch tokens), fc_norm and the
    classifier; a distilled model averages its two heads on tokens 0 and 1, as timm in eval."""
    x = layer_norm_identity(model.norm, x)
    if getattr(model, "head_dist", None) is not None:
        return (linear_eps(model.head, x[:, 0], eps) + linear_eps(model.head_dist, x[:, 1], eps)) / 2
    pooled = x[:, 0] if model.global_pool == "token" else x[:, model.num_prefix_tokens:].mean(1)
    return linear_eps(model.head, layer_norm_identity(model.fc_norm, pooled), eps)


def block_forward(blk: Block, x: torch.Tensor, eps: float, rule: str) -> torch.Tensor:
    """One block with the relevance rules; the residual adds and LayerScale keep plain gradients."""
    x = x + blk.ls1(attention_branch(blk.attn, layer_norm_identity(blk.norm1, x), eps, rule))
    return x + blk.ls2(mlp_branch(blk.mlp, layer_norm_identity(blk.norm2, x), eps))


def attnlrp_forward(model: VisionTransformer, tokens: torch.Tensor, eps: float, rule: str) -> torch.Tensor:
    """Logits from the patch tokens [B, G, D] (the patch embedding's output) through the
    position embedding, every block and the head, in float32 with the relevance rules."""
    x = model.patch_drop(model._pos_embed(tokens)).float()
    for blk in model.blocks:
        x = block_forward(blk, x, eps, rule)
    return head_logits(model, x, eps)


def check_attnlrp_model(model: nn.Module, method: str) -> None:
    """Refuse (UnsupportedModelError) a model whose parts the forward above does not cover."""
    name = type(model).__name__

    def refuse(feature: str) -> None:
        raise UnsupportedModelError(f"{method}: {name} uses {feature}, which its relevance rules do not cover")

    def is_norm(m: nn.Module) -> bool:
        return isinstance(m, (nn.Identity, nn.LayerNorm))

    if not isinstance(model, VisionTransformer):
        refuse("an architecture other than timm VisionTransformer (model)")
    pool = model.global_pool if getattr(model, "head_dist", None) is None else "token"
    if pool not in ("token", "avg") or getattr(model, "attn_pool", None) is not None:
        refuse(f"global_pool={model.global_pool!r} (token or avg are covered)")
    if getattr(model, "distilled_training", False):
        refuse("distilled_training (set_distilled_training(False))")
    for where in ("head", "head_dist"):
        head = getattr(model, where, None)
        if (head is not None or where == "head") and type(head) is not nn.Linear:
            refuse(f"a {type(head).__name__} classifier ({where})")
    parts = {"norm": model.norm, "fc_norm": model.fc_norm}
    if not isinstance(model.norm_pre, nn.Identity):
        refuse(f"a {type(model.norm_pre).__name__} before the blocks (norm_pre)")
    for i, blk in enumerate(model.blocks):
        at = getattr(blk, "attn", None)
        if type(blk) is not Block or type(at) is not Attention or type(blk.mlp) is not Mlp:
            refuse(f"a non-standard block, attention or MLP (blocks[{i}])")
        if not (isinstance(at.q_norm, nn.Identity) and isinstance(at.k_norm, nn.Identity)
                and isinstance(at.norm, nn.Identity)) or getattr(at, "gate", None) is not None:
            refuse(f"qk-norm, a scale norm or gated attention (blocks[{i}].attn)")
        for ls in ("ls1", "ls2"):
            if type(getattr(blk, ls)) not in (nn.Identity, LayerScale):
                refuse(f"a {type(getattr(blk, ls)).__name__} in blocks[{i}].{ls}")
        parts |= {f"blocks[{i}].{n}": getattr(blk, n) for n in ("norm1", "norm2")}
        parts[f"blocks[{i}].mlp.norm"] = blk.mlp.norm
    for where, norm in parts.items():
        if not is_norm(norm):
            refuse(f"a {type(norm).__name__} ({where})")


@register_explainer("attnlrp")
class AttnLRP(Explainer):
    """AttnLRP's pixel relevance of the target logit: one forward with the rules built in, one
    backward; `attention` attnlrp (the paper's softmax and uniform matmul rules) or cp (attention
    held constant); `input_rule` zb (lrp_stem's embedding rules) or epsilon (input x gradient);
    `epsilon` of the linear layers' epsilon rule (default 0: plain gradients through them, as in
    the authors' library, which needs no stabiliser since it never divides by z)."""

    resolution = "pixel"
    needs_class_token = False
    passes_per_image = "1 forward + 1 backward"

    def __init__(self, model, attention: str = "attnlrp", input_rule: str = "zb", epsilon: float = 0.0) -> None:
        super().__init__(model)
        if attention not in ATTENTION_RULES:
            raise SettingError(f"attnlrp: attention={attention!r}; valid: {', '.join(ATTENTION_RULES)}")
        if input_rule not in INPUT_RULES:
            raise SettingError(f"attnlrp: input_rule={input_rule!r}; valid: {', '.join(INPUT_RULES)}")
        if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float)) or not 0 <= epsilon < 1:
            raise SettingError(f"attnlrp: epsilon={epsilon!r} must be a number in [0, 1)")
        self.attention, self.input_rule, self.epsilon = attention, input_rule, float(epsilon)
        check_attnlrp_model(model, self.name)
        self.units = embedding_units(model, self.name) if input_rule == "zb" else None
        if self.units is not None:
            check_embedding(model, self.units, self.name)
        self._check_logits()

    @torch.no_grad()
    def _check_logits(self, rel_tol: float = 1e-4) -> None:
        """Refuse the model unless the rule-carrying forward reproduces its logits on a seeded input."""
        model = self.model
        h, w = model.patch_embed.img_size
        param = next(model.parameters())
        channels = getattr(model.patch_embed, "in_chans", None) or model.patch_embed.proj.in_channels
        images = torch.randn(1, channels, h, w, generator=torch.Generator().manual_seed(0)).to(param.device, param.dtype)
        expected = model(images).float()
        got = attnlrp_forward(model, model.patch_embed(images).float(), self.epsilon, self.attention)
        diff = float((got - expected).abs().max())
        if not diff <= rel_tol * max(1.0, float(expected.abs().max())):
            raise UnsupportedModelError(f"{self.name}: its forward differs from {type(model).__name__}'s logits "
                                        f"by {diff:.3g} (is the model in eval mode?)")

    def explain(self, images, targets):
        model = self.model
        dtype = next(model.parameters()).dtype
        with torch.enable_grad():
            if self.units is None:  # the plain gradient through the embedding, down to the pixels
                leaf = images.detach().requires_grad_(True)
                tokens = model.patch_embed(leaf.to(dtype)).float()
            else:  # the backward stops at the patch tokens; lrp_stem carries their relevance on
                tokens = leaf = model.patch_embed(images.to(dtype)).float().detach().requires_grad_(True)
            logits = attnlrp_forward(model, tokens, self.epsilon, self.attention)
            used = self.resolve_targets(logits.detach(), targets)
            (grad,) = torch.autograd.grad(target_score(logits, used), leaf)
        relevance = leaf.detach().float() * grad.float()
        if self.units is not None:
            gh, gw = self.grid
            relevance = embedding_relprop(self.units, images, relevance.transpose(1, 2).reshape(len(images), -1, gh, gw))
        return relevance.sum(1), logits.detach(), used
