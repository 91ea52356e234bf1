"""Explainer registry: built-in methods register with a decorator; third-party packages
register through the entry-point group `wsol_bench.explainers`."""

from __future__ import annotations

import hashlib
import inspect
import sys
from collections.abc import Callable
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from torch import nn

from wsol_bench.errors import SettingError, UserError

from .base import Explainer

ENTRY_POINT_GROUP = "wsol_bench.explainers"
_REGISTRY: dict[str, type[Explainer]] = {}
_BROKEN: dict[str, str] = {}  # plugin name -> why it failed to import


class PluginImportError(UserError, ImportError):
    """An explainer plugin a run asks for failed to import; the message names it and the cause."""
_plugins_loaded = False


def register_explainer(name: str) -> Callable[[type[Explainer]], type[Explainer]]:
    """Class decorator: make an Explainer subclass available as `name`."""
    def wrap(cls: type[Explainer]) -> type[Explainer]:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise SettingError(f"explainer name {name!r} is already registered by {_REGISTRY[name]}")
        cls.name = name
        _REGISTRY[name] = cls
        return cls
    return wrap


def load_plugins(force: bool = False) -> None:
    """Import every explainer advertised in the `wsol_bench.explainers` entry-point group. A
    plugin that fails to import is remembered, not raised: it breaks only runs that use it."""
    global _plugins_loaded
    if _plugins_loaded and not force:
        return
    _plugins_loaded = True
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            obj = ep.load()
        except Exception as exc:  # noqa: BLE001
            _BROKEN[ep.name] = f"explainer plugin {ep.name!r} ({ep.value}) failed to import: {exc}"
            continue
        if isinstance(obj, type) and issubclass(obj, Explainer) and ep.name not in _REGISTRY:
            register_explainer(ep.name)(obj)


def available() -> list[str]:
    """Names of all registered explainers, plugins included."""
    load_plugins()
    return sorted(_REGISTRY)


def method_table() -> list[dict[str, Any]]:
    """One row per registered explainer: name, map resolution ("grid" or "pixel"), whether it
    is class-specific, its model passes per image, and the library it adapts (the module's
    top-level package for third-party adapters, else "wsol_bench")."""
    rows = []
    for name in available():
        cls = _REGISTRY[name]
        rows.append({"name": name, "resolution": cls.resolution, "class_specific": bool(cls.class_specific),
                     "passes_per_image": cls.passes_per_image, "library": getattr(cls, "library", "wsol_bench")})
    return rows


def get_explainer(name: str, model: nn.Module, **params: Any) -> Explainer:
    """Build explainer `name` for `model`; an unknown name lists the valid ones."""
    return explainer_class(name)(model, **params)


def explainer_class(name: str) -> type[Explainer]:
    """The registered class of explainer `name` (plugins included)."""
    load_plugins()
    if name in _BROKEN and name not in _REGISTRY:
        raise PluginImportError(_BROKEN[name])
    if name not in _REGISTRY:
        raise SettingError(f"unknown method {name!r}; valid: {', '.join(available())}")
    return _REGISTRY[name]


def source_digest(cls: type) -> str:
    """sha256 over the source files that define `cls`: the modules of its class hierarchy and
    the wsol_bench or plugin modules those modules use (capture hooks, model helpers), so an
    edit to any of them changes the digest (and the map-store key: changed code recomputes)."""
    files: set[str] = set()
    roots = {cls.__module__.split(".")[0], "wsol_bench"}
    for klass in cls.__mro__:
        module = sys.modules.get(klass.__module__)
        if module is None or klass.__module__.split(".")[0] not in roots:
            continue
        files.add(inspect.getsourcefile(module) or "")
        for value in vars(module).values():
            owner = getattr(value, "__module__", None) if not inspect.ismodule(value) else value.__name__
            if isinstance(owner, str) and owner.split(".")[0] in roots and owner in sys.modules:
                files.add(inspect.getsourcefile(sys.modules[owner]) or "")
    digest = hashlib.sha256()
    for path in sorted(f for f in files if f):
        digest.update(Path(path).name.encode() + b"\0" + Path(path).read_bytes())
    return digest.hexdigest()[:16]
