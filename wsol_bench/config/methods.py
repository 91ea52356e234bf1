"""Method parameters checked against the explainer's constructor: the YAML schema cannot know
them (plugins bring their own), the registered class can."""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any


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
    """Raise ValueError naming the method, the unknown keys and the valid ones when `params`
    holds a key explainer `name`'s constructor does not take (plugins are loaded first)."""
    from wsol_bench.methods.registry import explainer_class

    cls = explainer_class(name)  # an unknown name lists the valid ones; a broken plugin names itself
    valid = constructor_params(cls)
    unknown = sorted(set(params) - set(valid)) if valid is not None else []
    if unknown:
        raise ValueError(f"method {name!r} takes no parameter {', '.join(map(repr, unknown))}; "
                         f"valid: {', '.join(valid) or 'none'}")
