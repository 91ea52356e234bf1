"""Reference points every benchmark needs: a seeded random map and a centred Gaussian.
A method that does not beat them is not localizing."""

from __future__ import annotations

import hashlib

import torch

from wsol_bench.errors import SettingError

from .base import Explainer
from .registry import register_explainer


@register_explainer("random")
class RandomMap(Explainer):
    """Uniform noise on the patch grid, seeded by (seed, image content): the same image gets
    the same map in any batch, so batched equals one-at-a-time."""

    passes_per_image = "0 (the logits of the batch's first pass)"
    class_specific = False
    needs_class_token = False
    uses_model = False

    def __init__(self, model, seed: int = 0) -> None:
        super().__init__(model)
        self.seed = int(seed)

    def model_free_map(self, images, targets):
        maps = []
        for image in images:
            digest = hashlib.blake2b(image.detach().cpu().numpy().tobytes(), digest_size=8,
                                     key=self.seed.to_bytes(8, "little", signed=True)).digest()
            gen = torch.Generator().manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))
            maps.append(torch.rand(self.grid, generator=gen))
        return torch.stack(maps).to(images.device)


@register_explainer("center")
class CenterGaussian(Explainer):
    """exp(-d^2 / 2 sigma^2) around the grid centre; sigma is a fraction of each grid side."""

    passes_per_image = "0 (the logits of the batch's first pass)"
    class_specific = False
    needs_class_token = False
    uses_model = False

    def __init__(self, model, sigma: float = 0.25) -> None:
        super().__init__(model)
        if sigma <= 0:
            raise SettingError(f"center: sigma={sigma} must be > 0")
        self.sigma = float(sigma)

    def model_free_map(self, images, targets):
        gh, gw = self.grid
        ys = (torch.arange(gh, dtype=torch.float32) + 0.5 - gh / 2) / (self.sigma * gh)
        xs = (torch.arange(gw, dtype=torch.float32) + 0.5 - gw / 2) / (self.sigma * gw)
        gauss = torch.exp(-0.5 * (ys[:, None] ** 2 + xs[None, :] ** 2))
        return gauss.expand(len(images), gh, gw).to(images.device)
