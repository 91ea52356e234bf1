"""The map store: raw patch-grid explanations cached on disk, keyed by exactly the settings
that determine them, written in shards so that a killed run resumes where it stopped.

Layout under the cache root:

    <root>/<key>/settings.json        the settings the key hashes (human-readable)
    <root>/<key>/shard_000000.pt      maps [n, gh, gw], logits [n, C], targets [n],
                                      indices [n] (dataset positions), image_ids, skipped

Shard `i` covers dataset positions [i * shard_size, (i + 1) * shard_size). A shard file
appears only complete (written to a temporary name, then renamed atomically), so a kill at
any moment leaves either a finished shard or none. Anything that does not change the maps
(thresholds, metrics, batch size, device placement of the cache) is not part of the key, so
re-scoring and sweeps find the maps of an earlier run.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from wsol_bench.files import atomic_write, atomic_write_text

SHARD_FORMAT = 1  # bump when the payload layout changes, so old caches are not misread


def settings_key(settings: dict[str, Any]) -> str:
    """Stable short hash of a JSON-serialisable settings dict (key order does not matter)."""
    text = json.dumps({"format": SHARD_FORMAT, **settings}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


_FILE_HASHES: dict[tuple[str, int, int], str] = {}


def file_digest(path: str | Path) -> str:
    """sha256 of a file's content (cached per path, size and mtime within a process); weights
    are identified by content, so a checkpoint overwritten in place gets a new key."""
    path = Path(path)
    stat = path.stat()
    cache_key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if cache_key not in _FILE_HASHES:
        digest = hashlib.sha256()
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        _FILE_HASHES[cache_key] = digest.hexdigest()
    return _FILE_HASHES[cache_key]


@dataclass
class Shard:
    """One shard's payload."""

    index: int
    maps: torch.Tensor  # float32 [n, gh, gw]
    logits: torch.Tensor  # float32 [n, C]
    targets: torch.Tensor  # long [n]
    positions: torch.Tensor  # long [n], dataset positions of the rows
    image_ids: list[str]
    skipped: list[tuple[str, str]]  # (image_id, reason) of items the dataset could not deliver
    target_source: str = "predicted"  # "given" (targets handed in) or "predicted"
    class_specific: bool = True  # False for methods whose map ignores the target class

    def rows_at(self, positions: list[int]) -> torch.Tensor:
        """Row indices of dataset `positions` in this shard."""
        where = {int(p): i for i, p in enumerate(self.positions)}
        missing = [p for p in positions if p not in where]
        if missing:
            raise RuntimeError(f"stored shard {self.index} lacks dataset positions {missing[:5]}: the "
                               "dataset changed since the maps were stored; delete that cache folder")
        return torch.tensor([where[p] for p in positions], dtype=torch.long)


class MapStore:
    """Sharded, keyed cache of one method's maps on one (model, data, preprocessing, target
    policy) setting."""

    def __init__(self, root: str | Path, settings: dict[str, Any], shard_size: int) -> None:
        if shard_size < 1:
            raise ValueError(f"store.shard_size must be >= 1, got {shard_size}")
        self.settings = settings
        self.key = settings_key(settings)
        self.folder = Path(root) / self.key
        self.shard_size = int(shard_size)

    def shard_path(self, index: int) -> Path:
        """File of shard `index`."""
        return self.folder / f"shard_{index:06d}.pt"

    def num_shards(self, num_items: int) -> int:
        """Shards needed for a dataset of `num_items` items."""
        return -(-num_items // self.shard_size)

    def shard_positions(self, index: int, num_items: int) -> range:
        """Dataset positions that shard `index` covers."""
        return range(index * self.shard_size, min((index + 1) * self.shard_size, num_items))

    def has(self, index: int) -> bool:
        """Whether shard `index` is finished."""
        return self.shard_path(index).is_file()

    def missing(self, num_items: int) -> list[int]:
        """Indices of the shards still to compute."""
        return [i for i in range(self.num_shards(num_items)) if not self.has(i)]

    def save(self, shard: Shard) -> Path:
        """Write a shard atomically (temporary file, then rename)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        settings_file = self.folder / "settings.json"
        if not settings_file.is_file():
            atomic_write_text(settings_file, json.dumps(self.settings, indent=2, sort_keys=True, default=str))
        payload = {"format": SHARD_FORMAT, "maps": shard.maps.float().cpu().contiguous(),
                   "logits": shard.logits.float().cpu().contiguous(), "targets": shard.targets.cpu(),
                   "positions": shard.positions.cpu(), "image_ids": list(shard.image_ids),
                   "skipped": [list(s) for s in shard.skipped], "target_source": shard.target_source,
                   "class_specific": bool(shard.class_specific)}
        return atomic_write(self.shard_path(shard.index), lambda tmp: torch.save(payload, tmp))

    def load(self, index: int) -> Shard:
        """Read shard `index`; a missing or unreadable file names itself and the fix."""
        path = self.shard_path(index)
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise FileNotFoundError(f"map shard {path} is missing; run the explanation again "
                                    "(it computes only the missing shards)") from None
        except Exception as exc:
            raise RuntimeError(f"map shard {path} is unreadable ({exc}); delete it and rerun to "
                               "recompute that shard") from exc
        if payload.get("format") != SHARD_FORMAT:
            raise RuntimeError(f"map shard {path} has format {payload.get('format')}, expected "
                               f"{SHARD_FORMAT}; delete {self.folder} to recompute")
        return Shard(index=index, maps=payload["maps"], logits=payload["logits"],
                     targets=payload["targets"], positions=payload["positions"],
                     image_ids=list(payload["image_ids"]),
                     skipped=[tuple(s) for s in payload["skipped"]],
                     target_source=payload["target_source"], class_specific=payload["class_specific"])

    def shards(self, num_items: int) -> Iterator[Shard]:
        """All shards of a dataset of `num_items` items, in order."""
        for index in range(self.num_shards(num_items)):
            yield self.load(index)

