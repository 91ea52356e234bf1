"""Explainer registry: built-in methods register with a decorator; third-party packages
register through the entry-point group `wsol_bench.explainers`."""

from __future__ import annotations

import hashlib
import inspect
import sys
from pathlib import Path
from typing import Any

from torch import nn

from wsol_bench.registry import PluginImportError, Registry  # noqa: F401  (PluginImportError: raised here)

from .base import Explainer

ENTRY_POINT_GROUP = "wsol_bench.explainers"
_REGISTRY: Registry[type[Explainer]] = Registry(
    "method", group=ENTRY_POINT_GROUP, accepts=lambda obj: isinstance(obj, type) and issubclass(obj, Explainer))


def register_explainer(name: str):
    """Class decorator: make an Explainer subclass available as `name`."""
    return _REGISTRY.register(name)


def load_plugins(force: bool = False) -> None:
    """Import every explainer advertised in the `wsol_bench.explainers` entry-point group. A
    plugin that fails to import is remembered, not raised: it breaks only runs that use it."""
    _REGISTRY.load_plugins(force)


def available() -> list[str]:
    """Names of all registered explainers, plugins included."""
    return _REGISTRY.names()


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
    return _REGISTRY.lookup(name)


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
