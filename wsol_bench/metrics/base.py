"""The shape of every dataset-level metric: a `torchmetrics.Metric` whose states are sums
(counts per threshold, histograms, exact chunk sums; never per-image arrays), so shards, ranks
and runs merge by addition (`merge_state`, and torchmetrics' own distributed sync), and whose
settings and states are written to the run folder as JSON and read back (`to_json` /
`from_json`), so every table can be rebuilt from the run folder alone. A state file is checked
as it is read: its size against the memory before parsing, then every state's shape, type and
sign, and each metric's own consistency (`state_problem`); a bad one is named, never used."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torchmetrics import Metric

from wsol_bench.errors import InputFileError, SettingError, UserError
from wsol_bench.files import atomic_write_text
from wsol_bench.limits import check_memory
from wsol_bench.registry import Registry

METRIC_CLASSES: Registry[type[RunMetric]] = Registry("metric class")  # by class name: a state file names them
STATE_FORMAT = 1  # bump when a metric's states change meaning, so old files are refused, not misread
# json.loads makes up to about 21 bytes of Python objects per byte of a state file (the worst is
# "[]," of 3 bytes: a 56-byte list and its 8-byte slot); 24 leaves room for the tensors built
# from them. A file whose reading would pass the memory limit is refused before it is read.
JSON_MEMORY_PER_BYTE = 24
INT64_MAX = int(np.iinfo(np.int64).max)
RERUN = "rerun the benchmark into this folder to write it again"


class RunMetric(Metric):
    """Base class: subclasses list the constructor arguments that define them in
    `settings_keys` (stored as attributes of the same names) and add sum states only: integer
    states are counts (never negative), and `state_problem` names what their totals make
    impossible, so a state file is checked when it is read."""

    full_state_update: ClassVar[bool] = False
    settings_keys: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # set, not `register`ed: a class defined again (a reloaded module) replaces its old self
        METRIC_CLASSES[cls.__name__] = cls

    def __init__(self, **kwargs: Any) -> None:
        # no reduction hidden in compute(): a run reduces across ranks explicitly (`sync_ranks`),
        # at the one point where every rank takes part; tables are computed on rank 0 alone
        kwargs.setdefault("sync_on_compute", False)
        super().__init__(**kwargs)
        self._restored = False

    def settings(self) -> dict[str, Any]:
        """The constructor arguments that define this metric, as JSON-friendly values."""
        return {key: _plain(getattr(self, key)) for key in self.settings_keys}

    @property
    def update_called(self) -> bool:
        # a state read back from a run folder or merged from a worker's increments has seen its
        # images, though not through update()
        return super().update_called or self._restored

    def merge_state(self, incoming_state: dict[str, Any] | Metric) -> None:
        """Add another state of the same metric and settings into this one."""
        if isinstance(incoming_state, RunMetric) and incoming_state.settings() != self.settings():
            raise SettingError(f"cannot merge {type(self).__name__} states with different settings: "
                               f"{incoming_state.settings()} vs {self.settings()}")
        super().merge_state(incoming_state)
        self._computed = None
        self._restored = True

    def sync_ranks(self) -> None:
        """Replace this rank's states by their sum over every rank of the process group
        (torchmetrics' own gather and reduction); nothing in a one-process run. Every rank
        must call it, for the same metrics in the same order."""
        if not _distributed():
            return
        self.sync(distributed_available=_distributed)
        reduced = {name: value.clone() for name, value in self.metric_state.items()}
        self.unsync()  # leaves the synced mode, restoring the local states ...
        for name, value in reduced.items():  # ... which the sums then replace
            setattr(self, name, value)
        self._computed = None

    def state_problem(self) -> str | None:
        """What makes this metric's states impossible (a count above its total), or None;
        subclasses add the rules of their own states."""
        return None

    def to_json(self) -> dict[str, Any]:
        """{"class", "settings", "state"}: everything needed to rebuild this metric's results."""
        return {"class": type(self).__name__, "settings": self.settings(),
                "state": {name: value.tolist() for name, value in self.metric_state.items()}}

    @staticmethod
    def from_json(entry: dict[str, Any]) -> RunMetric:
        """The metric `to_json` wrote, with its state."""
        import wsol_bench.metrics  # noqa: F401  (registers every metric class)

        cls = METRIC_CLASSES.get(entry.get("class", ""))
        if cls is None:
            raise InputFileError(f"unknown metric class {entry.get('class')!r} in a state file; known: "
                                 f"{', '.join(sorted(METRIC_CLASSES))}")
        metric = cls(**entry["settings"])  # checks the settings (a threshold grid's length included)
        defaults = metric.metric_state
        if set(entry["state"]) != set(defaults):
            raise InputFileError(f"{cls.__name__} state holds {sorted(entry['state'])}, expected "
                                 f"{sorted(defaults)}")
        metric.merge_state({name: _state_tensor(f"{cls.__name__}.{name}", value, defaults[name])
                            for name, value in entry["state"].items()})
        problem = metric.state_problem()
        if problem is not None:
            raise InputFileError(f"{cls.__name__} states are impossible: {problem}")
        metric._restored = True
        return metric


def _state_tensor(name: str, value: Any, default: torch.Tensor) -> torch.Tensor:
    """One state read from a file as a tensor like `default` (whose shape follows from the
    metric's settings), or an InputFileError saying how it differs: another shape, a value that
    is not a finite number, or, for an integer state (counts), not whole, negative or beyond
    int64."""
    try:
        array = np.asarray(value)
    except ValueError:  # nested lists of unequal lengths
        array = np.empty(0, dtype=object)
    if array.dtype == object or array.shape != tuple(default.shape):
        shape = "ragged" if array.dtype == object else list(array.shape)
        raise InputFileError(f"{name} has shape {shape}, expected {list(default.shape)} (from the metric's "
                             "settings)")
    if default.dtype.is_floating_point:
        if array.dtype.kind not in "iuf" or not np.isfinite(array).all():
            raise InputFileError(f"{name} holds a value that is not a finite number")
    elif array.dtype.kind not in "iu":
        raise InputFileError(f"{name} holds a value that is not a whole number (it counts)")
    elif array.size and (int(array.min()) < 0 or int(array.max()) > INT64_MAX):
        bad = int(array.min()) if int(array.min()) < 0 else int(array.max())
        raise InputFileError(f"{name} holds the count {bad}, outside 0 .. {INT64_MAX}")
    return torch.as_tensor(array, dtype=default.dtype)


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value


def save_states(path: str | Path, metrics: dict[str, dict[str, RunMetric]]) -> Path:
    """Write {method: {metric name: metric}} to a JSON file (atomically)."""
    payload = {"format": STATE_FORMAT,
               "methods": {method: {name: metric.to_json() for name, metric in named.items()}
                           for method, named in metrics.items()}}
    # compact: the states are tens of thousands of integers, read by programs, not people
    return atomic_write_text(path, json.dumps(payload, separators=(",", ":")))


def load_states(path: str | Path) -> dict[str, dict[str, RunMetric]]:
    """The {method: {metric name: metric}} that `save_states` wrote; a file of another format
    or a damaged one is named with the fix."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise InputFileError(f"metric state file {path} is unreadable ({exc}); {RERUN}") from exc
    check_memory(size * JSON_MEMORY_PER_BYTE, f"reading metric state file {path} ({size:,} bytes)",
                 f"no run writes a state file that large; {RERUN}", error=InputFileError)
    try:
        payload = json.loads(path.read_text(), parse_constant=_refuse_constant)
    except (OSError, ValueError) as exc:
        raise InputFileError(f"metric state file {path} is unreadable ({exc}); {RERUN}") from exc
    if not isinstance(payload, dict) or payload.get("format") != STATE_FORMAT:
        found = payload.get("format") if isinstance(payload, dict) else "?"
        raise InputFileError(f"metric state file {path} has format {found}, expected {STATE_FORMAT}; rerun "
                             "the benchmark into this folder")
    try:
        return {method: {name: _metric_from(path, method, name, entry) for name, entry in named.items()}
                for method, named in payload["methods"].items()}
    except (KeyError, TypeError, AttributeError) as exc:  # an edited file: entries of another shape
        raise InputFileError(f"metric state file {path} is damaged ({type(exc).__name__}: {exc}); {RERUN}") from exc


def _refuse_constant(name: str) -> None:
    """json.loads' hook for NaN and Infinity, which no state file holds (counts are integers,
    thresholds finite)."""
    raise ValueError(f"it holds {name}; a state file holds finite numbers only")


def _metric_from(path: Path, method: str, name: str, entry: Any) -> RunMetric:
    """One metric of a state file, or an InputFileError naming the file, the entry and what is
    wrong with it."""
    try:
        return RunMetric.from_json(entry)
    except UserError as exc:  # a refused setting (a threshold grid) or state
        why = str(exc)
    except (KeyError, TypeError, AttributeError, ValueError, RuntimeError) as exc:  # an edited entry
        why = f"{type(exc).__name__}: {exc}"
    raise InputFileError(f"metric state file {path} is damaged: {method}/{name}: {why}; {RERUN}")
