"""The shape of every dataset-level metric: a `torchmetrics.Metric` whose states are sums
(counts per threshold, histograms, exact chunk sums; never per-image arrays), so shards, ranks
and runs merge by addition (`merge_state`, and torchmetrics' own distributed sync), and whose
settings and states are written to the run folder as JSON and read back (`to_json` /
`from_json`), so every table can be rebuilt from the run folder alone."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar

import torch
from torchmetrics import Metric

from wsol_bench.errors import InputFileError, SettingError
from wsol_bench.files import atomic_write_text

METRIC_CLASSES: dict[str, type[RunMetric]] = {}
STATE_FORMAT = 1  # bump when a metric's states change meaning, so old files are refused, not misread


class RunMetric(Metric):
    """Base class: subclasses list the constructor arguments that define them in
    `settings_keys` (stored as attributes of the same names) and add sum states only."""

    full_state_update: ClassVar[bool] = False
    settings_keys: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
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
        metric = cls(**entry["settings"])
        defaults = metric.metric_state
        if set(entry["state"]) != set(defaults):
            raise InputFileError(f"{cls.__name__} state holds {sorted(entry['state'])}, expected "
                                 f"{sorted(defaults)}")
        metric.merge_state({name: torch.tensor(value, dtype=defaults[name].dtype)
                            for name, value in entry["state"].items()})
        metric._restored = True
        return metric


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
        payload = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InputFileError(f"metric state file {path} is unreadable ({exc}); rerun the benchmark into this "
                             "folder to write it again") from exc
    if not isinstance(payload, dict) or payload.get("format") != STATE_FORMAT:
        found = payload.get("format") if isinstance(payload, dict) else "?"
        raise InputFileError(f"metric state file {path} has format {found}, expected {STATE_FORMAT}; rerun "
                             "the benchmark into this folder")
    try:
        return {method: {name: RunMetric.from_json(entry) for name, entry in named.items()}
                for method, named in payload["methods"].items()}
    except (KeyError, TypeError, AttributeError, ValueError, RuntimeError) as exc:  # an edited entry
        raise InputFileError(f"metric state file {path} is damaged ({type(exc).__name__}: {exc}); rerun the "
                             "benchmark into this folder to write it again") from exc
