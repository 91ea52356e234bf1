"""How much an explanation moves when its input moves a little (docs/protocol.md 5.7): max- and
average sensitivity (Yeh et al., NeurIPS 2019; Bhatt et al., IJCAI 2020). Each image gets
`nr_samples` noisy copies x + delta, delta uniform in the L-infinity ball of radius `radius`
around the model input; each copy is explained for the class of the clean map, and its change
is ||e(x + delta) - e(x)||_F / ||e(x)||_F over the heatmaps at the evaluation size.

The copies of several images are explained together, `batch_size` copies per explainer call;
copy s of image `image_id` draws its noise from its own generator, seeded by (seed, image id,
s), so the numbers do not depend on the batching, the device or which other images share the
call."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

# (copies [N, 3, H, W], classes [N]) -> (heatmaps [N, H, W] in [0, 1], degenerate [N] bool)
ExplainHeatmaps = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def noise_seed(seed: int, image_id: str, sample: int) -> int:
    """The generator seed of copy `sample` of image `image_id`: a keyed hash of the two, so
    every copy has its own stream whatever else is drawn around it."""
    message = int(sample).to_bytes(8, "little") + str(image_id).encode("utf-8")  # fixed-width prefix: unambiguous
    digest = hashlib.blake2b(message, digest_size=8, key=int(seed).to_bytes(8, "little", signed=True)).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def input_noise(shape: Sequence[int], radius: float, seed: int, image_id: str, sample: int) -> torch.Tensor:
    """float32 noise of `shape`, every value uniform in [-radius, radius), for copy `sample` of
    image `image_id` (drawn on the CPU: the same noise on every device)."""
    generator = torch.Generator().manual_seed(noise_seed(seed, image_id, sample))
    return (torch.rand(tuple(shape), generator=generator) * 2 - 1) * radius


def relative_change(clean: torch.Tensor, noisy: torch.Tensor) -> torch.Tensor:
    """[N] float64: ||noisy_n - clean_n||_F / ||clean_n||_F of maps [N, ...] (Frobenius norm of
    the flattened maps, as Yeh et al.'s code and Quantus use). A clean map of norm 0 has none
    (NaN)."""
    clean, noisy = clean.flatten(1).double(), noisy.flatten(1).double().to(clean.device)
    scale = clean.norm(dim=1)
    return torch.where(scale > 0, (noisy - clean).norm(dim=1) / scale, torch.nan)


@dataclass
class CopyChanges:
    """The relative change of every noisy copy's map ([K, nr_samples] float64) and, per image,
    how many copies had a degenerate map ([K] int64; its heatmap is all zeros, docs/protocol.md 3)."""

    changes: torch.Tensor
    degenerate: torch.Tensor

    def max_sensitivity(self) -> torch.Tensor:
        """[K]: the largest change over the copies (Yeh et al.'s SENS_MAX)."""
        return self.changes.max(dim=1).values

    def avg_sensitivity(self) -> torch.Tensor:
        """[K]: the mean change over the copies (average sensitivity)."""
        return self.changes.mean(dim=1)


def copy_changes(explain: ExplainHeatmaps, images: torch.Tensor, heatmaps: torch.Tensor, classes: torch.Tensor,
                 image_ids: Sequence[str], *, radius: float, nr_samples: int, seed: int, batch_size: int
                 ) -> CopyChanges:
    """The change of each of `nr_samples` noisy copies of each image (`images` [K, 3, H, W] the
    model inputs, `heatmaps` [K, H, W] their clean maps, `classes` [K] the classes they explain,
    `image_ids` [K] seeding the noise): every copy of every image in one queue, explained
    `batch_size` copies per call, each chunk's maps reduced to one number per copy at once (the
    noisy maps are never all held)."""
    count = len(images)
    pairs = [(index, sample) for index in range(count) for sample in range(nr_samples)]
    changes = torch.full((count, nr_samples), torch.nan, dtype=torch.float64)
    degenerate = torch.zeros(count, dtype=torch.int64)
    images = images.detach().float().cpu()
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        rows = torch.tensor([index for index, _ in chunk])
        columns = torch.tensor([sample for _, sample in chunk])
        copies = torch.stack([images[index] + input_noise(images.shape[1:], radius, seed, image_ids[index], sample)
                              for index, sample in chunk])
        noisy, flags = explain(copies, classes[rows])
        changes[rows, columns] = relative_change(heatmaps[rows].cpu(), noisy.detach().cpu())
        degenerate.index_add_(0, rows, flags.detach().cpu().long())
    return CopyChanges(changes, degenerate)
