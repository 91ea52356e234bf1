"""Hydra configuration tree of wsol-bench (installed as wsol_bench.conf).

Hydra imports this package before it reads a file of the tree, so the typed schemas the YAML
files list in their defaults (`/schema_*`) are registered here, whoever composes the tree,
with the resolvers its files use (`${run_start:...}`)."""

from wsol_bench.config import register_resolvers, register_schemas

register_schemas()
register_resolvers()
