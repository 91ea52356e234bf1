"""A cache of decoded training images for datasets that are expensive to produce: the
synthetic renderer costs 10-20 ms per image, more than a training step of the shipped model on
a CPU. Every image of a split is decoded once (in parallel processes), resized to the model
input and kept as uint8 [N, 3, H, W], on disk as a memory-mapped .npy so later runs skip the
decoding."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, replace
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm import tqdm

import wsol_bench.datasets as dataset_package
from wsol_bench.datasets import Sample, SkippedSample, build_dataset
from wsol_bench.datasets.base import resize_sample
from wsol_bench.errors import DiskFullError, InputFileError, SettingError, UserError, counted
from wsol_bench.files import DISK_FULL, disk_full_refused

log = logging.getLogger("wsol_bench.train.recipe")
CACHE_FORMAT = 1


@dataclass(frozen=True)
class DatasetSpec:
    """A dataset by registry name and constructor parameters (picklable, so worker processes
    can rebuild it)."""

    name: str
    params: dict[str, Any]

    def build(self, transform=None) -> Dataset:
        """The dataset, with `transform` applied to every sample."""
        return build_dataset(self.name, transform=transform, **self.params)


def class_label(sample: Sample) -> int:
    """The sample's class index; a missing or negative label is an error (training needs a
    classification dataset)."""
    label = sample.label
    if label is None or isinstance(label, bool) or int(label) != label or int(label) < 0:
        raise SettingError(f"image {sample.image_id} has no class label (label={label!r}); the trainer needs "
                           "a dataset whose samples carry a class index >= 0: choose another dataset.name")
    return int(label)


@dataclass
class ImageCache:
    """Every image of a split resized to the model input, uint8 [N, 3, H, W] (a memory map
    when kept on disk), and labels [N] with -1 where the dataset skipped the item."""

    images: np.ndarray
    labels: np.ndarray
    skipped: list[SkippedSample]
    seconds: float = 0.0  # time spent decoding (0 when read from disk)

    @property
    def valid(self) -> np.ndarray:
        """Indices of the usable items."""
        return np.flatnonzero(self.labels >= 0)


def _dataset_code_digest() -> str:
    # Any change to the dataset code (generator, loaders, resizing) gives new cache keys, so a
    # run never trains on stale pixels.
    digest = hashlib.sha256()
    for path in sorted(Path(dataset_package.__file__).parent.glob("*.py")):
        digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()[:16]


def cache_key(spec: DatasetSpec, size: tuple[int, int], interpolation: str) -> str:
    """Folder name of a cached split: a readable prefix and a hash of all that shapes the pixels."""
    payload = {"format": CACHE_FORMAT, "name": spec.name, "params": spec.params, "size": list(size),
               "interpolation": interpolation, "code": _dataset_code_digest()}
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
        label = class_label(sample)
        if sample.image.dtype != torch.uint8:
            raise SettingError(f"image {sample.image_id} is {sample.image.dtype}, not uint8; the image cache "
                               "expects decoded images (set train.cache=false for this dataset)")
        # Only the image is resized (no masks or boxes: training uses the label alone).
        bare = Sample(sample.image, label, torch.zeros(0, 4), sample.image_id, sample.orig_size)
        images[j] = resize_sample(bare, size, interpolation).image.numpy()
        labels[j] = label
    return indices, images, labels, skipped


def _decode_all(spec: DatasetSpec, size: tuple[int, int], interpolation: str, workers: int,
                images: np.ndarray, labels: np.ndarray, progress: bool) -> list[SkippedSample]:
    count = len(labels)
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
        # spawn: forking a process that already runs torch threads (or CUDA) can deadlock. An
        # executor (not multiprocessing.Pool) fails fast when a worker dies instead of hanging.
        try:
            with ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_init_worker,
                                     initargs=(spec, size, interpolation)) as pool:
                for result in pool.map(_decode_chunk, chunks):
                    store(result)
        except BrokenProcessPool as exc:
            raise UserError(f"an image decoding process died ({exc}); rerun with num_workers=0 to decode "
                            "in this process and see the cause") from exc
    bar.close()
    return sorted(skipped, key=lambda s: s.image_id)


def _remove_abandoned(folder: Path) -> None:
    # A killed run leaves <key>.tmp-<pid> behind (gigabytes for the synthetic recipe).
    for tmp in folder.parent.glob(f"{folder.name}.tmp-*"):
        pid = int(tmp.name.rsplit("-", 1)[1]) if tmp.name.rsplit("-", 1)[1].isdigit() else None
        try:
            if pid is not None:
                os.kill(pid, 0)
                continue  # still being written by a live process
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        shutil.rmtree(tmp, ignore_errors=True)


def read_cache(folder: Path, size: tuple[int, int]) -> ImageCache:
    """The split `cached_images` kept in `folder`, its images memory-mapped. A damaged cache
    (truncated, edited, or not the arrays it wrote) is refused naming the folder to delete."""
    fix = "delete that folder to decode the images again, or pass cache_dir=null"
    try:
        meta = json.loads((folder / "meta.json").read_text())
        images = np.load(folder / "images.npy", mmap_mode="r")
        labels = np.load(folder / "labels.npy")  # allow_pickle=False: a pickle payload is refused
        skipped = [SkippedSample(i, r) for i, r in meta["skipped"]]
        count = int(meta["count"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InputFileError(f"image cache {folder} is unreadable ({type(exc).__name__}: {exc}); "
                             f"{fix}") from exc
    if images.dtype != np.uint8 or images.shape != (count, 3, *size) or labels.dtype != np.int64 \
            or labels.shape != (count,):
        raise InputFileError(f"image cache {folder} holds images {images.dtype} {images.shape} and labels "
                             f"{labels.dtype} {labels.shape}, not the {count} uint8 3x{size[0]}x{size[1]} "
                             f"images and int64 labels its meta.json lists; {fix}")
    return ImageCache(images, labels, skipped)


def cached_images(spec: DatasetSpec, size: tuple[int, int], interpolation: str, *, cache_dir: Path | None,
                  workers: int, progress: bool = False) -> ImageCache:
    """All images of `spec` decoded once (in `workers` processes) and resized to `size`. With
    `cache_dir` they are kept on disk under a key of the dataset, its parameters, the size and
    the dataset code; a later call maps the file instead of decoding again."""
    folder = cache_dir / cache_key(spec, size, interpolation) if cache_dir is not None else None
    if folder is not None and (folder / "meta.json").is_file():
        cache = read_cache(folder, size)
        log.info("image cache hit: %s (%s)", folder, counted(len(cache.labels), "image"))
        return cache
    count = len(spec.build())
    start = time.perf_counter()
    labels = np.full(count, -1, dtype=np.int64)
    if folder is None:
        images = np.zeros((count, 3, *size), dtype=np.uint8)
        skipped = _decode_all(spec, size, interpolation, workers, images, labels, progress)
        return ImageCache(images, labels, skipped, time.perf_counter() - start)
    tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
    try:
        tmp.mkdir(parents=True, exist_ok=True)
        _remove_abandoned(folder)
        images = np.lib.format.open_memmap(tmp / "images.npy", mode="w+", dtype=np.uint8,
                                           shape=(count, 3, *size))
        reserve_space(tmp / "images.npy")
    except DiskFullError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    except OSError as exc:
        raise SettingError(f"cannot write the image cache in cache_dir={cache_dir}: {exc}; pass a writable "
                           "folder, or cache_dir=null to keep the images in memory only") from exc
    skipped = _decode_all(spec, size, interpolation, workers, images, labels, progress)
    images.flush()
    del images
    meta = {"count": count, "dataset": spec.name, "params": spec.params, "size": list(size),
            "interpolation": interpolation, "skipped": [[s.image_id, s.reason] for s in skipped]}
    try:
        with disk_full_refused(tmp):
            np.save(tmp / "labels.npy", labels)
            (tmp / "meta.json").write_text(json.dumps(meta, default=str, indent=1))
    except DiskFullError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        tmp.rename(folder)  # atomic: readers see a complete cache or none
    except OSError:  # another run finished the same cache first: use theirs
        shutil.rmtree(tmp, ignore_errors=True)
    seconds = time.perf_counter() - start
    log.info("decoded %s into %s in %.0f s", counted(count, "image"), folder, seconds)
    return replace(read_cache(folder, size), seconds=seconds)


def reserve_space(path: Path) -> None:
    """Allocate the disk blocks of the sparse file `path` now: pages of a memory-mapped file
    written on a full disk kill the process (SIGBUS), an allocation refuses in one line."""
    with disk_full_refused(path, path.stat().st_size), path.open("r+b") as handle:
        try:
            os.posix_fallocate(handle.fileno(), 0, os.fstat(handle.fileno()).st_size)
        except OSError as exc:
            if exc.errno in DISK_FULL:
                raise
            # a file system without fallocate (EOPNOTSUPP, EINVAL): writes find out as before
