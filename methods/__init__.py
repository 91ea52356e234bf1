"""Explainers of wsol-bench (installed as wsol_bench.methods): one file per method, each
registering itself with `@register_explainer`; every module of this package is imported here,
so a new method is its file plus its config (conf/method/<name>.yaml), with no other edit."""

import importlib
import pkgutil

from .base import Explainer, Explanation, target_score
from .registry import available, get_explainer, method_table, register_explainer

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["Explainer", "Explanation", "available", "get_explainer", "method_table", "register_explainer",
           "target_score"]
