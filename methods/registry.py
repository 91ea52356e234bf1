"""Explainer registry: built-in methods register with a decorator; third-party packages
register through the entry-point group `wsol_bench.explainers`."""

from __future__ import annotations

from collections.abc import Callable
from importlib.metadata import entry_points
from typing import Any

from torch import nn

from .base import Explainer

ENTRY_POINT_GROUP = "wsol_bench.explainers"
_REGISTRY: dict[str, type[Explainer]] = {}
_plugins_loaded = False


def register_explainer(name: str) -> Callable[[type[Explainer]], type[Explainer]]:
    """Class decorator: make an Explainer subclass available as `name`."""
    def wrap(cls: type[Explainer]) -> type[Explainer]:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"explainer name {name!r} is already registered by {_REGISTRY[name]}")
        cls.name = name
        _REGISTRY[name] = cls
        return cls
    return wrap


def load_plugins(force: bool = False) -> None:
    """Import every explainer advertised in the `wsol_bench.explainers` entry-point group."""
    global _plugins_loaded
    if _plugins_loaded and not force:
        return
    _plugins_loaded = True
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            obj = ep.load()
        except Exception as exc:
            raise ImportError(f"explainer plugin {ep.name!r} ({ep.value}) failed to import: {exc}") from exc
        if isinstance(obj, type) and issubclass(obj, Explainer) and ep.name not in _REGISTRY:
            register_explainer(ep.name)(obj)


def available() -> list[str]:
    """Names of all registered explainers, plugins included."""
    load_plugins()
    return sorted(_REGISTRY)


def get_explainer(name: str, model: nn.Module, **params: Any) -> Explainer:
    """Build explainer `name` for `model`; an unknown name lists the valid ones."""
    load_plugins()
    if name not in _REGISTRY:
        raise ValueError(f"unknown method {name!r}; valid: {', '.join(available())}")
    return _REGISTRY[name](model, **params)
