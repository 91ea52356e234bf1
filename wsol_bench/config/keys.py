"""Keys of a composed config that differ from its schema. Hydra refuses an undeclared key at
compose time, except one added on purpose with `+key=value` (which opens the node), and lets
`~key` delete a declared one: the commands check for both before any work."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

from omegaconf import DictConfig, OmegaConf

from wsol_bench.errors import SettingError


def typed_nodes(node: DictConfig, prefix: str = "") -> Iterator[tuple[str, DictConfig, type]]:
    """(dotted prefix, node, dataclass) for `node` and every node below it typed by a schema;
    untyped nodes (method params, model kwargs) are free-form and skipped, None and `???`
    nodes hold nothing to check."""
    schema = OmegaConf.get_type(node)
    if dataclasses.is_dataclass(schema):
        yield prefix, node, schema
    for key, child in node.items_ex(resolve=False):
        if isinstance(child, DictConfig) and not OmegaConf.is_missing(node, key) and node[key] is not None:
            yield from typed_nodes(child, f"{prefix}{key}.")


def unknown_keys(cfg: DictConfig) -> list[tuple[str, type]]:
    """(dotted key, schema) for every key a schema-typed node holds that its dataclass lacks."""
    return [(f"{prefix}{key}", schema) for prefix, node, schema in typed_nodes(cfg)
            for key in node if key not in {f.name for f in dataclasses.fields(schema)}]


def removed_keys(cfg: DictConfig) -> list[str]:
    """Dotted keys a schema-typed node declares but no longer holds (deleted with `~key`);
    `node.keys()` and not `in`, which is False for a mandatory `???` value too."""
    return [f"{prefix}{f.name}" for prefix, node, schema in typed_nodes(cfg)
            for f in dataclasses.fields(schema) if f.name not in set(node.keys())]


def check_known_keys(cfg: DictConfig) -> None:
    """Raise SettingError naming the first key the schema does not declare (and the valid ones),
    or the first declared key that was deleted."""
    found = unknown_keys(cfg)
    if found:
        key, schema = found[0]
        valid = ", ".join(f.name for f in dataclasses.fields(schema))
        raise SettingError(f"unknown key {key}; valid keys here: {valid}")
    removed = removed_keys(cfg)
    if removed:
        raise SettingError(f"{removed[0]} cannot be deleted: the command needs a value for it")
