"""The model shipped with the package, registered with timm: `wsol_synthetic_vit`, a small
VisionTransformer with a convolutional stem trained on the synthetic dataset. After
`import wsol_bench.models`, `timm.create_model("wsol_synthetic_vit", pretrained=True)` builds it with
the packaged weights (timm's pretrained config points at the file), and `pretrained=False`
gives the architecture with random weights (training starts there)."""

from __future__ import annotations

from functools import partial
from importlib import resources
from pathlib import Path
from typing import Any

from timm.layers import HybridEmbed
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn
from torch import nn

WEIGHTS = "wsol_synthetic_vit.safetensors"


def conv_stem(channels: tuple[int, ...] = (16, 32, 64, 96)) -> nn.Sequential:
    """Stride-2 3x3 conv + BatchNorm + ReLU layers (224 -> 14 with four of them): the
    convolutional stem of "Early convolutions help transformers see better" (Xiao et al.
    2021), which lets a small ViT learn shapes from scratch in minutes on a CPU."""
    layers: list[nn.Module] = []
    c_in = 3
    for c_out in channels:
        layers += [nn.Conv2d(c_in, c_out, 3, 2, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
        c_in = c_out
    return nn.Sequential(*layers)


def packaged_file(name: str) -> Path:
    """A file in the installed package's weights folder."""
    return Path(str(resources.files("wsol_bench") / "weights" / name))


default_cfgs = generate_default_cfgs({
    "wsol_synthetic_vit.synthetic": {
        "file": str(packaged_file(WEIGHTS)), "num_classes": 6, "input_size": (3, 224, 224),
        "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "interpolation": "bilinear", "crop_pct": 0.875,
        "first_conv": "patch_embed.backbone.0", "classifier": "head", "license": "mit",
        "description": "wsol-bench's synthetic-shapes ViT (scripts/train_synthetic.py)",
    },
})


@register_model
def wsol_synthetic_vit(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """A timm VisionTransformer over timm's HybridEmbed of a four-layer conv stem (224 -> 14x14
    tokens), width 96, 6 blocks, 3 heads, one class token, 6 classes: small enough to train
    on a CPU, with standard blocks so every explainer applies."""
    stem = tuple(kwargs.pop("stem_channels", (16, 32, 64, 96)))
    args = {"img_size": 224, "patch_size": 1, "embed_dim": 96, "depth": 6, "num_heads": 3,
            "embed_layer": partial(HybridEmbed, backbone=conv_stem(stem)), **kwargs}
    return build_model_with_cfg(VisionTransformer, "wsol_synthetic_vit", pretrained,
                                pretrained_filter_fn=checkpoint_filter_fn, **args)
