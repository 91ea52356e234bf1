"""Method parameters checked against the explainer's constructor: the YAML schema cannot know
them (plugins bring their own), the registered class can."""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

from wsol_bench.errors import SettingError


def constructor_params(cls: type) -> list[str] | None:
    """Keyword arguments `cls(model, ...)` accepts after the model; None when it takes any
    (its own **kwargs). The base Explainer's **params only exists to refuse extras, so a
    class that inherits it takes none."""
    from wsol_bench.methods.base import Explainer

    params = list(inspect.signature(cls).parameters.values())[1:]  # the first is the model
    if cls.__init__ is not Explainer.__init__ and any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    return [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def check_method_params(name: str, params: Mapping[str, Any]) -> None:
    """Raise SettingError naming the method, the unknown keys and the valid ones when `params`
    holds a key explainer `name`'s constructor does not take (plugins are loaded first)."""
    from wsol_bench.methods.registry import explainer_class

    cls = explainer_class(name)  # an unknown name lists the valid ones; a broken plugin names itself
    valid = constructor_params(cls)
    unknown = sorted(set(params) - set(valid)) if valid is not None else []
    if unknown:
        raise SettingError(f"method {name!r} takes no parameter {', '.join(map(repr, unknown))}; "
                         f"valid: {', '.join(valid) or 'none'}")


def check_method_entries(methods: Mapping[str, Any], group: str = "method", what: str = "explainer") -> None:
    """Every entry of `method` (or of `measure`: group="measure") must be {name: <explainer>,
    params: {...}} (MethodConfig, MeasureConfig: the same two keys); an entry of another shape is
    a SettingError naming its key."""
    from dataclasses import fields

    from wsol_bench.config.groups import MethodConfig

    allowed = {f.name for f in fields(MethodConfig)}
    for key, entry in methods.items():
        if not isinstance(entry, Mapping) or not isinstance(entry.get("name"), str):
            raise SettingError(f"{group}.{key} must be {{name: <{what}>, params: {{...}}}}, got {entry!r}")
        extra = sorted(set(entry) - allowed)
        if extra:
            raise SettingError(f"unknown key {group}.{key}.{extra[0]}; valid keys here: {', '.join(sorted(allowed))}")
        if not isinstance(entry.get("params", {}) or {}, Mapping):
            raise SettingError(f"{group}.{key}.params must be a mapping of the {what}'s parameters")
