"""faithfulness.csv and faithfulness_curves.png: pixel-perturbation curves (docs/protocol.md 5)
of every method's ground-truth-class maps, one row per image and method with its AUCs, ABPC
and every step of the curves."""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd
import torch
from omegaconf import DictConfig

import wsol_bench.metrics.faithfulness as faithfulness_module
import wsol_bench.metrics.faithfulness_settings as faithfulness_settings_module
from wsol_bench.errors import InputFileError, agreeing, counted
from wsol_bench.metrics.bootstrap import Replicates
from wsol_bench.metrics.faithfulness import (
    FaithfulnessSettings,
    constant_baseline_probs,
    faithfulness_rows,
    row_columns,
    score_batch,
)
from wsol_bench.report.curves import plot_perturbation_curves
from wsol_bench.report.run_folder import RunFolder
from wsol_bench.report.tables import FAITH_NAMES, require_columns
from wsol_bench.run.scorers.base import MeasureTables, register_scorer
from wsol_bench.run.scorers.perturbation import (
    PerturbationRows,
    method_means,
    per_image_values,
    ranked_columns,
    settings_params,
)

FILE = "faithfulness.csv"
ABPC_TOLERANCE = 1e-6  # abpc must equal auc_lerf - auc_morf up to float rounding
# faithfulness.mode -> (the column that marks its rows, {score column: table column})
MODE_NAMES = {"abpc": ("abpc", FAITH_NAMES), "deletion": ("auc_deletion", {"auc_deletion": "Deletion AUC"}),
              "insertion": ("auc_insertion", {"auc_insertion": "Insertion AUC"})}
# ABPC is the difference of the two AUCs, so they are shown but not ranked beside it
BETTER = {"abpc": "higher", "auc_deletion": "lower", "auc_insertion": "higher"}
CAPTIONS = {"abpc": "ABPC, AUC MoRF, AUC LeRF: pixel perturbation of the ground-truth class",
            "deletion": "Deletion AUC: RISE deletion of the ground-truth class (lower is better)",
            "insertion": "Insertion AUC: RISE insertion of the ground-truth class (higher is better)"}
log = logging.getLogger("wsol_bench")


def faithfulness_settings(node: DictConfig) -> FaithfulnessSettings:
    """The `faithfulness` config group as settings (FaithfulnessSettings checks the values)."""
    return FaithfulnessSettings(**settings_params(node))


@register_scorer("faithfulness")
class FaithfulnessScorer(PerturbationRows):
    """Pixel-perturbation curves of every method's ground-truth-class maps (ABPC, deletion,
    insertion).

    The maps arrive with each batch (`MethodBatch.label_maps`: target policy "label", which may
    be the run's own maps); the rows are cached next to those maps (`PerturbationRows`).
    """

    modes = ("abpc", "deletion", "insertion")
    file = FILE
    label_maps = True
    engine = (faithfulness_module, faithfulness_settings_module)

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._full_probs: torch.Tensor | None = None

    @classmethod
    def settings_from(cls, node: DictConfig) -> FaithfulnessSettings:
        return faithfulness_settings(node)

    def row_columns(self) -> list[str]:
        return row_columns(self.settings)

    def score(self, model: torch.nn.Module, images: torch.Tensor, heatmaps: torch.Tensor, classes: torch.Tensor,
              labels: torch.Tensor, logits: torch.Tensor) -> list[dict[str, float]]:
        """The AUCs, ABPC and every step of the curves (`wsol_bench.metrics.faithfulness`); the
        fully removed input of a constant baseline is passed once per run."""
        if self._full_probs is None and not self.settings.blurred:
            self._full_probs = constant_baseline_probs(model, images.shape[1:], self.settings)
        scores = score_batch(model, images, heatmaps, classes, self.settings, clean_logits=logits,
                             full_removal_probs=self._full_probs)
        return faithfulness_rows(scores)

    def write(self, out_dir: Path) -> list[Path]:
        """faithfulness.csv is complete; draw the mean curves per method beside it."""
        paths = super().write(out_dir)
        rows = self.compute()
        if not (rows["degenerate"] == 0).any():
            log.warning("faithfulness: no image has a non-degenerate map; faithfulness_curves.png is not drawn")
            return paths
        plot_perturbation_curves(rows, out_dir / "faithfulness_curves.png")
        return [*paths, out_dir / "faithfulness_curves.png"]

    @classmethod
    def tables(cls, run: RunFolder) -> MeasureTables | None:
        """Mean ABPC and AUCs per method (`faithfulness_summary`), and a note for every method
        whose rows do not cover its images or whose ground-truth-class maps are degenerate."""
        rows = run.per_image_rows(FILE)
        if rows is None:
            return None
        summary = faithfulness_summary(rows, str(run.path / FILE), run.replicates)
        mode = summary.columns[-1].removeprefix("n_images_")
        caption = f"{CAPTIONS[mode]}, percent, mean over all images (n_images_{mode})."
        _, names = MODE_NAMES[mode]
        return MeasureTables(summary=summary, caption=caption, notes=coverage_notes(rows, run.records),
                             per_image=per_image_values(rows, names), better=ranked_columns(BETTER, names))


def faithfulness_summary(faithfulness: pd.DataFrame, source: str = FILE, replicates: Replicates | None = None
                         ) -> pd.DataFrame:
    """Per method, over ALL its images (docs/protocol.md 5: no correctness filter), in percent:
    mean ABPC, AUC MoRF and AUC LeRF with their image count `n_images_abpc` (faithfulness=abpc),
    or the deletion or insertion AUC with `n_images_deletion` / `n_images_insertion`."""
    mode = next((m for m in MODE_NAMES if MODE_NAMES[m][0] in faithfulness.columns), "abpc")
    _, names = MODE_NAMES[mode]
    require_columns(faithfulness, ["image_id", "method", *names], source)
    summary = method_means(faithfulness.assign(degenerate=faithfulness.get("degenerate", 0)), names,
                           f"n_images_{mode}", source, replicates=replicates)
    if mode == "abpc":
        gap = (faithfulness["abpc"] - (faithfulness["auc_lerf"] - faithfulness["auc_morf"])).abs()
        if (gap > ABPC_TOLERANCE).any():
            bad = faithfulness.loc[gap > ABPC_TOLERANCE, "image_id"].tolist()
            raise InputFileError(f"{source}: abpc != auc_lerf - auc_morf for {len(bad)} rows (e.g. {bad[:3]}); "
                                 "the file is inconsistent (docs/protocol.md 5)")
    return summary


def coverage_notes(faithfulness: pd.DataFrame, records: pd.DataFrame) -> list[str]:
    """Faithfulness rows that do not cover every image of a method are reported, not hidden."""
    totals = records.groupby("method", sort=False)["image_id"].nunique()
    counts = faithfulness.groupby("method", sort=False)["image_id"].nunique()
    notes = [f"{FILE} covers {int(counts.get(m, 0)):,} of {counted(int(n), 'image')} for {m}."
             for m, n in totals.items() if int(counts.get(m, 0)) != int(n)]
    if "degenerate" in faithfulness.columns:
        bad = faithfulness[faithfulness["degenerate"] == 1].groupby("method", sort=False).size()
        notes += [f"{m}: ABPC averages {int(counts[m]) - int(n):,} of {counted(int(counts[m]), 'image')}; "
                  f"{counted(int(n), 'ground-truth-class map')} {agreeing(n, 'is', 'are')} degenerate and "
                  f"{agreeing(n, 'has', 'have')} no curve." for m, n in bad.items()]
    return notes
