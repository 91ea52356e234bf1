"""Typed Hydra configs (structured configs) of both commands, and the checks built on them.

Importing `wsol_bench.conf` (which Hydra does before reading the YAML tree) registers the
schemas, so every way of composing the tree validates it: the CLIs, Hydra's compose API and
`--cfg job`. Method parameters depend on the explainer's constructor (plugins included), so
they are checked at run time by `check_method_params`."""

from .methods import check_method_params
from .register import SCHEMAS, register_schemas
from .resolvers import register_resolvers

__all__ = ["SCHEMAS", "check_method_params", "register_resolvers", "register_schemas"]
