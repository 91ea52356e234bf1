"""Models: loading any timm VisionTransformer ready for explanation, switching its fused
attention, and the shipped model (registered with timm on import)."""

from wsol_bench.models import shipped
from wsol_bench.models.attention import (
    UnsupportedModelError,
    disable_fused_attention,
    forward_alone,
    fused_attention,
    switch_off_fused,
)
from wsol_bench.models.loading import (
    DataConfig,
    ModelLoadError,
    architecture_data_config,
    attention_size,
    data_config,
    head_classes,
    load_model,
    load_weights_only,
    map_grid,
    patch_grid,
    pretrained_file,
    read_checkpoint,
)

__all__ = ["DataConfig", "ModelLoadError", "UnsupportedModelError", "architecture_data_config", "attention_size",
           "data_config", "disable_fused_attention", "forward_alone", "fused_attention", "head_classes", "load_model", "load_weights_only", "map_grid",
           "patch_grid", "pretrained_file", "read_checkpoint", "shipped", "shipped_weights_path",
           "switch_off_fused"]


def shipped_weights_path(name: str = "wsol_synthetic_vit"):
    """Location of a shipped model's weights inside the installed package."""
    path = pretrained_file(name)
    if path is None:
        raise ModelLoadError(f"{name} is not a model shipped with wsol-bench")
    return path
