"""The shared part of the measures of the `measure` group (sanity checks, pointing games,
complexity, robustness): one row per image and method in the measure's CSV, cached per shard
next to the maps it scores, exactly as the faithfulness measures' rows (`PerturbationRows`).

A measure subclasses `MeasureRows` in its own file: its registered name (the `name` of its
`measure` entry and of conf/measure/<name>.yaml), its CSV, its settings class (a frozen
dataclass that checks its values; the entry's `params` are its keyword arguments), whether it
needs the model, and `measure`: the rows of one batch's non-degenerate maps. The batch carries
the images, the ground truth and the method, so a measure may also call the method's explainer
(`self.explainer(method)`) or build it on a changed model (`self.explainer_on(model, method)`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from omegaconf import DictConfig, OmegaConf

from wsol_bench.environment import precision_key
from wsol_bench.errors import SettingError
from wsol_bench.run.batch import MethodBatch
from wsol_bench.run.scorers.base import RunContext
from wsol_bench.run.scorers.perturbation import PerturbationRows, settings_params


class MeasureRows(PerturbationRows):
    """Base of the measures a run selects with `measure=[...]`."""

    measure_group: ClassVar[bool] = True  # listed as a valid `measure` name
    settings_class: ClassVar[type] = object  # frozen dataclass of the measure's params
    uses_model: ClassVar[bool] = False  # True: `measure` gets the model (forward passes or explanations)
    context: RunContext | None = None

    @classmethod
    def entry(cls, cfg: DictConfig) -> DictConfig | None:
        """This measure's entry of `measure` (None when the run does not select it)."""
        found = [entry for entry in (cfg.get("measure") or {}).values() if entry.name == cls.name]
        if len(found) > 1:
            raise SettingError(f"measure {cls.name!r} is selected {len(found)} times; select it once")
        return found[0] if found else None

    @classmethod
    def asked(cls, cfg: DictConfig) -> bool:
        return cls.entry(cfg) is not None

    @classmethod
    def settings_from(cls, node: DictConfig) -> Any:
        """The settings class built from the entry's params; an unknown key names the valid ones."""
        params = settings_params(node.get("params") or OmegaConf.create({}))
        valid = set(getattr(cls.settings_class, "__dataclass_fields__", {}))
        unknown = sorted(set(params) - valid)
        if unknown:
            raise SettingError(f"measure {cls.name!r} takes no parameter {', '.join(map(repr, unknown))}; "
                               f"valid: {', '.join(sorted(valid)) or 'none'}")
        return cls.settings_class(**params)

    @classmethod
    def from_config(cls, cfg: DictConfig, context: RunContext) -> MeasureRows | None:
        entry = cls.entry(cfg)
        if entry is None:
            return None
        settings = cls.settings_from(entry)  # a bad setting fails before any model pass
        scorer = cls(context.model, context.target_stores, settings, context.out_dir / cls.file,
                     dataset_name=context.dataset_name, split=context.split,
                     precision=precision_key(str(cfg.device), bool(cfg.tf32)) if cls.uses_model else None)
        scorer.context = context
        return scorer

    def explainer(self, method: str):
        """The run's explainer of method key `method`."""
        if self.context is None or self.context.explainers is None:
            raise SettingError(f"measure {self.name!r} calls the explainers; it runs inside a wsol-bench run")
        return self.context.explainers(method)

    def explainer_on(self, model: torch.nn.Module, method: str):
        """A new explainer of method key `method` on `model` (e.g. a randomised copy)."""
        self.explainer(method)  # the same refusal outside a run
        return self.context.explainers.on(model, method)

    def scored(self, mb: MethodBatch, keep: torch.Tensor, heat: torch.Tensor, classes: torch.Tensor,
               logits: torch.Tensor) -> list[dict[str, float]]:
        model = self.model_fn() if self.uses_model else None
        return self.measure(model, mb, keep, heat, classes, logits)

    def measure(self, model: torch.nn.Module | None, mb: MethodBatch, keep: torch.Tensor, heat: torch.Tensor,
                classes: torch.Tensor, logits: torch.Tensor) -> list[dict[str, float]]:
        """The score row of each image `keep` of `mb`: `heat` their heatmaps ([K, H, W] in [0, 1],
        none degenerate), `classes` the classes the maps explain, `logits` the clean logits;
        `model` when `uses_model`, else None."""
        raise NotImplementedError


@dataclass(frozen=True)
class NoSettings:
    """The settings of a measure that has none (its `measure` entry takes no params)."""


class HeatmapStatistic(MeasureRows):
    """A measure that is a function of each heatmap alone (no model pass, no explanation):
    `statistic` maps heatmaps [K, H, W] to one value each, written as column `column`."""

    settings_class = NoSettings
    column: ClassVar[str] = ""

    @staticmethod
    def statistic(heat: torch.Tensor) -> torch.Tensor:
        """[K] values of the heatmaps [K, H, W]."""
        raise NotImplementedError

    def row_columns(self) -> list[str]:
        return [self.column]

    def measure(self, model, mb: MethodBatch, keep: torch.Tensor, heat: torch.Tensor, classes: torch.Tensor,
                logits: torch.Tensor) -> list[dict[str, float]]:
        return [{self.column: value} for value in self.statistic(heat).tolist()]
