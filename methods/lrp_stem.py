"""LRP rules from the patch tokens down to the pixels (docs/protocol.md 2.7 and section 2), shared by
`full_lrp` and `attnlrp`.

The embedding is read as a list of convolution units, each a Conv2d (BatchNorm folded in) and
an optional ReLU after it:
- a plain `PatchEmbed`: its one patch convolution;
- timm's `HybridEmbed` over an `nn.Sequential` stem of Conv2d, BatchNorm2d and ReLU layers
  (the shipped model's), then its projection convolution.

Rules: BatchNorm (eval mode) is folded into the convolution before it (the same function, so
the rule sees one affine layer); a ReLU passes relevance unchanged; the first convolution (the
pixels) takes the z^B rule with each image's smallest and largest input value as bounds; every
other convolution takes the alpha=1, beta=0 rule of the transformer's linear layers (its inputs
follow a ReLU, so this is the z+ rule). Biases take no relevance, so z^B and z+ conserve it,
except at an output whose inputs are all 0 after a ReLU (no positive contribution to pass it to).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.layers import HybridEmbed, PatchEmbed
from torch import nn

from wsol_bench.methods.capture import UnsupportedModelError

from .transformer_attribution import safe_divide


@dataclass
class ConvUnit:
    """One convolution of the embedding, BatchNorm folded in, and whether a ReLU follows it."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    groups: int
    relu: bool = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The unit's output (after its ReLU when it has one)."""
        out = self.conv(x, self.weight, self.bias)
        return out.clamp(min=0) if self.relu else out

    def conv(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """This unit's convolution of `x` with `weight` (its geometry, any weights)."""
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)

    def back(self, x: torch.Tensor, weight: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """The gradient of sum(s * conv(x, weight)) with respect to x (the transposed
        convolution, sized as x: inputs beyond the last full window get zero)."""
        return torch.nn.grad.conv2d_input(x.shape, weight, s, self.stride, self.padding, self.dilation,
                                          self.groups)


def conv_unit(conv: nn.Conv2d) -> ConvUnit:
    """A convolution module as a unit (its weights in float32, detached); ValueError("padding")
    for padding the rules do not cover (by name, or other than zeros)."""
    if isinstance(conv.padding, str) or conv.padding_mode != "zeros":
        raise ValueError("padding")
    return ConvUnit(conv.weight.detach().float(), None if conv.bias is None else conv.bias.detach().float(),
                    conv.stride, conv.padding, conv.dilation, conv.groups)


def _fold(unit: ConvUnit, bn: nn.BatchNorm2d) -> None:
    """y = gamma (conv(x) - mean) / sqrt(var + eps) + beta as one convolution (eval mode)."""
    scale = (bn.running_var.float() + bn.eps).rsqrt()
    if bn.weight is not None:
        scale = scale * bn.weight.detach().float()
    bias = -bn.running_mean.float() * scale if unit.bias is None else (unit.bias - bn.running_mean.float()) * scale
    if bn.bias is not None:
        bias = bias + bn.bias.detach().float()
    unit.weight, unit.bias = unit.weight * scale[:, None, None, None], bias


def _stem_units(backbone: nn.Module) -> list[ConvUnit]:
    """Units of a Sequential of Conv2d, BatchNorm2d (after a Conv2d), ReLU, Identity, Dropout;
    ValueError naming the first layer that is none of these."""
    if not isinstance(backbone, nn.Sequential):
        raise ValueError(f"a {type(backbone).__name__} stem (not an nn.Sequential)")
    units: list[ConvUnit] = []
    for i, layer in enumerate(backbone):
        last = units[-1] if units else None
        if type(layer) is nn.Conv2d:
            units.append(conv_unit(layer))
        elif type(layer) is nn.BatchNorm2d and last is not None and not last.relu:
            if layer.training or layer.running_mean is None:
                raise ValueError(f"a BatchNorm2d without running statistics or in training mode (backbone[{i}])")
            _fold(last, layer)
        elif type(layer) is nn.ReLU and last is not None and not last.relu:
            last.relu = True
        elif not isinstance(layer, (nn.Identity, nn.Dropout)):
            raise ValueError(f"stem layer {type(layer).__name__} (backbone[{i}]) in this position")
    return units


def embedding_units(model: nn.Module, method: str) -> list[ConvUnit]:
    """The model's patch embedding as convolution units, pixels first; UnsupportedModelError
    naming what the rules do not cover (and that the model must be in eval mode)."""
    embed = getattr(model, "patch_embed", None)
    name = type(embed).__name__
    try:
        if type(embed) is PatchEmbed:
            if not isinstance(embed.norm, nn.Identity):
                raise ValueError(f"a norm after the patch projection ({type(embed.norm).__name__})")
            units = []
        elif type(embed) is HybridEmbed:
            units = _stem_units(embed.backbone)
        else:
            raise ValueError(f"a patch embedding other than timm's PatchEmbed or HybridEmbed ({name})")
        if getattr(embed, "dynamic_img_pad", False) or not getattr(embed, "flatten", False):
            raise ValueError(f"a {name} that pads to the patch size or does not flatten its tokens")
        proj = embed.proj
        if type(proj) is nn.Conv2d:
            units.append(conv_unit(proj))
        elif not isinstance(proj, nn.Identity):
            raise ValueError(f"a {type(proj).__name__} projection")
        if not units:
            raise ValueError(f"a {name} without a convolution")
    except ValueError as exc:
        reason = "padding other than zeros of a fixed size" if str(exc) == "padding" else str(exc)
        raise UnsupportedModelError(f"{method}: {type(model).__name__} uses {reason} in its patch embedding, "
                                    "which its pixel relevance rules do not cover (the model must be in eval "
                                    "mode)") from None
    return units


@torch.no_grad()
def check_embedding(model: nn.Module, units: list[ConvUnit], method: str, rel_tol: float = 1e-4) -> float:
    """Refuse the model unless the units reproduce its patch embedding on a seeded random input
    (so a folded BatchNorm is right); returns the largest difference."""
    embed = model.patch_embed
    h, w = embed.img_size
    param = next(model.parameters())
    images = torch.randn(1, units[0].weight.shape[1] * units[0].groups, h, w,
                         generator=torch.Generator().manual_seed(0)).to(param.device)
    expected = embed(images.to(param.dtype)).float()  # [1, G, D]
    out = images
    for unit in units:
        out = unit.forward(out)
    diff = float((out.flatten(2).transpose(1, 2) - expected).abs().max())
    if not diff <= rel_tol * max(1.0, float(expected.abs().max())):
        raise UnsupportedModelError(f"{method}: the folded convolutions differ from {type(model).__name__}'s "
                                    f"patch embedding by {diff:.3g} (is the model in eval mode?)")
    return diff


def zb_rule(images: torch.Tensor, unit: ConvUnit, relevance: torch.Tensor) -> torch.Tensor:
    """The z^B rule at the input layer: with L, H each image's smallest and largest input value,
    s = R_out / (W x - W+ L - W- H + 1e-9) and R_in = x W^T s - L W+^T s - H W-^T s (bias
    ignored; zero padding stays zero in all three terms). Conserves the total relevance."""
    x = images.float()
    weight = unit.weight
    pw, nw = weight.clamp(min=0), weight.clamp(max=0)
    low = x.amin(dim=(1, 2, 3), keepdim=True).expand_as(x)
    high = x.amax(dim=(1, 2, 3), keepdim=True).expand_as(x)
    s = relevance / (unit.conv(x, weight) - unit.conv(low, pw) - unit.conv(high, nw) + 1e-9)
    return x * unit.back(x, weight, s) - low * unit.back(x, pw, s) - high * unit.back(x, nw, s)


def alpha_beta_rule(x: torch.Tensor, unit: ConvUnit, relevance: torch.Tensor, conserving: bool = True
                    ) -> torch.Tensor:
    """alpha=1, beta=0 through a convolution, as `linear_relprop` through a Linear: relevance to
    the positive contributions x+ W+ and x- W-, bias ignored, the two parts sharing it
    (`conserving`) or each given all of it (Chefer et al.'s original rule). On inputs >= 0 (after
    a ReLU) both are the z+ rule, R_in = x W+^T (R / (W+ x))."""
    px, nx = x.clamp(min=0), x.clamp(max=0)
    pw, nw = unit.weight.clamp(min=0), unit.weight.clamp(max=0)
    z_pos, z_neg = unit.conv(px, pw), unit.conv(nx, nw)
    if conserving:
        s_pos = s_neg = safe_divide(relevance, z_pos + z_neg)
    else:
        s_pos, s_neg = safe_divide(relevance, z_pos), safe_divide(relevance, z_neg)
    return px * unit.back(x, pw, s_pos) + nx * unit.back(x, nw, s_neg)


@torch.no_grad()
def embedding_relprop(units: list[ConvUnit], images: torch.Tensor, relevance: torch.Tensor,
                      conserving: bool = True) -> torch.Tensor:
    """Relevance [B, D, gh, gw] of the patch tokens (the last unit's output) down to the pixels
    [B, C, H, W]: alpha-beta through every unit but the first, z^B at the first."""
    inputs = [images.float()]
    for unit in units[:-1]:
        inputs.append(unit.forward(inputs[-1]))
    r = relevance.float()
    for index in range(len(units) - 1, 0, -1):  # a ReLU after a unit passes relevance unchanged
        r = alpha_beta_rule(inputs[index], units[index], r, conserving)
    return zb_rule(inputs[0], units[0], r)
