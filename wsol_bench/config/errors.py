"""Hydra's refusals of a configuration (a typo'd key, a wrong type, an unknown group option) as
one line that names the offending key, override or option (the commands print it as every other
refusal, wsol_bench.cli.errors)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from hydra.errors import (
    ConfigCompositionException,
    MissingConfigException,
    OverrideParseException,
    SearchPathException,
)
from omegaconf import DictConfig
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

CONFIG_MODULE = "wsol_bench.conf"  # the config tree of both commands
COMPOSE_ERRORS = (ConfigCompositionException, OverrideParseException, SearchPathException)
APPEND_HINT = "To append to your config use"  # Hydra's advice after a key a dict node lacks


def _squash(text: str) -> str:
    """The non-empty lines of `text` joined into one."""
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def _omegaconf_cause(exc: BaseException) -> OmegaConfBaseException | None:
    """The OmegaConf error that made Hydra refuse, if any (raised `from` it, or while handling it)."""
    cause = exc.__cause__ or exc.__context__
    return cause if isinstance(cause, OmegaConfBaseException) else None


def _omegaconf_line(err: OmegaConfBaseException) -> str:
    """`key: what is wrong`; an unknown key of a schema also lists the valid ones."""
    key = err.full_key or err.key or ""
    message = (getattr(err, "msg", None) or str(err)).splitlines()[0]
    schema = err.object_type
    if isinstance(err, (ConfigKeyError, ConfigAttributeError)) and dataclasses.is_dataclass(schema):
        valid = ", ".join(f.name for f in dataclasses.fields(schema))
        return f"unknown key {key}; valid keys here: {valid}" if key else f"{message}; valid keys: {valid}"
    return f"{key}: {message}" if key else message


def group_options(group: str, config_name: str | None = None, overrides: Sequence[str] = ()) -> list[str]:
    """The options of config group `group` on the commands' search path (plugins' config
    folders included; `hydra.searchpath=...` among `overrides` counts too)."""
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    searchpath = [o for o in overrides if o.lstrip("+").startswith("hydra.searchpath")]

    def options() -> list[str]:
        loader = GlobalHydra.instance().config_loader()
        return sorted(loader.get_group_options(group, config_name=config_name, overrides=searchpath))
    try:
        if GlobalHydra.instance().is_initialized():  # composing through Hydra's compose API
            return options()
        with initialize_config_module(CONFIG_MODULE, version_base="1.3"):  # Hydra has let go of it
            return options()
    except Exception:  # the message is still useful without the list  # noqa: BLE001
        return []


def _missing_option_line(exc: MissingConfigException, config_name: str | None, argv: Sequence[str]) -> str:
    """`unknown <group> '<option>'; valid: ...` for a group option no config folder has."""
    group, _, option = (exc.missing_cfg_file or "").rpartition("/")
    options = sorted(exc.options or []) or (group_options(group, config_name, argv) if group else [])
    if not options:
        return _squash(str(exc))
    return f"unknown {group} {option!r}; valid: {', '.join(options)}"


def one_line(exc: BaseException, config_name: str | None = None, argv: Sequence[str] = ()) -> str:
    """A Hydra composition error as one line that names the offending key, override or option.
    `config_name` and the command line `argv` let an unknown group option list the valid ones."""
    if isinstance(exc, MissingConfigException):
        return _missing_option_line(exc, config_name, argv)
    if isinstance(exc, OverrideParseException):
        return f"cannot parse {exc.override!r}: {_squash(exc.message)}"
    cause = _omegaconf_cause(exc)
    if cause is None:
        return _squash(str(exc))
    line = _omegaconf_line(cause)
    message = str(exc)
    if message.startswith("In '"):  # composing a config file failed, not a command-line override
        line += f" ({message.split(':', 1)[0]})"
    elif APPEND_HINT in message and not dataclasses.is_dataclass(cause.object_type):
        line = _untyped_key_line(cause, message.split(APPEND_HINT, 1)[1].strip(), config_name, argv)
    return line


def _untyped_key_line(err: OmegaConfBaseException, append: str, config_name: str | None,
                      argv: Sequence[str]) -> str:
    """A key an untyped node lacks: under an optional group nobody selected (`sweep.step=0.1`
    without `sweep=grid`: the group's node is empty), or in a free-form dict (method params,
    model kwargs), where adding one with + is legitimate."""
    key = err.full_key
    group, _, leaf = key.partition(".")
    unselected = leaf and "." not in leaf and getattr(err, "parent_node", None) is not None \
        and len(err.parent_node) == 0
    options = group_options(group, config_name, argv) if unselected else []
    if options:
        return (f"{key}: no {group} is selected; choose one first, e.g. {group}={options[0]} (valid: "
                f"{', '.join(options)})")
    return _method_parameter_line(err) or f"unknown key {key}; add it with {append}"


def _method_parameter_line(err: OmegaConfBaseException) -> str | None:
    """For a key under a method's params (`method.<entry>.params.<name>`) that its explainer
    does not take: the refusal naming the explainer's valid parameters (adding the key with +
    would only be refused next). None for any other key, and for a parameter the explainer
    takes but its YAML file leaves out (adding it with + is then right)."""
    from wsol_bench.config.methods import check_method_params
    from wsol_bench.errors import UserError

    parts = (err.full_key or "").split(".")
    if len(parts) != 4 or parts[0] != "method" or parts[2] != "params":
        return None
    entry = getattr(err.parent_node, "_get_parent", lambda: None)()  # the method's node: its explainer name
    name = entry.get("name") if isinstance(entry, DictConfig) else None
    try:
        check_method_params(name if isinstance(name, str) else parts[1], {parts[3]: None})
    except UserError as exc:  # an unknown parameter (or explainer): its one line lists the valid ones
        return str(exc)
    return None
