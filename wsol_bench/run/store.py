"""The map store: raw patch-grid explanations cached on disk, keyed by exactly the settings
that determine them, written in shards so that a killed run resumes where it stopped.

Layout under the cache root:

    <root>/<key>/settings.json        the settings the key hashes (human-readable)
    <root>/<key>/shard_000000.pt      maps [n, gh, gw], logits [n, C], targets [n],
                                      positions [n] (dataset positions), image_ids, skipped,
                                      and what validates them: the store key, the shard index,
                                      and a sha256 checksum of everything else

Shard `i` covers dataset positions [i * shard_size, (i + 1) * shard_size). A shard file
appears only complete (written to a temporary name, then renamed atomically), so a kill at
any moment leaves either a finished shard or none. A shard that fails validation (damaged,
truncated, edited, copied from another method or setting, of another grid) is reported and
recomputed, never used. Anything that does not change the maps (thresholds, metrics, batch
size, device placement of the cache) is not part of the key, so re-scoring and sweeps find
the maps of an earlier run.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from wsol_bench import choices
from wsol_bench.errors import SettingError, UserError
from wsol_bench.files import atomic_write_bytes, atomic_write_text
from wsol_bench.locks import ShardLocks

SHARD_FORMAT = 2  # bump when the payload layout changes, so old caches are not misread
log = logging.getLogger("wsol_bench")


class InvalidShard(UserError):
    """A stored shard that must not be used; the message says why."""


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


def _stamp(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns


SHARD_FIELDS = ("key", "index", "maps", "logits", "targets", "positions", "image_ids", "skipped",
                "target_source", "class_specific", "checksum")


def payload_checksum(payload: dict[str, Any]) -> str:
    """sha256 over everything a shard payload holds but its checksum."""
    digest = hashlib.sha256()
    for name in ("maps", "logits", "targets", "positions"):
        tensor = payload[name]
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.contiguous().numpy().tobytes())
    rest = {k: payload[k] for k in ("key", "index", "image_ids", "skipped", "target_source", "class_specific")}
    digest.update(json.dumps(rest, sort_keys=True, default=str).encode())
    return digest.hexdigest()


@dataclass
class Shard:
    """One shard's payload."""

    index: int
    maps: torch.Tensor  # float32 [n, gh, gw] (patch grid) or [n, H, W] (pixel maps)
    logits: torch.Tensor  # float32 [n, C]
    targets: torch.Tensor  # long [n]
    positions: torch.Tensor  # long [n], dataset positions of the rows
    image_ids: list[str]
    skipped: list[tuple[str, str]]  # (image_id, reason) of items the dataset could not deliver
    target_source: str = "predicted"  # "given" (targets handed in) or "predicted"
    class_specific: bool = True  # False for methods whose map ignores the target class

    def rows_at(self, positions: list[int], image_ids: list[str] | None = None) -> torch.Tensor:
        """Row indices of dataset `positions` in this shard; with `image_ids`, the rows must hold
        maps of exactly those images (stale maps are never scored)."""
        where = {int(p): i for i, p in enumerate(self.positions)}
        missing = [p for p in positions if p not in where]
        if missing:
            raise InvalidShard(f"stored shard {self.index} lacks dataset positions {missing[:5]}: the dataset "
                               "changed since the maps were stored; rerun to recompute them")
        rows = [where[p] for p in positions]
        if image_ids is not None:
            stored = [self.image_ids[r] for r in rows]
            if stored != list(image_ids):
                wrong = next((s, i) for s, i in zip(stored, image_ids) if s != i)
                raise InvalidShard(f"stored shard {self.index} holds maps of other images (e.g. {wrong[0]!r} where "
                                   f"the dataset now has {wrong[1]!r}); rerun to recompute them")
        return torch.tensor(rows, dtype=torch.long)


MAP_DTYPES = {name: getattr(torch, name) for name in choices.MAP_DTYPES}  # store.dtype


class MapStore:
    """Sharded, keyed cache of one method's maps on one (model, data, preprocessing, target
    policy) setting."""

    def __init__(self, root: str | Path, settings: dict[str, Any], shard_size: int,
                 grid: tuple[int, int] | None = None, dtype: str = "float32", class_specific: bool = True) -> None:
        if shard_size < 1:
            raise SettingError(f"store.shard_size must be >= 1, got {shard_size}")
        if dtype not in MAP_DTYPES:
            raise SettingError(f"store.dtype={dtype!r} is not supported; valid: {', '.join(MAP_DTYPES)}")
        self.grid = grid  # the map grid every shard must have, when known
        self.class_specific = class_specific  # whether the method's maps depend on the target class
        self.map_dtype = MAP_DTYPES[dtype]  # how maps are kept on disk
        self._validated: dict[int, tuple[int, int]] = {}  # shard index -> (size, mtime) of a checked file
        self.settings = settings
        self.key = settings_key(settings)
        self.folder = Path(root) / self.key
        self.shard_size = int(shard_size)
        self.locks = ShardLocks(self.folder)  # one process computes a shard; another waits for it

    def claim(self, index: int, num_items: int) -> Shard | None:
        """Take shard `index` to compute it: waits while another process computes it, and
        returns the shard that process stored (then nothing is held), or None with the shard's
        lock held until `save` stores it (or `release_claims`)."""
        self.locks.hold(index, on_wait=lambda: log.info(
            "shard %d of %s is being computed by another process: waiting for it", index, self.folder))
        if self.has(index):
            try:
                shard = self.load(index, num_items)
            except InvalidShard:
                return None  # computed here after all, and stored over the invalid file
            self.locks.release(index)
            return shard
        return None

    def release_claims(self) -> None:
        """Release every shard this process claimed and has not stored (a pass that ended early)."""
        for index in list(self.locks.held):
            self.locks.release(index)

    def round_maps(self, maps: torch.Tensor) -> torch.Tensor:
        """float32 `maps` as this store keeps them (rounded to float16 for dtype=float16), so a
        run scores exactly the maps a re-scoring run reads back."""
        return maps.float() if self.map_dtype == torch.float32 else maps.to(self.map_dtype).float()

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
        """Whether shard `index` has a file (not yet whether it is valid: see `missing`)."""
        return self.shard_path(index).is_file()

    def missing(self, num_items: int) -> list[int]:
        """Indices of the shards still to compute: those without a file, and those whose file
        fails validation (reported, then removed so they are recomputed)."""
        todo = []
        for index in range(self.num_shards(num_items)):
            path = self.shard_path(index)
            if not path.is_file():
                todo.append(index)
                continue
            stamp = _stamp(path)
            if self._validated.get(index) == stamp:  # unchanged since it was checked
                continue
            try:
                self.load(index, num_items)
                self._validated[index] = stamp
            except InvalidShard as exc:
                log.warning("%s; it is recomputed", exc)
                path.unlink(missing_ok=True)
                todo.append(index)
        return todo

    def save(self, shard: Shard) -> Path:
        """Write a shard atomically (temporary file, then rename), with its checksum."""
        self.folder.mkdir(parents=True, exist_ok=True)
        settings_file = self.folder / "settings.json"
        if not settings_file.is_file():
            atomic_write_text(settings_file, json.dumps(self.settings, indent=2, sort_keys=True, default=str))
        payload = {"format": SHARD_FORMAT, "key": self.key, "index": int(shard.index),
                   "maps": shard.maps.to(self.map_dtype).cpu().contiguous(),
                   "logits": shard.logits.float().cpu().contiguous(), "targets": shard.targets.long().cpu(),
                   "positions": shard.positions.long().cpu(), "image_ids": list(shard.image_ids),
                   "skipped": [list(s) for s in shard.skipped], "target_source": shard.target_source,
                   "class_specific": bool(shard.class_specific)}
        payload["checksum"] = payload_checksum(payload)
        # serialised in memory first: torch's own writer reports a full disk as an obscure
        # RuntimeError, a plain write as the OSError that names the file and the size needed
        buffer = io.BytesIO()
        torch.save(payload, buffer)
        path = atomic_write_bytes(self.shard_path(shard.index), buffer.getvalue())
        self.locks.release(shard.index)
        return path

    def load(self, index: int, num_items: int | None = None) -> Shard:
        """Read and validate shard `index` (of a dataset of `num_items` items, when given);
        a missing file or an invalid shard raises `InvalidShard` naming the file and why."""
        path = self.shard_path(index)
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise InvalidShard(f"map shard {path} is missing; run the explanation again (it computes only "
                               "the missing shards)") from None
        except Exception as exc:  # truncated, zero bytes, not a torch file, pickled objects  # noqa: BLE001
            raise InvalidShard(f"map shard {path} is unreadable ({type(exc).__name__}: {exc})") from None
        problem = self._problem(payload, index, num_items)
        if problem:
            raise InvalidShard(f"map shard {path} is invalid: {problem}")
        return Shard(index=index, maps=payload["maps"].float(), logits=payload["logits"],
                     targets=payload["targets"], positions=payload["positions"],
                     image_ids=list(payload["image_ids"]),
                     skipped=[tuple(s) for s in payload["skipped"]],
                     target_source=payload["target_source"], class_specific=payload["class_specific"])

    def _problem(self, payload: Any, index: int, num_items: int | None) -> str | None:
        """Why a loaded payload must not be used, or None."""
        if not isinstance(payload, dict) or payload.get("format") != SHARD_FORMAT:
            found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
            return f"format {found}, expected {SHARD_FORMAT}"
        missing = sorted(set(SHARD_FIELDS) - set(payload))
        if missing:
            return f"it lacks {', '.join(missing)}"
        if payload["key"] != self.key:
            return f"it belongs to the store {payload['key']} (another method, target policy or setting)"
        if payload["index"] != index:
            return f"it is shard {payload['index']}, not shard {index}"
        if payload["checksum"] != payload_checksum(payload):
            return "its checksum does not match its content (edited or damaged)"
        maps, n = payload["maps"], len(payload["image_ids"])
        if maps.ndim != 3 or maps.dtype != self.map_dtype:
            return (f"maps of shape {tuple(maps.shape)} and dtype {maps.dtype}, expected "
                    f"{str(self.map_dtype).removeprefix('torch.')} [n, h, w]")
        if self.grid is not None and tuple(maps.shape[1:]) != tuple(self.grid):
            return f"maps on a {tuple(maps.shape[1:])} grid, expected {tuple(self.grid)}"
        sizes = {len(maps), len(payload["logits"]), len(payload["targets"]), len(payload["positions"])}
        if sizes != {n}:
            return f"{n} image ids but maps, logits, targets and positions of lengths {sorted(sizes)}"
        if num_items is not None:
            expected = len(self.shard_positions(index, num_items))
            positions = [int(p) for p in payload["positions"]]
            if not set(positions) <= set(self.shard_positions(index, num_items)) \
                    or n + len(payload["skipped"]) != expected:
                return (f"it covers positions {positions[:3]}... and {len(payload['skipped'])} skipped items, "
                        f"not the {expected} items of shard {index} of a {num_items}-item dataset")
        return None

    def shards(self, num_items: int) -> Iterator[Shard]:
        """All shards of a dataset of `num_items` items, in order."""
        for index in range(self.num_shards(num_items)):
            yield self.load(index, num_items)

