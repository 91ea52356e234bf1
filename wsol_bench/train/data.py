"""Training-time data: label-only batches from any dataset adapter (streamed through
DataLoader workers, or drawn from the image cache), and the train augmentations. Only the class
label of a sample is used; boxes and masks never leave the dataset here."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms.v2 import functional as TF

from wsol_bench.datasets import Sample, SkippedSample
from wsol_bench.datasets.base import normalize_image, resize_sample
from wsol_bench.errors import SettingError, counted
from wsol_bench.train.image_cache import DatasetSpec, ImageCache, cached_images, class_label

BATCH_AUGMENTS = ("none", "hflip", "dihedral")  # applied to whole batches on the device
SAMPLE_AUGMENTS = ("timm",)                       # applied per image to the decoded original


class LabelledImage(NamedTuple):
    """What the trainer needs of a sample: the image and its class."""

    image: torch.Tensor
    label: int
    image_id: str


def as_labelled(sample: Sample | SkippedSample) -> LabelledImage | SkippedSample:
    """Drop everything but image and label (a missing label is an error: the trainer needs a
    classification dataset)."""
    if isinstance(sample, SkippedSample):
        return sample
    return LabelledImage(sample.image, class_label(sample), sample.image_id)


class ResizeNormalize:
    """Resize to the model input and normalise: the benchmark's `EvalTransform` for images."""

    def __init__(self, size: tuple[int, int], mean: Sequence[float], std: Sequence[float],
                 interpolation: str = "bilinear") -> None:
        self.size, self.mean, self.std = tuple(size), tuple(mean), tuple(std)
        self.interpolation = interpolation

    def __call__(self, sample: Sample | SkippedSample) -> LabelledImage | SkippedSample:
        if isinstance(sample, SkippedSample):
            return sample
        label = class_label(sample)
        bare = Sample(sample.image, label, torch.zeros(0, 4), sample.image_id, sample.orig_size)
        image = resize_sample(bare, self.size, self.interpolation).image
        return LabelledImage(normalize_image(image, self.mean, self.std), label, sample.image_id)


class TimmTrainTransform:
    """timm's standard training augmentation (random resized crop, flips, optional colour
    jitter / auto-augment / random erasing) on the decoded original image, then normalisation."""

    def __init__(self, size: tuple[int, int], mean: Sequence[float], std: Sequence[float],
                 interpolation: str = "bilinear", **params: Any) -> None:
        from timm.data import create_transform

        params = {k: (tuple(v) if isinstance(v, list) else v) for k, v in params.items()}
        self.transform = create_transform(input_size=tuple(size), is_training=True, mean=tuple(mean),
                                          std=tuple(std), interpolation=interpolation, **params)

    def __call__(self, sample: Sample | SkippedSample) -> LabelledImage | SkippedSample:
        if isinstance(sample, SkippedSample):
            return sample
        labelled = as_labelled(sample)
        return labelled._replace(image=self.transform(TF.to_pil_image(sample.image)))


@dataclass
class LabelledBatch:
    """Stacked images and labels of one batch, and the items of it that were skipped."""

    images: torch.Tensor
    labels: torch.Tensor
    skipped: list[SkippedSample] = field(default_factory=list)

    def pin_memory(self) -> LabelledBatch:
        """Page-locked copy (DataLoader(pin_memory=True) calls this) for fast copies to a GPU."""
        return LabelledBatch(self.images.pin_memory(), self.labels.pin_memory(), self.skipped)


def collate_labelled(items: list[LabelledImage | SkippedSample]) -> LabelledBatch:
    """Stack the usable items; set skipped ones aside so they can be counted."""
    kept = [i for i in items if not isinstance(i, SkippedSample)]
    skipped = [i for i in items if isinstance(i, SkippedSample)]
    images = torch.stack([i.image for i in kept]) if kept else torch.empty(0)
    return LabelledBatch(images, torch.tensor([i.label for i in kept], dtype=torch.long), skipped)


# ---------------------------------------------------------------- batch augmentations


def dihedral(images: torch.Tensor, ops: torch.Tensor) -> torch.Tensor:
    """Apply one of the 8 symmetries of the square to each image: bit 2 of `ops[i]` flips
    horizontally, bits 0-1 rotate by that many quarter turns."""
    if images.shape[-1] != images.shape[-2]:
        raise SettingError(f"train.augment=dihedral needs square inputs, got {tuple(images.shape[-2:])}; "
                           "use train.augment=hflip or a square preprocess.input_size")
    out = images.clone()
    ops = ops.cpu()
    for op in ops.unique().tolist():
        sel = (ops == op).nonzero().squeeze(1).to(images.device)
        x = images[sel].flip(-1) if op & 4 else images[sel]
        out[sel] = torch.rot90(x, op & 3, dims=(-2, -1))
    return out


def augment_batch(name: str, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Batch-level augmentation `name` (none, hflip, dihedral) drawn from `generator`."""
    if name == "none":
        return images
    if name == "hflip":
        flip = (torch.rand(len(images), generator=generator) < 0.5).to(images.device)
        return torch.where(flip[:, None, None, None], images.flip(-1), images)
    if name == "dihedral":
        return dihedral(images, torch.randint(0, 8, (len(images),), generator=generator))
    raise SettingError(f"unknown train.augment={name!r}; valid: "
                       f"{', '.join(BATCH_AUGMENTS + SAMPLE_AUGMENTS)}")


def normalize_batch(images_u8: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 [B, 3, H, W] -> float32 normalised, with the same operations as the benchmark's
    `normalize_image`, so cached and streamed images give identical inputs."""
    x = images_u8.float().div_(255.0)
    mean_t = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - mean_t) / std_t


def downsample_images(images: np.ndarray, size: int, chunk: int = 512) -> np.ndarray:
    """uint8 [N, 3, H, W] -> uint8 [N, 3, size, size], antialiased bilinear (torchvision's
    resize), in chunks so a memory-mapped cache is never read whole."""
    out = np.empty((len(images), images.shape[1], size, size), dtype=np.uint8)
    for start in range(0, len(images), chunk):
        part = torch.from_numpy(np.array(images[start:start + chunk]))  # a writable copy of the memory map
        out[start:start + chunk] = TF.resize(part, [size, size], antialias=True).numpy()
    return out


def resize_batch(batch: LabelledBatch, size: int | None) -> LabelledBatch:
    """The batch at `size` x `size` (antialiased bilinear); unchanged when `size` is None or
    already the batch's size."""
    if size is None or tuple(batch.images.shape[-2:]) == (size, size):
        return batch
    return LabelledBatch(TF.resize(batch.images, [size, size], antialias=True), batch.labels, batch.skipped)


class CachedBatches:
    """Batches drawn from an `ImageCache`: shuffled (training) or in order (evaluation),
    normalised on `device`; at a smaller square size on request (progressive resizing), from a
    copy of the cache downsampled once per size."""

    def __init__(self, cache: ImageCache, batch_size: int, mean: Sequence[float], std: Sequence[float],
                 device: torch.device, *, shuffle: bool) -> None:
        self.cache, self.batch_size, self.mean, self.std = cache, batch_size, tuple(mean), tuple(std)
        self.device, self.shuffle = device, shuffle
        self.valid = cache.valid
        self._downsampled: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        n = len(self.valid)
        return n // self.batch_size if self.shuffle else -(-n // self.batch_size)

    def images_at(self, size: int | None) -> np.ndarray:
        """The cached images, or their copy downsampled to `size` (made on first use)."""
        if size is None or self.cache.images.shape[-2:] == (size, size):
            self._downsampled.clear()  # back at full size: the smaller copy is not needed again
            return self.cache.images
        if size not in self._downsampled:
            self._downsampled = {size: downsample_images(self.cache.images, size)}  # one copy at a time
        return self._downsampled[size]

    def epoch(self, generator: torch.Generator | None = None, size: int | None = None) -> Iterator[LabelledBatch]:
        """One pass at `size` (None: the cached size); training drops the last incomplete batch
        so every step has the same size."""
        source = self.images_at(size)
        order = self.valid
        if self.shuffle:
            order = self.valid[torch.randperm(len(self.valid), generator=generator).numpy()]
        for b in range(len(self)):
            idx = order[b * self.batch_size:(b + 1) * self.batch_size]
            images = torch.from_numpy(np.ascontiguousarray(source[idx]))
            if self.device.type == "cuda":
                images = images.pin_memory()
            images = normalize_batch(images.to(self.device, non_blocking=True), self.mean, self.std)
            # labels stay on the CPU, where the trainer checks them without a device sync
            yield LabelledBatch(images, torch.from_numpy(self.cache.labels[idx]))


# ---------------------------------------------------------------- assembling the splits


def as_dict(node: Any) -> dict[str, Any]:
    """A config node (or None) as a plain, resolved dict."""
    return {} if node is None else dict(OmegaConf.to_container(node, resolve=True))


def split_spec(cfg: DictConfig, which: str) -> DatasetSpec:
    """The dataset config's parameters with the train group's `<which>_params` on top."""
    params = {**as_dict(cfg.dataset.params), **as_dict(cfg.train.get(f"{which}_params"))}
    return DatasetSpec(cfg.dataset.name, params)


def build_split(spec: DatasetSpec, which: str) -> Dataset:
    """Build one split; constructor errors name the settings to fix."""
    try:
        dataset = spec.build()
    except TypeError as exc:
        raise SettingError(f"dataset {spec.name!r} rejects its parameters {spec.params} ({exc}); fix "
                           f"dataset.params or train.{which}_params") from exc
    if not isinstance(getattr(dataset, "num_classes", None), int):  # a setting's value is wrong, not a type
        raise SettingError(
            f"dataset {spec.name!r} has no class labels (no integer num_classes); the trainer needs a "
            "classification dataset: choose another dataset.name")
    return dataset


@dataclass
class TrainData:
    """Where batches come from: `train(generator, size)` yields one shuffled epoch, `val(size)`
    the validation split in order (both at `size` x `size` when given)."""

    train: Callable[[torch.Generator, int | None], Iterator[LabelledBatch]]
    steps: int
    val: Callable[..., Iterator[LabelledBatch]]
    val_steps: int
    num_classes: int
    facts: dict[str, Any] = field(default_factory=dict)  # datasets, skipped items, decode time


def make_data(cfg: DictConfig, batch_size: int, augment: str, pre: dict[str, Any], device: torch.device,
              workers: int, progress: bool = False) -> TrainData:
    """Train and val batches of the configured dataset: from the image cache (train.cache=true,
    with a progress bar while it is decoded when `progress`) or streamed through `workers`
    DataLoader processes."""
    size, mean, std, interp = tuple(pre["size"]), pre["mean"], pre["std"], pre["interpolation"]
    train_spec, val_spec = split_spec(cfg, "train"), split_spec(cfg, "val")
    train_ds, val_ds = build_split(train_spec, "train"), build_split(val_spec, "val")
    if train_ds.num_classes != val_ds.num_classes:
        raise SettingError(f"train split has {counted(train_ds.num_classes, 'class', 'classes')} but val split "
                           f"{val_ds.num_classes}; check train.train_params / train.val_params")
    splits = (("train", train_spec, train_ds), ("val", val_spec, val_ds))
    facts: dict[str, Any] = {f"{w}_dataset": {"name": s.name, "params": s.params, "images": len(d)}
                             for w, s, d in splits}
    # items the dataset left out while indexing (e.g. VOC images with objects of several classes)
    facts["index_skipped"] = {w: len(getattr(d, "skipped", None) or []) for w, _, d in splits}
    if cfg.train.get("cache", False):
        cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else None
        caches = [cached_images(s, size, interp, cache_dir=cache_dir, workers=workers, progress=progress)
                  for _, s, _ in splits]
        facts["decode_seconds"] = round(sum(c.seconds for c in caches), 1)
        facts["cache_skipped"] = {w: len(c.skipped) for (w, _, _), c in zip(splits, caches)}
        train = CachedBatches(caches[0], batch_size, mean, std, device, shuffle=True)
        val = CachedBatches(caches[1], batch_size, mean, std, device, shuffle=False)
        return TrainData(train.epoch, len(train), lambda size=None: val.epoch(size=size), len(val),
                         train_ds.num_classes, facts)
    if augment == "timm":
        params = as_dict(cfg.train.get("timm_augment"))
        train_ds.transform = TimmTrainTransform(size, mean, std, interp, **params)
    else:
        train_ds.transform = ResizeNormalize(size, mean, std, interp)
    val_ds.transform = ResizeNormalize(size, mean, std, interp)
    common = {"batch_size": batch_size, "num_workers": workers, "collate_fn": collate_labelled,
              "pin_memory": device.type == "cuda"}
    val_loader = DataLoader(val_ds, shuffle=False, **common)

    def train_epoch(generator: torch.Generator, size: int | None = None) -> Iterator[LabelledBatch]:
        # The generator draws the order and the workers' seeds, so a resumed run repeats them.
        loader = DataLoader(train_ds, shuffle=True, drop_last=True, generator=generator, **common)
        return (resize_batch(batch, size) for batch in loader)

    return TrainData(train_epoch, len(train_ds) // batch_size,
                     lambda size=None: (resize_batch(batch, size) for batch in val_loader), len(val_loader),
                     train_ds.num_classes, facts)
