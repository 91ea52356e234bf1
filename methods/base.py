"""The explainer contract: `Explainer(model, **params)(images, targets) -> Explanation`.

The base class owns what every method shares (device and dtype handling, target resolution
and validation, the patch grid and prefix tokens); a method overrides `explain` only.
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass

import torch
from torch import nn

from wsol_bench.errors import MissingLibraryError, SettingError, agreeing, counted
from wsol_bench.methods.capture import require_class_token
from wsol_bench.models import patch_grid

log = logging.getLogger("wsol_bench")


@dataclass
class Explanation:
    """Raw explanation of a batch.

    maps: float32 [B, gh, gw], raw and unnormalised, on the model's patch grid, or [B, H, W] at
    the input size for a method with `resolution = "pixel"` (gradient attributions, LRP).
    logits: [B, C] of the unperturbed images. targets: [B], the class each map explains.
    target_source: "given" or "predicted". class_specific: False for methods (rollout,
    random, center) whose map does not depend on the target.
    """

    maps: torch.Tensor
    logits: torch.Tensor
    targets: torch.Tensor
    target_source: str
    class_specific: bool = True


class Explainer:
    """Base class of every explainer. Subclasses set `name` and implement `explain`."""

    name = "explainer"
    class_specific = True
    needs_class_token = True
    # False for methods whose map needs no model pass (baselines): they implement
    # `model_free_map` and reuse logits the caller already has instead of a second forward.
    uses_model = True
    # "grid": maps on the patch grid [gh, gw]; "pixel": maps at the input size [H, W]
    resolution = "grid"
    # model passes per image (forward, or forward + backward), for the method table; costly
    # methods (steps, samples, occluded inputs) say how the count follows their parameters
    passes_per_image: str = "1"
    # the library an adapter method calls (captum, pytorch_grad_cam); the suite's own: wsol_bench
    library = "wsol_bench"

    def __init__(self, model: nn.Module, **params) -> None:
        if params:
            raise TypeError(f"{self.name}: unknown parameters {sorted(params)}")
        self.model = model
        if self.needs_class_token:
            require_class_token(model, self.name)
        self.grid = patch_grid(model)
        self.num_prefix = int(getattr(model, "num_prefix_tokens", 1))

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def map_shape(self, input_size: tuple[int, int]) -> tuple[int, int]:
        """The shape of this method's maps for [H, W] inputs: the patch grid, or [H, W]."""
        return tuple(int(v) for v in input_size) if self.resolution == "pixel" else tuple(self.grid)

    def __call__(self, images: torch.Tensor, targets: torch.Tensor | None = None, *,
                 logits: torch.Tensor | None = None) -> Explanation:
        """Explain `images` for `targets` (None: the predicted classes). `logits` of the same
        images, when the caller has them, spare model-free methods a forward pass."""
        images = images.to(self.device, torch.float32, non_blocking=True)  # pinned batches copy asynchronously
        if targets is not None:
            targets = torch.as_tensor(targets, dtype=torch.long, device=self.device).reshape(-1)
            if len(targets) != len(images):
                raise SettingError(f"{self.name}: {len(targets)} targets for {len(images)} images")
        if self.uses_model:
            maps, logits, used = self.explain(images, targets)
        else:
            logits = self.logits_only(images) if logits is None else logits.to(self.device)
            used = self.resolve_targets(logits, targets)
            maps = self.model_free_map(images, used)
        self._check_output(len(images), maps, logits, used, self.map_shape(images.shape[-2:]))
        return Explanation(maps=maps.detach().float(), logits=logits.detach(), targets=used.detach(),
                           target_source="given" if targets is not None else "predicted",
                           class_specific=self.class_specific)

    def _check_output(self, batch: int, maps, logits, targets, shape: tuple[int, int]) -> None:
        """What a method returns must be usable as it is: maps of `shape` (the model's grid, or
        the input size for pixel maps), finite logits (a NaN logit would make every prediction
        class 0). Non-finite maps are allowed but reported: they are scored as degenerate and
        counted in every table."""
        expected = (batch, *shape)
        if not isinstance(maps, torch.Tensor) or not maps.is_floating_point() or tuple(maps.shape) != expected:
            found = f"{maps.dtype} {tuple(maps.shape)}" if isinstance(maps, torch.Tensor) else type(maps).__name__
            where = "the input size" if self.resolution == "pixel" else f"the model's {shape[0]}x{shape[1]} patch grid"
            raise ValueError(f"{self.name}: returned maps {found}, expected floating-point maps of shape "
                             f"{expected} ({where})")
        if not isinstance(logits, torch.Tensor) or logits.ndim != 2 or len(logits) != batch:
            raise ValueError(f"{self.name}: returned logits of shape {tuple(getattr(logits, 'shape', ()))}, "
                             f"expected [{batch}, classes]")
        if not isinstance(targets, torch.Tensor) or tuple(targets.shape) != (batch,):
            raise ValueError(f"{self.name}: returned targets of shape {tuple(getattr(targets, 'shape', ()))}, "
                             f"expected [{batch}]")
        bad_logits = int((~torch.isfinite(logits).all(1)).sum())
        if bad_logits:
            raise SettingError(f"the model gave non-finite logits (NaN or inf) for {bad_logits} of {batch} "
                               f"images (seen by {self.name}); check its weights (model.checkpoint) and the "
                               "input normalisation (preprocess.std must not be 0)")
        bad_maps = int((~torch.isfinite(maps.detach()).flatten(1).all(1)).sum())
        if bad_maps:
            log.warning("%s: %d of %s %s NaN or inf; %s scored as degenerate", self.name, bad_maps,
                        counted(batch, "map"), agreeing(bad_maps, "holds", "hold"),
                        agreeing(bad_maps, "it is", "they are"))

    def explain(self, images: torch.Tensor, targets: torch.Tensor | None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return (maps [B, gh, gw] or, for pixel maps, [B, H, W], logits [B, C], targets [B])."""
        raise NotImplementedError

    def model_free_map(self, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """[B, gh, gw] map of a method with `uses_model = False`."""
        raise NotImplementedError

    # -- helpers shared by methods --------------------------------------------------------------
    def resolve_targets(self, logits: torch.Tensor, targets: torch.Tensor | None) -> torch.Tensor:
        """The given targets (checked against the number of classes), else the predictions."""
        if targets is None:
            return logits.argmax(1)
        num_classes = logits.shape[1]
        bad = (targets < 0) | (targets >= num_classes)
        if bad.any():
            raise SettingError(f"{self.name}: target {int(targets[bad][0])} is out of range for "
                               f"{type(self.model).__name__} with {num_classes} classes")
        return targets

    def patch_map(self, token_scores: torch.Tensor) -> torch.Tensor:
        """[B, N] scores over all tokens -> [B, gh, gw] over the patch tokens."""
        gh, gw = self.grid
        patches = token_scores[:, self.num_prefix:]
        if patches.shape[1] != gh * gw:
            raise SettingError(f"{self.name}: {patches.shape[1]} patch tokens do not fill the "
                               f"{gh}x{gw} grid of {type(self.model).__name__}")
        return patches.reshape(-1, gh, gw)

    @torch.no_grad()
    def logits_only(self, images: torch.Tensor) -> torch.Tensor:
        """One inference pass, for methods whose map does not need the model."""
        return self.model(images)


def check_start_layer(method: str, start_layer: int, depth: int) -> int:
    """The first block a rollout starts from, an integer in [0, depth); anything else is a
    SettingError naming the method and the model's depth."""
    if isinstance(start_layer, bool) or int(start_layer) != start_layer or not 0 <= start_layer < depth:
        raise SettingError(f"{method}: start_layer={start_layer!r} must be an integer in [0, {depth}) for a "
                           f"model with {depth} blocks")
    return int(start_layer)


def require_library(module: str, method: str, extra: str = "explainers"):
    """Import `module` for explainer `method`, or refuse in one line naming the install command."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingLibraryError(f"method {method} needs the {module.split('.')[0]} package ({exc}); install it "
                                  f'with: pip install "wsol-bench[{extra}]"') from exc


def target_score(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """sum_b logits[b, t_b]: in eval mode each image's gradient of this sum is its own."""
    return logits.gather(1, targets[:, None]).sum()
