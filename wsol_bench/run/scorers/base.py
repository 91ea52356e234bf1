"""The scorer contract and its registry.

A scorer is fed every method's batches (`update`), computes its results once all images are
in (`compute`), and writes them into the run folder (`write`). Scorers register with
`@register_scorer(name)`; `from_config` returns None when the run's configuration does not ask
for the scorer, so the runner assembles the list of active scorers from the registry alone.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from omegaconf import DictConfig
from torch import nn
from torch.utils.data import Dataset

from wsol_bench.run.batch import MethodBatch
from wsol_bench.run.store import MapStore

SCORERS: dict[str, type[Scorer]] = {}


@dataclass
class RunContext:
    """What a scorer may need besides its own config: the dataset, where the run writes, and
    lazy access to the model and to the ground-truth-class maps (computed only when asked)."""

    out_dir: Path
    dataset: Dataset
    dataset_name: str
    split: str
    has_masks: bool
    class_names: list[str] | None
    model: Callable[[], nn.Module]
    label_stores: Callable[[], dict[str, MapStore]]


class Scorer:
    """Base class of the scorers a run feeds."""

    name: ClassVar[str] = "scorer"

    @classmethod
    def from_config(cls, cfg: DictConfig, context: RunContext) -> Scorer | None:
        """The scorer for this run, or None when the configuration does not ask for it."""
        raise NotImplementedError

    def prepare(self) -> None:
        """Work the scorer needs before the first batch, after the run's own maps exist (e.g.
        explaining the ground-truth class); nothing by default."""

    def update(self, mb: MethodBatch) -> None:
        """Take one method's batch."""
        raise NotImplementedError

    def close(self) -> None:
        """Release open files, also when the run fails; nothing by default."""

    def compute(self) -> Any:
        """The results, once every batch is in."""
        raise NotImplementedError

    def write(self, out_dir: Path) -> list[Path]:
        """Write the results into the run folder; returns the files written."""
        raise NotImplementedError


def register_scorer(name: str) -> Callable[[type[Scorer]], type[Scorer]]:
    """Class decorator: make a Scorer subclass part of every run that asks for it."""
    def wrap(cls: type[Scorer]) -> type[Scorer]:
        if name in SCORERS and SCORERS[name] is not cls:
            raise ValueError(f"scorer name {name!r} is already registered by {SCORERS[name]}")
        cls.name = name
        SCORERS[name] = cls
        return cls
    return wrap


def build_scorers(cfg: DictConfig, context: RunContext) -> list[Scorer]:
    """Every registered scorer the configuration asks for, in registration order."""
    scorers = [cls.from_config(cfg, context) for cls in SCORERS.values()]
    return [s for s in scorers if s is not None]
