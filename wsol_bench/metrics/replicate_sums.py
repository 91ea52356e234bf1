"""Bootstrap replicates of the dataset-level measures (MaxBoxAcc, PxAP, the segmentation totals;
docs/protocol.md 7.1), as mergeable states.

A dataset-level measure is a function of totals that images add to (counts per threshold, pixel
histograms). Its bootstrap replicate r is the same function of the weighted totals
sum_i w_ri x_i, where x_i is image i's contribution and w_ri its Poisson count in replicate r
(`metrics.bootstrap`: a function of the seed, the image id and r alone, the very counts that
resample the per-image measures). The weighted totals are integer sums, so shards, ranks and
workers add them in any order to the same numbers: a data-parallel run's intervals equal a
one-process run's, and replicate r of every measure of a run is the same resample (which the
paired comparisons and the rankings need).

The states are [resamples, width] integers per method and measure, too many for the JSON state
files: they are written as one compressed NumPy archive per scorer (`save_replicate_sums`),
read back with every array checked against its settings (`load_replicate_sums`).
"""

from __future__ import annotations

import io
import json
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from wsol_bench.errors import InputFileError, UserError
from wsol_bench.files import atomic_write
from wsol_bench.limits import check_memory
from wsol_bench.metrics.base import RunMetric
from wsol_bench.metrics.bootstrap import BootstrapSettings, image_keys, replicate_weights

FORMAT = 1  # bump when the archive's layout changes, so old files are refused, not misread
FLOAT_EXACT = float(1 << 53)  # a float64 product-sum below this is an exact integer
FIXED_DATE = (1980, 1, 1, 0, 0, 0)  # the earliest date a zip entry can hold
RERUN = "rerun the benchmark into this folder to write it again"


def batch_weights(image_ids: Sequence[str], resamples: int, seed: int) -> np.ndarray:
    """The Poisson counts uint8 [resamples, B] of a batch's images (`metrics.bootstrap`)."""
    return replicate_weights(image_keys([str(i) for i in image_ids], seed), resamples)


def weighted_sums(weights: np.ndarray, contributions: np.ndarray) -> np.ndarray:
    """Exact int64 [R, width] = weights [R, B] @ contributions [B, width] (non-negative
    integers): in float64 (BLAS) when every sum stays below 2^53, else in int64."""
    contributions = np.asarray(contributions)
    largest = float(contributions.max(initial=0)) * float(weights.sum(1, dtype=np.int64).max(initial=0))
    if largest < FLOAT_EXACT:
        return np.rint(weights.astype(np.float64) @ contributions.astype(np.float64)).astype(np.int64)
    return weights.astype(np.int64) @ contributions.astype(np.int64)


class ReplicateSums(RunMetric):
    """Per bootstrap replicate, the weighted sum of the images' contribution vectors of one
    dataset-level measure (state `sums`, int64 [resamples, width])."""

    settings_keys = ("resamples", "seed", "width")

    def __init__(self, resamples: int = 1000, seed: int = 0, width: int = 1, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        BootstrapSettings(resamples=int(resamples), seed=int(seed))  # names a bad count
        self.resamples, self.seed, self.width = int(resamples), int(seed), int(width)
        self.add_state("sums", torch.zeros(self.resamples, self.width, dtype=torch.int64), dist_reduce_fx="sum",
                       persistent=True)

    def update(self, image_ids: Sequence[str], contributions: np.ndarray) -> None:
        """Add a batch: the images' ids and their contributions [B, width] (non-negative integers)."""
        self.add_weighted(batch_weights(image_ids, self.resamples, self.seed), contributions)

    def add_weighted(self, weights: np.ndarray, contributions: np.ndarray) -> None:
        """Add a batch whose Poisson counts [resamples, B] are already drawn (`batch_weights`;
        the methods of one batch share them)."""
        contributions = np.asarray(contributions)
        if contributions.ndim != 2 or contributions.shape[1] != self.width or len(contributions) != weights.shape[1]:
            raise ValueError(f"contributions {contributions.shape} do not fit {weights.shape[1]} images of width "
                             f"{self.width}")
        self.sums += torch.from_numpy(weighted_sums(weights, contributions))

    def totals(self) -> np.ndarray:
        """The replicates' summed contributions, int64 [resamples, width]."""
        return self.sums.numpy()

    def compute(self) -> np.ndarray:
        return self.totals()


def save_replicate_sums(path: str | Path, sums: dict[str, dict[str, ReplicateSums]]) -> Path:
    """Write {method: {measure name: ReplicateSums}} as one compressed NumPy archive
    (atomically): an "index" entry (JSON: each array's method, name and settings) and the arrays."""
    entries, arrays = [], {}
    for method, named in sums.items():
        for name, metric in named.items():
            arrays[f"a{len(entries)}"] = metric.totals()
            entries.append({"method": method, "name": name, "settings": metric.settings()})
    index = json.dumps({"format": FORMAT, "entries": entries})
    return atomic_write(Path(path), lambda tmp: _savez(tmp, index, arrays))


def _savez(tmp: Path, index: str, arrays: dict[str, np.ndarray]) -> None:
    """An archive `np.load` reads, written entry by entry with a fixed date (numpy's own
    `savez` stamps the time of writing, and the same states must give the same bytes: run.json
    records their sha256, and a data-parallel run must equal a one-process run)."""
    # the fastest zlib level: the counts compress about as well at it, and a run writes the
    # archive of every method at its end
    with zipfile.ZipFile(tmp, "w") as archive:
        for name, array in {"index": np.array(index), **arrays}.items():
            data = io.BytesIO()
            np.lib.format.write_array(data, np.asarray(array), allow_pickle=False)
            archive.writestr(zipfile.ZipInfo(f"{name}.npy", date_time=FIXED_DATE), data.getvalue(),
                             compress_type=zipfile.ZIP_DEFLATED, compresslevel=1)


def load_replicate_sums(path: str | Path) -> dict[str, dict[str, ReplicateSums]]:
    """The {method: {measure name: ReplicateSums}} that `save_replicate_sums` wrote, every array
    checked against its settings (shape, integer type, no negative count); a damaged file, or
    one of another format, is an InputFileError naming it."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as archive:
            index = json.loads(str(archive["index"]))
            if not isinstance(index, dict) or index.get("format") != FORMAT:
                found = index.get("format") if isinstance(index, dict) else "?"
                raise InputFileError(f"bootstrap state file {path} has format {found}, expected {FORMAT}; {RERUN}")
            out: dict[str, dict[str, ReplicateSums]] = {}
            for i, entry in enumerate(index["entries"]):
                out.setdefault(str(entry["method"]), {})[str(entry["name"])] = _entry(path, entry, archive, f"a{i}")
            return out
    except UserError:
        raise
    except (OSError, ValueError, KeyError, TypeError, EOFError) as exc:
        raise InputFileError(f"bootstrap state file {path} is unreadable ({type(exc).__name__}: {exc}); "
                             f"{RERUN}") from exc


def _entry(path: Path, entry: dict, archive, key: str) -> ReplicateSums:
    """One array of the archive as the metric its settings describe."""
    settings = {k: int(v) for k, v in entry["settings"].items()}
    where = f"bootstrap state file {path}: {entry['method']}/{entry['name']}"
    check_memory(8 * settings["resamples"] * settings["width"], f"reading {where}",
                 f"no run writes replicates that large; {RERUN}", error=InputFileError)
    try:
        metric = ReplicateSums(**settings)
    except UserError as exc:
        raise InputFileError(f"{where}: {exc}; {RERUN}") from exc
    array = archive[key]
    if array.shape != (metric.resamples, metric.width) or array.dtype.kind not in "iu":
        raise InputFileError(f"{where} holds {array.dtype} {list(array.shape)}, expected integers "
                             f"{[metric.resamples, metric.width]}; {RERUN}")
    if array.size and int(array.min()) < 0:
        raise InputFileError(f"{where} holds a negative count; {RERUN}")
    metric.merge_state({"sums": torch.as_tensor(array.astype(np.int64))})
    return metric


class ReplicateSumsByMethod:
    """The `ReplicateSums` of a scorer's dataset-level measures, per method, fed batch by batch;
    the Poisson counts of a batch are drawn once and shared by its methods. The run's `methods`
    get their (empty) sums at once: every rank holds every method's, so they reduce in step."""

    def __init__(self, widths: dict[str, int], settings: BootstrapSettings, methods: Sequence[str] = ()) -> None:
        self.widths, self.settings = dict(widths), settings
        self.sums: dict[str, dict[str, ReplicateSums]] = {}
        self._last: tuple[tuple[str, ...], np.ndarray] | None = None  # the last batch's ids and counts
        for method in methods:
            self.of(method)

    def of(self, method: str) -> dict[str, ReplicateSums]:
        """The method's sums (empty ones at first)."""
        if method not in self.sums:
            self.sums[method] = {name: ReplicateSums(self.settings.resamples, self.settings.seed, width)
                                 for name, width in self.widths.items()}
        return self.sums[method]

    def add(self, method: str, image_ids: Sequence[str], contributions: dict[str, np.ndarray]) -> None:
        """Add one batch of `method`: its images' ids and contributions per measure."""
        if not contributions:
            return
        ids = tuple(str(i) for i in image_ids)
        if self._last is None or self._last[0] != ids:
            self._last = (ids, batch_weights(ids, self.settings.resamples, self.settings.seed))
        named = self.of(method)
        for name, values in contributions.items():
            named[name].add_weighted(self._last[1], values)

    def sync_ranks(self) -> None:
        """Sum every rank's sums, method by method in insertion order (every rank must call it)."""
        for named in self.sums.values():
            for metric in named.values():
                metric.sync_ranks()
