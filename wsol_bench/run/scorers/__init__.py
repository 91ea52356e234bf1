"""The scorers a run feeds, one file each (a measure is its scorer module). Importing this
package registers every module in it: the built-in ones first, in the order they are fed and
their columns appear in the tables, then any other module of the package by name, so a new
measure needs no line here. Third-party packages add measures through the entry-point group
`wsol_bench.measures` (registered after these)."""

import importlib
import pkgutil

from .base import SCORERS, MeasureTables, RunContext, Scorer, build_scorers, needs_label_maps, register_scorer

FIRST = ("records", "faithfulness", "masks", "sweep", "segmentation")  # their order is the tables' column order
for _name in [*FIRST, *sorted({m.name for m in pkgutil.iter_modules(__path__)} - {*FIRST, "base", "perturbation"})]:
    importlib.import_module(f"{__name__}.{_name}")

__all__ = ["SCORERS", "MeasureTables", "RunContext", "Scorer", "build_scorers", "needs_label_maps", "register_scorer"]
