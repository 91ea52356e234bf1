"""Training-time data: label-only batches from any dataset adapter, the train augmentations,
and a cache of pre-decoded images for datasets that are expensive to produce (the synthetic
renderer costs 10-20 ms per image, more than a training step of the shipped model on a CPU).

Only the class label of a sample is used; boxes and masks never leave the dataset here."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision.transforms.v2 import functional as TF
from tqdm import tqdm

from wsol_bench.datasets import Sample, SkippedSample, build_dataset
from wsol_bench.datasets.base import normalize_image, resize_sample

log = logging.getLogger("wsol_bench.train")
CACHE_FORMAT = 1
BATCH_AUGMENTS = ("none", "hflip", "dihedral")  # applied to whole batches on the device
SAMPLE_AUGMENTS = ("timm",)                       # applied per image to the decoded original


@dataclass(frozen=True)
class DatasetSpec:
    """A dataset by registry name and constructor parameters (picklable, so worker processes
    can rebuild it)."""

    name: str
    params: dict[str, Any]

    def build(self, transform=None) -> Dataset:
        """The dataset, with `transform` applied to every sample."""
        return build_dataset(self.name, transform=transform, **self.params)


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
    label = sample.label
    if label is None or isinstance(label, bool) or int(label) != label or int(label) < 0:
        raise ValueError(f"image {sample.image_id} has no class label (label={label!r}); the trainer needs a "
                         "dataset whose samples carry a class index >= 0: choose another dataset.name")
    return LabelledImage(sample.image, int(sample.label), sample.image_id)


class ResizeNormalize:
    """Resize to the model input and normalise: the benchmark's `EvalTransform` for images."""

    def __init__(self, size: tuple[int, int], mean: Sequence[float], std: Sequence[float],
                 interpolation: str = "bilinear") -> None:
        self.size, self.mean, self.std, self.interpolation = tuple(size), tuple(mean), tuple(std), interpolation

    def __call__(self, sample: Sample | SkippedSample) -> LabelledImage | SkippedSample:
        if isinstance(sample, SkippedSample):
            return sample
        sample = resize_sample(Sample(sample.image, sample.label, torch.zeros(0, 4), sample.image_id,
                                      sample.orig_size), self.size, self.interpolation)
        return as_labelled(Sample(normalize_image(sample.image, self.mean, self.std), sample.label,
                                  sample.boxes, sample.image_id, sample.orig_size))


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
        raise ValueError(f"train.augment=dihedral needs square inputs, got {tuple(images.shape[-2:])}; "
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
    raise ValueError(f"unknown train.augment={name!r}; valid: {', '.join(BATCH_AUGMENTS + SAMPLE_AUGMENTS)}")


def normalize_batch(images_u8: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 [B, 3, H, W] -> float32 normalised, with the same operations as the benchmark's
    `normalize_image`, so cached and streamed images give identical inputs."""
    x = images_u8.float().div_(255.0)
    mean_t = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - mean_t) / std_t


# ---------------------------------------------------------------- image cache


@dataclass
class ImageCache:
    """Every image of a dataset split resized to the model input, as uint8 [N, 3, H, W]
    (a memory map when the cache lives on disk); labels [N] with -1 where the item was skipped."""

    images: np.ndarray
    labels: np.ndarray
    skipped: list[SkippedSample]
    seconds: float = 0.0  # time spent producing it (0 when read from disk)

    @property
    def valid(self) -> np.ndarray:
        """Indices of the usable items."""
        return np.flatnonzero(self.labels >= 0)


def _package_digest() -> str:
    # Any change to the dataset code (generator, loaders, resizing) invalidates cached images,
    # so a run never trains on stale pixels.
    folder = Path(build_dataset.__code__.co_filename).parent
    digest = hashlib.sha256()
    for path in sorted(folder.glob("*.py")):
        digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()[:16]


def cache_key(spec: DatasetSpec, size: tuple[int, int], interpolation: str) -> str:
    """Folder name of a cached split: readable prefix plus a hash of everything that shapes
    the pixels."""
    payload = {"format": CACHE_FORMAT, "name": spec.name, "params": spec.params, "size": list(size),
               "interpolation": interpolation, "code": _package_digest()}
    digest = hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return f"{spec.name}_{spec.params.get('split', 'split')}_{size[0]}x{size[1]}_{digest}"


_WORKER: dict[str, Any] = {}


def _init_worker(spec: DatasetSpec, size: tuple[int, int], interpolation: str) -> None:
    torch.set_num_threads(1)  # one process per core already
    _WORKER.update(dataset=spec.build(), size=size, interpolation=interpolation)


def _decode_chunk(indices: list[int]) -> tuple[list[int], np.ndarray, np.ndarray, list[SkippedSample]]:
    dataset, size, interpolation = _WORKER["dataset"], _WORKER["size"], _WORKER["interpolation"]
    images = np.zeros((len(indices), 3, *size), dtype=np.uint8)
    labels = np.full(len(indices), -1, dtype=np.int64)
    skipped = []
    for j, index in enumerate(indices):
        sample = dataset[index]
        if isinstance(sample, SkippedSample):
            skipped.append(sample)
            continue
        labelled = as_labelled(sample)
        if sample.image.dtype != torch.uint8:
            raise ValueError(f"image {sample.image_id} is {sample.image.dtype}, not uint8; the image cache "
                             "expects decoded images (set train.cache=false for this dataset)")
        sample = resize_sample(Sample(sample.image, labelled.label, torch.zeros(0, 4), sample.image_id,
                                      sample.orig_size), size, interpolation)
        images[j] = sample.image.numpy()
        labels[j] = labelled.label
    return indices, images, labels, skipped


def _decode_all(spec: DatasetSpec, count: int, size: tuple[int, int], interpolation: str, workers: int,
                images: np.ndarray, labels: np.ndarray, progress: bool) -> list[SkippedSample]:
    chunk = max(1, min(256, count // max(1, workers * 8)))
    chunks = [list(range(i, min(count, i + chunk))) for i in range(0, count, chunk)]
    skipped: list[SkippedSample] = []
    bar = tqdm(total=count, desc=f"decoding {spec.name}/{spec.params.get('split', '')}", disable=not progress,
               unit="img")

    def store(result: tuple[list[int], np.ndarray, np.ndarray, list[SkippedSample]]) -> None:
        idx, imgs, labs, skip = result
        images[idx[0]:idx[-1] + 1] = imgs
        labels[idx[0]:idx[-1] + 1] = labs
        skipped.extend(skip)
        bar.update(len(idx))

    if workers <= 1:
        _init_worker(spec, size, interpolation)
        for c in chunks:
            store(_decode_chunk(c))
    else:
        # spawn: forking a process that already runs torch threads (or CUDA) can deadlock
        with get_context("spawn").Pool(workers, _init_worker, (spec, size, interpolation)) as pool:
            for result in pool.imap_unordered(_decode_chunk, chunks):
                store(result)
    bar.close()
    return sorted(skipped, key=lambda s: s.image_id)


def cached_images(spec: DatasetSpec, size: tuple[int, int], interpolation: str, *, cache_dir: Path | None,
                  workers: int, progress: bool = False) -> ImageCache:
    """All images of `spec` decoded once (in `workers` processes) and resized to `size`.
    With `cache_dir` they are kept on disk under a key of the dataset, its parameters, the size
    and the dataset code, and later runs map the file instead of decoding again."""
    import time

    count = len(spec.build())
    folder = cache_dir / cache_key(spec, size, interpolation) if cache_dir is not None else None
    if folder is not None and (folder / "meta.json").is_file():
        meta = json.loads((folder / "meta.json").read_text())
        log.info("image cache hit: %s (%d images)", folder, meta["count"])
        return ImageCache(np.load(folder / "images.npy", mmap_mode="r"), np.load(folder / "labels.npy"),
                          [SkippedSample(i, r) for i, r in meta["skipped"]])
    start = time.perf_counter()
    labels = np.full(count, -1, dtype=np.int64)
    if folder is None:
        images = np.zeros((count, 3, *size), dtype=np.uint8)
        skipped = _decode_all(spec, count, size, interpolation, workers, images, labels, progress)
        return ImageCache(images, labels, skipped, time.perf_counter() - start)
    tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
    try:
        tmp.mkdir(parents=True, exist_ok=True)
        images = np.lib.format.open_memmap(tmp / "images.npy", mode="w+", dtype=np.uint8, shape=(count, 3, *size))
    except OSError as exc:
        raise ValueError(f"cannot write the image cache in cache_dir={cache_dir}: {exc}; pass a writable "
                         "folder, or cache_dir=null to keep the images in memory only") from exc
    skipped = _decode_all(spec, count, size, interpolation, workers, images, labels, progress)
    images.flush()
    del images
    np.save(tmp / "labels.npy", labels)
    (tmp / "meta.json").write_text(json.dumps({"count": count, "dataset": spec.name, "params": spec.params,
                                               "size": list(size), "interpolation": interpolation,
                                               "skipped": [[s.image_id, s.reason] for s in skipped]},
                                              default=str, indent=1))
    try:
        tmp.rename(folder)  # atomic: readers see a complete cache or none
    except OSError:  # another run finished the same cache first: use theirs
        shutil.rmtree(tmp, ignore_errors=True)
    seconds = time.perf_counter() - start
    log.info("decoded %d images into %s in %.0f s", count, folder, seconds)
    return ImageCache(np.load(folder / "images.npy", mmap_mode="r"), np.load(folder / "labels.npy"),
                      skipped, seconds)


class CachedBatches:
    """Batches drawn from an `ImageCache`: shuffled (training) or in order (evaluation),
    normalised on `device`."""

    def __init__(self, cache: ImageCache, batch_size: int, mean: Sequence[float], std: Sequence[float],
                 device: torch.device, *, shuffle: bool) -> None:
        self.cache, self.batch_size, self.mean, self.std = cache, batch_size, tuple(mean), tuple(std)
        self.device, self.shuffle = device, shuffle
        self.valid = cache.valid

    def __len__(self) -> int:
        n = len(self.valid)
        return n // self.batch_size if self.shuffle else -(-n // self.batch_size)

    def epoch(self, generator: torch.Generator | None = None) -> Iterator[LabelledBatch]:
        """One pass; training drops the last incomplete batch so every step has the same size."""
        order = self.valid
        if self.shuffle:
            order = self.valid[torch.randperm(len(self.valid), generator=generator).numpy()]
        for b in range(len(self)):
            idx = order[b * self.batch_size:(b + 1) * self.batch_size]
            images = torch.from_numpy(np.ascontiguousarray(self.cache.images[idx]))
            if self.device.type == "cuda":
                images = images.pin_memory()
            images = normalize_batch(images.to(self.device, non_blocking=True), self.mean, self.std)
            yield LabelledBatch(images, torch.from_numpy(self.cache.labels[idx]))  # labels stay on the CPU
