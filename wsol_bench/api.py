"""The suite as a Python library, in the shape users know from pytorch-grad-cam and captum:

- `explain(model_or_name, images, method="agcam")`: maps of any registered explainer and
  their heatmaps in [0, 1], computed exactly as a run computes them;
- `overlay(image, heatmap)`: a heatmap drawn over an image, an RGB uint8 array;
- `localize(heatmaps, threshold)`: the predicted boxes and box-union masks and, given ground
  truth, the per-image scores of records.csv, from the run's own region engine and metrics.

Every step calls the function the benchmark run calls (the model loader and its preparation,
the dataset transform, `to_heatmaps`, the region engine, `localization_scores`), so a number
found here is the number a run finds (docs/protocol.md 3 and 4.1).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from wsol_bench.datasets.base import IGNORE_INDEX, EvalTransform, Sample
from wsol_bench.datasets.image_io import ImageReadError, read_rgb
from wsol_bench.errors import InputFileError, MissingInputError, SettingError
from wsol_bench.methods import Explainer, get_explainer
from wsol_bench.metrics.localization import GroundTruth, localization_scores, metric_columns
from wsol_bench.models import UnsupportedModelError, data_config, disable_fused_attention, load_model
from wsol_bench.regions.heatmaps import to_heatmaps
from wsol_bench.regions.rasterize import PROTOCOLS, ground_truth_box_mask, union_masks
from wsol_bench.regions.thresholds import check_thresholds

__all__ = ["Explained", "ImageLocalization", "as_frame", "explain", "localize", "model_inputs", "overlay"]

DEFAULT_MODEL = "wsol_synthetic_vit"  # the shipped model: useful without any download
RESIZE = "squash"  # the run's default preprocess.resize: Resize((H, W)), as the AG-CAM paper
PIXEL_INPUTS = "a PIL image, a uint8 H x W x 3 array, an image file path, or a list of them"


@dataclass
class Explained:
    """What `explain` returns, one entry per image (all on the CPU).

    heatmaps: float32 [B, H, W] in [0, 1] at the model's input size, as the run scores them.
    maps: the explainer's raw maps, [B, gh, gw] on the patch grid (or [B, H, W] pixel maps).
    targets: [B], the class each map explains; predictions: [B], the model's classes.
    degenerate: bool [B], constant or NaN/inf maps, whose heatmap is all zeros.
    notes: per image, what preprocessing had to convert ("cmyk converted to rgb", ...)."""

    heatmaps: torch.Tensor
    maps: torch.Tensor
    targets: torch.Tensor
    predictions: torch.Tensor
    logits: torch.Tensor
    degenerate: torch.Tensor
    notes: list[tuple[str, ...]] = field(default_factory=list)


def explain(model_or_name: str | nn.Module, images: Any, method: str = "agcam", targets: Any = None, *,
            pretrained: bool = True, device: str | torch.device = "cpu", **params: Any) -> Explained:
    """Explain `images` with explainer `method` (`params` as in conf/method/<method>.yaml).

    model_or_name: a model name for `load_model` (with its pretrained weights by default, e.g.
    the shipped "wsol_synthetic_vit"), or your own timm VisionTransformer, prepared as
    `load_model` prepares models (eval mode, fused attention off, parameters frozen) for the
    call and left as it was afterwards. images: a float tensor [B, 3, H, W] already normalised
    for the model, or PIXEL_INPUTS, preprocessed as a run does (`model_inputs`). targets: None
    (the predicted classes), one class for every image, or one class per image."""
    model = _resolve_model(model_or_name, pretrained, device)
    with _prepared(model):
        batch, notes = model_inputs(model, images)
        out = _explainer(method, model, params)(batch, _targets(targets, len(batch)))
    maps, logits = out.maps.detach().float().cpu(), out.logits.detach().float().cpu()
    heatmaps, degenerate = to_heatmaps(maps, tuple(batch.shape[-2:]))
    return Explained(heatmaps=heatmaps, maps=maps, targets=out.targets.detach().cpu(),
                     predictions=logits.argmax(1), logits=logits, degenerate=degenerate, notes=notes)


def _resolve_model(model_or_name: Any, pretrained: bool, device: str | torch.device) -> nn.Module:
    """The model a name loads, or the user's module once checked to be a patch-based ViT."""
    if isinstance(model_or_name, str):
        return load_model(model_or_name, pretrained=pretrained, device=device)
    kind = type(model_or_name).__name__
    if not isinstance(model_or_name, nn.Module):
        raise SettingError(f"explain: model_or_name is a {kind}; pass a model name (e.g. {DEFAULT_MODEL!r}) "
                           "or a timm VisionTransformer module")
    if not hasattr(getattr(model_or_name, "patch_embed", None), "grid_size"):
        raise SettingError(f"explain: {kind} has no patch_embed.grid_size, so it is not a timm "
                           "VisionTransformer the explainers can read; build it with "
                           "timm.create_model('vit_...')")
    return model_or_name


@contextmanager
def _prepared(model: nn.Module) -> Iterator[nn.Module]:
    """`load_model`'s preparation (eval mode, fused attention off, parameters frozen) for the
    duration of the block; the module's own mode, switches and flags are restored after it."""
    training = model.training
    grads = {p: p.requires_grad for p in model.parameters()}
    fused = {m: m.fused_attn for m in model.modules() if hasattr(m, "fused_attn")}
    try:
        try:
            disable_fused_attention(model)
        except UnsupportedModelError as exc:  # a kernel that never forms the attention matrix
            raise SettingError(f"explain: the model cannot be explained: {exc}") from None
        model.requires_grad_(False)  # explainers take gradients w.r.t. activations, never weights
        yield model.eval()
    finally:
        for module, value in fused.items():
            module.fused_attn = value
        for param, value in grads.items():
            param.requires_grad_(value)
        model.train(training)


def _explainer(method: str, model: nn.Module, params: dict[str, Any]) -> Explainer:
    """The run's explainer; a model it cannot read (no class token, a pooled head) and a
    parameter the method does not take are one-line SettingErrors."""
    try:
        return get_explainer(method, model, **params)
    except UnsupportedModelError as exc:
        raise SettingError(f"explain: {exc}") from None
    except TypeError as exc:  # only an unknown parameter is the user's; any other TypeError is a bug
        if "unknown parameters" not in str(exc) and "unexpected keyword" not in str(exc):
            raise
        raise SettingError(f"explain: {exc}; see conf/method/{method}.yaml for its parameters") from None


def _targets(targets: Any, count: int) -> torch.Tensor | None:
    """None, or integer class indices, one per image (a single class is repeated)."""
    if targets is None:
        return None
    values = torch.as_tensor(targets)
    if values.is_floating_point() or values.is_complex() or values.dtype == torch.bool:
        raise SettingError(f"explain: targets must be integer class indices, got {values.dtype}")
    values = values.long().reshape(-1)
    return values.expand(count).clone() if values.numel() == 1 else values


def model_inputs(model: nn.Module, images: Any) -> tuple[torch.Tensor, list[tuple[str, ...]]]:
    """The normalised batch [B, 3, H, W] for `model`, and each image's conversion notes.

    A float tensor is taken as already normalised (its shape and size are checked). Other
    images are decoded to uint8 RGB (files by `read_rgb`, as the datasets read them) and go
    through the run's `EvalTransform` with the model's data config (mean, std, interpolation),
    squashed to its input size: the patch embedding's size where the model is built for a
    size other than its pretrained config's (the run's preprocess.input_size)."""
    size = _input_size(model)
    if isinstance(images, torch.Tensor):
        return _checked_tensor(images, size, model), [() for _ in range(len(images))]
    items = list(images) if isinstance(images, (list, tuple)) else [images]
    if not items:
        raise SettingError(f"explain: images is empty; pass {PIXEL_INPUTS}")
    config = data_config(model)
    transform = EvalTransform(size=size, mean=config.mean, std=config.std, interpolation=config.interpolation,
                              resize=RESIZE, crop_pct=config.crop_pct)
    batch, notes = [], []
    for index, item in enumerate(items):
        pixels, converted = _pixels(item, index)
        sample = Sample(image=pixels, label=0, boxes=torch.zeros(0, 4), image_id=f"images[{index}]",
                        orig_size=(int(pixels.shape[2]), int(pixels.shape[1])))
        batch.append(transform(sample).image)
        notes.append(converted)
    return torch.stack(batch), notes


def _input_size(model: nn.Module) -> tuple[int, int]:
    """(H, W) the model takes: its data config's, or its patch embedding's fixed size."""
    size = tuple(int(v) for v in data_config(model).input_size[1:])
    built = getattr(model.patch_embed, "img_size", None)
    if not getattr(model, "dynamic_img_size", False) and built is not None:
        size = tuple(int(v) for v in built)
    return size


def _checked_tensor(images: torch.Tensor, size: tuple[int, int], model: nn.Module) -> torch.Tensor:
    """A float [B, 3, H, W] batch the model can take, else a SettingError saying what to pass."""
    if images.ndim != 4 or images.shape[1] != 3 or not images.is_floating_point():
        raise SettingError(f"explain: an images tensor must be float [B, 3, H, W], already normalised, got "
                           f"{images.dtype} {tuple(images.shape)}; or pass {PIXEL_INPUTS} to have them "
                           "preprocessed")
    if not getattr(model, "dynamic_img_size", False) and tuple(images.shape[-2:]) != size:
        raise SettingError(f"explain: images are {images.shape[-2]}x{images.shape[-1]} but the model takes "
                           f"{size[0]}x{size[1]}; resize them, or pass {PIXEL_INPUTS} to have them "
                           "preprocessed")
    return images


def _pixels(item: Any, index: int) -> tuple[torch.Tensor, tuple[str, ...]]:
    """uint8 [3, H, W] RGB of one image (PIL image, uint8 array or file path) and its notes."""
    if isinstance(item, (str, Path)):
        path = Path(item).expanduser()
        if not path.is_file():
            raise MissingInputError(f"explain: image file {path} does not exist; pass an existing image file")
        try:
            return read_rgb(path)
        except ImageReadError as exc:
            raise InputFileError(f"explain: {exc}") from None
    notes: tuple[str, ...] = ()
    if isinstance(item, Image.Image):
        if item.mode.startswith(("I", "F")):  # Pillow would clip 16-bit and float data silently
            raise SettingError(f"explain: images[{index}] has high bit depth (mode {item.mode}); convert it "
                               "to 8-bit RGB")
        notes = () if item.mode == "RGB" else (f"{item.mode.lower()} converted to rgb",)
        item = np.asarray(item.convert("RGB"))
    array = isinstance(item, np.ndarray)
    if not (array and item.dtype == np.uint8 and item.ndim == 3 and item.shape[2] == 3):
        shape = f" {item.dtype} {item.shape}" if array else ""
        raise SettingError(f"explain: images[{index}] is a {type(item).__name__}{shape}; pass "
                           f"{PIXEL_INPUTS}, or a normalised float tensor [B, 3, H, W]")
    return torch.from_numpy(item.copy()).permute(2, 0, 1).contiguous(), notes


def overlay(image: Any, heatmap: Any, alpha: float = 0.5, colormap: str = "jet") -> np.ndarray:
    """The heatmap drawn over the image: an RGB uint8 array H x W x 3 at the image's size.

    image: a PIL image, a uint8 array or a float array in [0, 1] (H x W x 3 or H x W).
    heatmap: [h, w] values in [0, 1] (a tensor or an array) of any size, resized to the image
    bilinearly (align_corners=False, the upsampling the run applies to maps), coloured with the
    matplotlib colormap `colormap`, then blended: (1 - alpha) * image + alpha * colour, rounded
    to the nearest integer; unlike pytorch-grad-cam's show_cam_on_image, nothing is rescaled
    afterwards, so the image keeps its brightness."""
    if not isinstance(alpha, (int, float)) or not 0.0 <= float(alpha) <= 1.0:
        raise SettingError(f"overlay: alpha={alpha!r} must be a number in [0, 1] (the heatmap's weight)")
    pixels = _image_floats(image)
    heat = _unit_values(heatmap, "overlay: heatmap")
    heat = heat[0] if heat.ndim == 3 and heat.shape[0] == 1 else heat
    if heat.ndim != 2:
        raise SettingError(f"overlay: heatmap must be [H, W], got {tuple(heat.shape)}")
    if tuple(heat.shape) != pixels.shape[:2]:
        heat = F.interpolate(heat[None, None].double(), size=pixels.shape[:2], mode="bilinear",
                             align_corners=False)[0, 0]
    colours = _colormap(colormap)(heat.double().numpy())[..., :3]
    blended = (1.0 - float(alpha)) * pixels + float(alpha) * colours
    return np.clip(np.rint(blended * 255.0), 0, 255).astype(np.uint8)


def _image_floats(image: Any) -> np.ndarray:
    """float64 H x W x 3 in [0, 1] of a PIL image or a uint8 / [0, 1] float array."""
    array = np.asarray(image.convert("RGB")) if isinstance(image, Image.Image) else np.asarray(image)
    array = np.repeat(array[..., None], 3, axis=2) if array.ndim == 2 else array
    if array.ndim != 3 or array.shape[2] != 3:
        raise SettingError(f"overlay: image must be H x W x 3 (or H x W), got {array.shape}")
    if array.dtype == np.uint8:
        return array / 255.0
    in_range = array.size and np.isfinite(array).all() and array.min() >= 0 and array.max() <= 1
    if not np.issubdtype(array.dtype, np.floating) or not in_range:
        raise SettingError(f"overlay: image of {array.dtype} must be uint8, or floats in [0, 1] (not a "
                           "normalised model input)")
    return array.astype(np.float64)


def _unit_values(values: Any, what: str) -> torch.Tensor:
    """`values` (a tensor or an array) as a finite float tensor in [0, 1] on the CPU."""
    tensor = values.detach().cpu() if isinstance(values, torch.Tensor) else np.asarray(values)
    if isinstance(tensor, np.ndarray):
        if not np.issubdtype(tensor.dtype, np.floating):  # also refuses object arrays torch cannot take
            raise SettingError(f"{what} must hold floats in [0, 1], got {tensor.dtype}")
        tensor = torch.from_numpy(tensor)
    if not tensor.is_floating_point():
        raise SettingError(f"{what} must hold floats in [0, 1], got {tensor.dtype}")
    if tensor.numel() and not (torch.isfinite(tensor).all() and tensor.min() >= 0 and tensor.max() <= 1):
        raise SettingError(f"{what} must hold finite values in [0, 1]; pass explain(...).heatmaps (or "
                           "normalise raw maps with wsol_bench.regions.heatmaps.to_heatmaps)")
    return tensor


def _colormap(name: str):
    """The matplotlib colormap `name`, or a SettingError naming a few valid ones."""
    import matplotlib

    try:
        return matplotlib.colormaps[name]
    except KeyError:
        raise SettingError(f"overlay: unknown colormap {name!r}; use a matplotlib colormap, e.g. jet, "
                           "viridis, inferno, turbo") from None


@dataclass
class ImageLocalization:
    """The regions of one heatmap at one threshold, and their scores when ground truth is given.

    boxes: float [K, 4] xyxy, continuous pixel edges, one per 8-connected region of
    heatmap > threshold. mask: bool [H, W], the predicted box-union as `protocol` fills it.
    scores: records.csv's columns (box_pixel_acc ... mask_recall, fractions) for the ground
    truth given; empty without. n_gt_boxes: ground-truth boxes given (None: no boxes)."""

    threshold: float
    boxes: torch.Tensor
    mask: torch.Tensor
    scores: dict[str, float] = field(default_factory=dict)
    n_gt_boxes: int | None = None

    @property
    def n_pred_boxes(self) -> int:
        """Predicted regions, records.csv's n_pred_boxes."""
        return len(self.boxes)


def localize(heatmaps: Any, threshold: float = 0.5, protocol: str = "agcam", boxes: Sequence | None = None,
             masks: Sequence | None = None, *, box_image_sizes: Sequence | None = None
             ) -> list[ImageLocalization]:
    """Boxes and box-union masks of `heatmaps > threshold`, scored as records.csv scores them.

    heatmaps: [B, H, W] (or one [H, W]) in [0, 1], or what `explain` returned; compared in
    float32, the run's heatmap dtype. protocol: "agcam" or "exact" (metric.box_protocol,
    docs/protocol.md 4.1). boxes: per image, the ground-truth boxes [K, 4] xyxy of the class
    explained, continuous edges in heatmap pixels, or in the pixels of an image of (width,
    height) `box_image_sizes[i]` (the on-disk image, as the datasets keep them). masks: per
    image, [H, W] at the heatmap size: True / nonzero on the object, 255 ignored.
    Scores come from the run's `localization_scores`; `as_frame` tabulates the result."""
    heat = _unit_values(heatmaps.heatmaps if isinstance(heatmaps, Explained) else heatmaps,
                        "localize: heatmaps").float()
    heat = heat[None] if heat.ndim == 2 else heat
    if heat.ndim != 3:
        raise SettingError(f"localize: heatmaps must be [B, H, W] or [H, W], got {tuple(heat.shape)}")
    if protocol not in PROTOCOLS:
        raise SettingError(f"localize: unknown protocol {protocol!r}; valid: {', '.join(PROTOCOLS)}")
    (threshold,) = check_thresholds([threshold], "localize: threshold")
    gt = _ground_truth(heat, boxes, masks, box_image_sizes, protocol)
    scores, regions = localization_scores(heat, gt, [threshold], protocol)
    predicted = union_masks(regions, 0, protocol)
    columns = [c for c in metric_columns(masks is not None) if boxes is not None or not c.startswith("box_")]
    return [ImageLocalization(threshold=threshold, boxes=regions.boxes_at(i, 0), mask=predicted[i],
                              scores={c: float(np.float64(scores[c][0, i])) for c in columns},
                              n_gt_boxes=gt.num_boxes[i] if boxes is not None else None)
            for i in range(len(heat))]


def _ground_truth(heat: torch.Tensor, boxes: Sequence | None, masks: Sequence | None,
                  box_image_sizes: Sequence | None, protocol: str) -> GroundTruth:
    """The run's GroundTruth of the boxes and masks given (empty box masks without boxes)."""
    count, size = len(heat), (int(heat.shape[1]), int(heat.shape[2]))
    for name, given in (("boxes", boxes), ("masks", masks), ("box_image_sizes", box_image_sizes)):
        if given is not None and len(given) != count:
            raise SettingError(f"localize: {len(given)} entries in {name} for {count} heatmaps; give one "
                               "per image")
    box_masks, counts = torch.zeros(count, *size, dtype=torch.bool), [0] * count
    for i, entry in enumerate(boxes if boxes is not None else []):
        own = _box_array(entry, i)
        orig = _image_size(box_image_sizes[i], i) if box_image_sizes is not None else (size[1], size[0])
        box_masks[i], counts[i] = ground_truth_box_mask(own, orig, size, protocol), len(own)
    if masks is None:
        return GroundTruth(box_masks=box_masks, seg_masks=None, seg_valid=None, num_boxes=counts)
    arrays = [_mask_array(m, i, size) for i, m in enumerate(masks)]
    # bool masks have no ignore value; in integer masks 255 marks pixels counted nowhere (VOC's void)
    seg = [a if a.dtype == torch.bool else (a != 0) & (a != IGNORE_INDEX) for a in arrays]
    valid = [torch.ones_like(a, dtype=torch.bool) if a.dtype == torch.bool else a != IGNORE_INDEX
             for a in arrays]
    return GroundTruth(box_masks=box_masks, seg_masks=torch.stack(seg), seg_valid=torch.stack(valid),
                       num_boxes=counts)


def _box_array(entry: Any, index: int) -> torch.Tensor:
    """One image's boxes as float32 [K, 4] (the datasets' dtype), finite, x1 >= x0, y1 >= y0."""
    try:
        own = torch.as_tensor(np.asarray(entry, dtype=np.float64))
    except (TypeError, ValueError):  # ragged lists, entries that are not numbers
        own = torch.full((1, 3), float("nan"))
    own = own.reshape(-1, 4) if own.numel() % 4 == 0 else torch.full((1, 4), float("nan"))
    if not torch.isfinite(own).all() or (own[:, 2:] < own[:, :2]).any():
        raise SettingError(f"localize: boxes[{index}] must be finite xyxy boxes [K, 4] with x1 >= x0 and "
                           "y1 >= y0")
    return own.float()


def _image_size(entry: Any, index: int) -> tuple[int, int]:
    """One (width, height) of `box_image_sizes`: two positive integers."""
    values = tuple(entry) if isinstance(entry, (tuple, list, torch.Size)) else ()
    if len(values) != 2 or not all(isinstance(v, (int, np.integer)) and v > 0 for v in values):
        raise SettingError(f"localize: box_image_sizes[{index}]={entry!r} must be (width, height) in pixels")
    return int(values[0]), int(values[1])


def _mask_array(entry: Any, index: int, size: tuple[int, int]) -> torch.Tensor:
    """One image's mask as a bool or integer [H, W] tensor at the heatmap size."""
    mask = entry.detach().cpu() if isinstance(entry, torch.Tensor) else np.asarray(entry)
    if isinstance(mask, np.ndarray) and (mask.dtype == np.bool_ or np.issubdtype(mask.dtype, np.integer)):
        mask = torch.from_numpy(mask if mask.dtype == np.bool_ else mask.astype(np.int64))
    numbers = torch.is_tensor(mask) and not (mask.is_floating_point() or mask.is_complex())
    if not numbers or tuple(mask.shape) != size:
        raise SettingError(f"localize: masks[{index}] must be bool or integer [{size[0]}, {size[1]}] (the "
                           f"heatmap size), got {mask.dtype} {tuple(mask.shape)}")
    return mask


def as_frame(results: Sequence[ImageLocalization]) -> pd.DataFrame:
    """One row per image: its index, threshold, box counts and scores, records.csv's names."""
    return pd.DataFrame([{"image": i, "threshold": r.threshold, "n_gt_boxes": r.n_gt_boxes,
                          "n_pred_boxes": r.n_pred_boxes, **r.scores} for i, r in enumerate(results)])
