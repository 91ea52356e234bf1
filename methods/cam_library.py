"""CAM methods of the pytorch-grad-cam library (`pip install grad-cam`, import pytorch_grad_cam)
on a timm ViT: Grad-CAM++, XGrad-CAM, HiRes-CAM, Layer-CAM, Eigen-CAM, Score-CAM, Ablation-CAM
(and the library's plain Grad-CAM, as a cross-check of the suite's own `gradcam`).

Each method is the library's own CAM object, built per call on `target_layer` (default
`blocks.-1.norm1`: the tokens entering the last attention, as the suite's Grad-CAM, docs/protocol.md
2.5; after the last attention the patch tokens no longer reach the CLS output) with the ViT token
reshape (prefix tokens dropped, patch tokens -> [B, C, gh, gw]), and run through the library's
own forward (its hooks, targets, backward and channel weights).

Patch-grid maps: the library resizes each CAM to the input size and min-max scales it in
`scale_cam_image`. Here the CAM class is extended with a mixin that (1) makes
`get_target_width_height` return the patch grid, so the library's resize is to the same size, and
(2) records what the library's `get_cam_image` returns: the per-layer CAM at the activation
resolution, before any scaling. The returned map is that raw CAM after the library's own ReLU
(`np.maximum(cam, 0)` in `compute_cam_per_layer`); the suite's heatmap step (bilinear
upsampling + min-max, docs/protocol.md section 3) then applies as for every grid method, and
gives the library's full-size map (min-max(resize(min-max(cam))) == min-max(resize(cam)):
bilinear resizing commutes with an affine rescaling).
"""

from __future__ import annotations

import contextlib
import importlib
import sys
from types import SimpleNamespace

import numpy as np
import torch
from torch import nn

from wsol_bench.errors import SettingError
from wsol_bench.models import UnsupportedModelError

from .base import Explainer, require_library
from .registry import register_explainer

DEFAULT_LAYER = "blocks.-1.norm1"
LIBRARY = "pytorch_grad_cam"


def resolve_layer(model: nn.Module, path: str, method: str) -> tuple[nn.Module, nn.Module, str]:
    """(layer, parent, key) of the dotted module path `path` in `model`; integer parts index a
    ModuleList or Sequential and may be negative. A missing part is refused in one line listing
    what exists at that level."""
    if not isinstance(path, str) or not path or any(not part for part in path.split(".")):
        raise SettingError(f"{method}: target_layer={path!r}; valid: a dotted module path such as "
                           f"{DEFAULT_LAYER!r}")
    module, parent, key, walked = model, model, "", []
    for part in path.split("."):
        where = f"{'.'.join(walked)} ({type(module).__name__})" if walked else type(module).__name__
        parent = module
        if isinstance(module, (nn.ModuleList, nn.Sequential)) and part.lstrip("-").isdigit():
            index, size = int(part), len(module)
            if not -size <= index < size:
                raise UnsupportedModelError(f"{method}: target_layer={path!r}: {where} has {size} entries; "
                                            f"valid indices: {-size}..{size - 1}")
            key = str(index % size)
        elif module._modules.get(part) is not None:
            key = part
        else:
            children = ", ".join(k for k, v in module._modules.items() if v is not None) or "no submodules"
            raise UnsupportedModelError(f"{method}: target_layer={path!r}: {where} has no module {part!r}; "
                                        f"it has: {children}")
        module = module._modules[key]
        walked.append(part)
    return module, parent, key


def check_batch_size(method: str, batch_size) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise SettingError(f"{method}: batch_size={batch_size!r}; valid: an integer >= 1 (inputs per "
                           "internal pass)")
    return batch_size


def _make_leaf(module, args, output):
    """Forward hook: the layer output as a leaf that requires grad (the suite's weights are
    frozen, so the library would otherwise find no gradient); backward stops here."""
    if isinstance(output, torch.Tensor) and output.is_floating_point():
        return output.detach().requires_grad_(True)
    return None


@contextlib.contextmanager
def _no_tqdm(module):
    """Score-CAM and Ablation-CAM draw a tqdm bar per image; the suite has its own progress."""
    saved = getattr(module, "tqdm", None)
    if saved is None:
        yield
        return
    module.tqdm = SimpleNamespace(tqdm=lambda iterable, *args, **kwargs: iterable)
    try:
        yield
    finally:
        module.tqdm = saved


class _GridCAM:
    """Mixed into a pytorch_grad_cam CAM class: the library's pipeline at the patch grid, with
    the raw per-layer CAM (and the targets it explained) recorded."""

    grid_wh: tuple[int, int] = (0, 0)
    raw_cam: np.ndarray | None = None
    categories: list[int] | None = None

    def get_target_width_height(self, input_tensor):
        return self.grid_wh  # (width, height), the order of cv2.resize and of the library

    def get_cam_image(self, input_tensor, target_layer, targets, activations, grads, eigen_smooth=False):
        cam = super().get_cam_image(input_tensor, target_layer, targets, activations, grads, eigen_smooth)
        self.raw_cam = cam
        self.categories = [int(t.category) for t in targets]
        return cam


class LibraryCAM(Explainer):
    """A pytorch_grad_cam CAM class (`library_class`) on `target_layer` of a timm ViT; maps are
    the library's raw CAM on the patch grid, after its ReLU, before its min-max scaling."""

    library = LIBRARY
    library_class = "GradCAM"
    uses_gradients = True
    needs_class_token = False
    resolution = "grid"
    passes_per_image = "1 forward + 1 backward"
    images_per_call: int | None = None  # None: the whole batch in one library call

    def __init__(self, model, target_layer: str = DEFAULT_LAYER) -> None:
        self.layer, self._parent, self._key = resolve_layer(model, target_layer, self.name)
        super().__init__(model)
        self.target_layer = target_layer
        self._lib = require_library(LIBRARY, self.name)
        self._target_class = importlib.import_module(f"{LIBRARY}.utils.model_targets").ClassifierOutputTarget
        base = getattr(self._lib, self.library_class)
        self._cam_class = type(f"Grid{base.__name__}", (_GridCAM, base), {})
        self._cam_module = sys.modules[base.__module__]

    def _make_cam(self):
        return self._cam_class(model=self.model, target_layers=[self.layer], reshape_transform=self._to_grid)

    def _to_grid(self, tensor):
        """[B, prefix + gh*gw, C] tokens -> [B, C, gh, gw] patch tokens (the library's reshape_transform)."""
        gh, gw = self.grid
        if (not isinstance(tensor, torch.Tensor) or tensor.ndim != 3
                or tensor.shape[1] - gh * gw not in (0, self.num_prefix)):
            found = list(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            raise UnsupportedModelError(
                f"{self.name}: target_layer={self.target_layer!r} outputs {found}, not [B, {self.num_prefix} + "
                f"{gh}*{gw}, C] tokens of {type(self.model).__name__}; use a layer inside a block "
                f"(default {DEFAULT_LAYER!r})")
        return tensor[:, tensor.shape[1] - gh * gw:].reshape(len(tensor), gh, gw, -1).permute(0, 3, 1, 2)

    def explain(self, images, targets):
        num_classes = getattr(self.model, "num_classes", None)
        if targets is not None and isinstance(num_classes, int) and num_classes > 0:
            self.resolve_targets(images.new_zeros(0, num_classes), targets)  # before the library indexes
        step = self.images_per_call or len(images)
        parts = [self._library_call(images[i:i + step], None if targets is None else targets[i:i + step])
                 for i in range(0, len(images), step)]
        maps, logits, used = (torch.cat(p) for p in zip(*parts))
        if targets is not None:
            used = self.resolve_targets(logits, targets)
        return maps, logits, used

    def _library_call(self, images, targets):
        gh, gw = self.grid
        layer = self.layer
        hook_ids = {name: set(getattr(layer, name)) for name in _HOOK_DICTS}
        leaf = layer.register_forward_hook(_make_leaf, prepend=True) if self.uses_gradients else None
        cam = None
        try:
            cam = self._make_cam()
            cam.grid_wh = (gw, gh)
            wanted = None if targets is None else [self._target_class(t) for t in targets.tolist()]
            with (torch.enable_grad() if self.uses_gradients else torch.no_grad()), _no_tqdm(self._cam_module):
                cam(input_tensor=images, targets=wanted)
            maps = torch.from_numpy(np.maximum(cam.raw_cam, 0)).to(self.device, torch.float32)
            logits = cam.outputs.detach()
            used = torch.as_tensor(cam.categories, dtype=torch.long, device=self.device)
        finally:
            if cam is not None:
                cam.activations_and_grads.release()
            if leaf is not None:
                leaf.remove()
            self._restore(hook_ids)
        return maps.reshape(-1, gh, gw), logits, used

    def _restore(self, hook_ids: dict[str, set[int]]) -> None:
        """Leave the shared model as it was: the target layer back in place (Ablation-CAM swaps
        it out) and no hook the library registered on it (one leaks if a pass raises)."""
        if self._parent._modules.get(self._key) is not self.layer:
            self._parent._modules[self._key] = self.layer
        for name in _HOOK_DICTS:
            hooks = getattr(self.layer, name)
            for hook_id in set(hooks) - hook_ids[name]:
                hooks.pop(hook_id)
                for extra in ("_forward_hooks_with_kwargs", "_forward_hooks_always_called"):
                    getattr(self.layer, extra, {}).pop(hook_id, None)


_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


@register_explainer("gradcam_library")
class LibraryGradCAM(LibraryCAM):
    """The library's GradCAM: ReLU(sum_c mean_grid(dy/dA_c) A_c), the formula of the suite's own
    `gradcam` (a cross-check of this adapter). Map: raw (after ReLU, before min-max scaling)."""

    library_class = "GradCAM"


@register_explainer("gradcam_pp")
class GradCAMPlusPlus(LibraryCAM):
    """Grad-CAM++ (Chattopadhyay et al., WACV 2018), the library's GradCAMPlusPlus: channel
    weights sum_grid alpha * ReLU(g) with alpha = g^2 / (2 g^2 + sum_grid(A) g^3). Map: raw
    (the library's CAM after its ReLU, before its min-max scaling)."""

    library_class = "GradCAMPlusPlus"


@register_explainer("xgradcam")
class XGradCAM(LibraryCAM):
    """XGrad-CAM (Fu et al., BMVC 2020), the library's XGradCAM: channel weights
    sum_grid(g * A) / sum_grid(A). Map: raw (after the library's ReLU, before min-max scaling)."""

    library_class = "XGradCAM"


@register_explainer("hirescam")
class HiResCAM(LibraryCAM):
    """HiRes-CAM (Draelos & Carin 2020), the library's HiResCAM: sum_c g_c * A_c per patch (no
    grid averaging of the gradient). Map: raw (after the library's ReLU, before min-max scaling)."""

    library_class = "HiResCAM"


@register_explainer("layercam")
class LayerCAM(LibraryCAM):
    """Layer-CAM (Jiang et al., TIP 2021), the library's LayerCAM: sum_c ReLU(g_c) * A_c per
    patch. Map: raw (after the library's ReLU, before min-max scaling)."""

    library_class = "LayerCAM"


@register_explainer("eigencam")
class EigenCAM(LibraryCAM):
    """Eigen-CAM (Muhammad & Yeasin, IJCNN 2020), the library's EigenCAM: the projection of the
    centred patch activations on their first principal direction (SVD; its sign is arbitrary, and
    the library's ReLU keeps the positive side). Ignores the target; one forward, no backward.
    Map: raw (after the library's ReLU, before min-max scaling)."""

    library_class = "EigenCAM"
    uses_gradients = False
    class_specific = False
    passes_per_image = "1 forward"


@register_explainer("scorecam")
class ScoreCAM(LibraryCAM):
    """Score-CAM (Wang et al., CVPRW 2020), the library's ScoreCAM: each activation channel,
    upsampled to the input and min-max scaled, masks the (normalised) image; channel weights are
    the softmax over channels of the target logit of the masked images. One forward per channel
    (384 for ViT-S, 768 for ViT-B), `batch_size` masked images per pass; images go through the
    library one at a time (its masked copies of a whole batch would need B*C*3*H*W floats).
    Map: raw (after the library's ReLU, before min-max scaling)."""

    library_class = "ScoreCAM"
    uses_gradients = False
    passes_per_image = "1 + C forwards (C: target_layer channels, 384 ViT-S, 768 ViT-B), batch_size at a time"
    images_per_call = 1

    def __init__(self, model, target_layer: str = DEFAULT_LAYER, batch_size: int = 16) -> None:
        self.batch_size = check_batch_size(self.name, batch_size)
        super().__init__(model, target_layer)

    def _make_cam(self):
        cam = super()._make_cam()
        cam.batch_size = self.batch_size  # read by ScoreCAM.get_cam_weights (library default 16)
        return cam


@register_explainer("ablationcam")
class AblationCAM(LibraryCAM):
    """Ablation-CAM (Desai & Ramaswamy, WACV 2020), the library's AblationCAM with its ViT
    ablation layer (AblationLayerVit): channel weights are the relative drop of the target logit
    when the channel is ablated in the target layer's output (the library sets it to
    min(output) - 1e7, since ViT activations are not >= 0). Two plain forwards and one forward
    per channel (384 for ViT-S, 768 for ViT-B), `batch_size` ablated copies per pass.
    Map: raw (after the library's ReLU, before min-max scaling)."""

    library_class = "AblationCAM"
    uses_gradients = False
    passes_per_image = "2 + C forwards (C: target_layer channels, 384 ViT-S, 768 ViT-B), batch_size at a time"

    def __init__(self, model, target_layer: str = DEFAULT_LAYER, batch_size: int = 32) -> None:
        self.batch_size = check_batch_size(self.name, batch_size)
        super().__init__(model, target_layer)

    def _make_cam(self):
        return self._cam_class(model=self.model, target_layers=[self.layer], reshape_transform=self._to_grid,
                               ablation_layer=self._lib.AblationLayerVit(), batch_size=self.batch_size)
