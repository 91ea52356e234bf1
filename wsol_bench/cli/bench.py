"""The `wsol-bench` command (Hydra). With no arguments it runs the quickstart preset."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig
from omegaconf.errors import MissingMandatoryValue

from wsol_bench.methods.capture import UnsupportedModelError
from wsol_bench.regions.contours import MissingDependencyError
from wsol_bench.models import ModelLoadError

log = logging.getLogger("wsol_bench")
# Errors caused by the user's settings or files: print the message, not a traceback.
USER_ERRORS = (ModelLoadError, UnsupportedModelError, MissingDependencyError, ValueError, FileNotFoundError,
               KeyError)


@hydra.main(config_path="pkg://wsol_bench.conf", config_name="config", version_base="1.3")
def _main(cfg: DictConfig) -> None:
    from wsol_bench.run.runner import run

    try:
        run(cfg, Path(HydraConfig.get().runtime.output_dir))
    except MissingMandatoryValue as exc:
        if os.environ.get("WSOL_BENCH_DEBUG"):
            raise
        key = getattr(exc, "full_key", None) or "a setting"
        print(f"wsol-bench: error: {key} is required by this preset and has no value; give it on the "
              f"command line, e.g. {key}=/path/to/it", file=sys.stderr)
        sys.exit(2)
    except USER_ERRORS as exc:
        if os.environ.get("WSOL_BENCH_DEBUG"):
            raise
        log.error("%s", exc)
        print(f"wsol-bench: error: {exc}", file=sys.stderr)
        sys.exit(2)


def method_config_names() -> list[str]:
    """Names of the method configs shipped in wsol_bench.conf/method."""
    from importlib import resources

    folder = resources.files("wsol_bench.conf") / "method"
    return sorted(f.name[:-5] for f in folder.iterdir() if f.name.endswith(".yaml"))


def unknown_methods(overrides: list[str]) -> list[str]:
    """Method names selected on the command line that have no config in wsol_bench.conf and
    no registered explainer. Hydra's own error for a list of group options does not say
    which options exist, so the CLI checks first. A custom hydra.searchpath (plugin configs)
    disables the check: those configs are only known to Hydra."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from wsol_bench.methods import available

    try:
        parsed = OverridesParser.create().parse_overrides([o for o in overrides if not o.startswith("-")])
    except Exception:  # let Hydra report malformed overrides in its own words
        return []
    if any(o.key_or_group.startswith("hydra.searchpath") for o in parsed):
        return []
    known = set(method_config_names()) | set(available())
    unknown = []
    for o in parsed:
        if o.key_or_group == "method" and not o.is_sweep_override():
            value = o.value()
            names = value if isinstance(value, list) else [value]
            unknown += [str(n) for n in names if str(n) not in known]
    return unknown


def main() -> None:
    """Console entry point (set WSOL_BENCH_DEBUG=1 for tracebacks of user errors)."""
    bad = unknown_methods(sys.argv[1:])
    if bad:
        valid = method_config_names()
        print(f"wsol-bench: error: unknown method {', '.join(map(repr, bad))}; valid: {', '.join(valid)} "
              "(plugins: add their config folder with hydra.searchpath=[pkg://<plugin>.conf])", file=sys.stderr)
        sys.exit(2)
    _main()


if __name__ == "__main__":
    main()
