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

from wsol_bench.config.errors import file_system_line, run_app
from wsol_bench.config.keys import check_known_keys
from wsol_bench.methods.capture import UnsupportedModelError
from wsol_bench.methods.registry import PluginImportError
from wsol_bench.models import ModelLoadError
from wsol_bench.regions.contours import MissingDependencyError
from wsol_bench.run.store import InvalidShard

log = logging.getLogger("wsol_bench")
# Errors caused by the user's settings or files: print the message, not a traceback.
USER_ERRORS = (ModelLoadError, UnsupportedModelError, MissingDependencyError, PluginImportError, InvalidShard,
               ValueError, FileNotFoundError, KeyError)


@hydra.main(config_path="pkg://wsol_bench.conf", config_name="config", version_base="1.3")
def _main(cfg: DictConfig) -> None:
    from wsol_bench.run.runner import run

    try:
        check_known_keys(cfg)  # keys added with +key=value, which Hydra lets past the schema
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
    except OSError as exc:  # a full disk, a read-only or forbidden folder: name the path
        if os.environ.get("WSOL_BENCH_DEBUG") or not exc.filename:
            raise
        log.error("%s", file_system_line(exc))
        print(f"wsol-bench: error: {file_system_line(exc)}", file=sys.stderr)
        sys.exit(2)


def main() -> None:
    """Console entry point (set WSOL_BENCH_DEBUG=1 for tracebacks of user errors)."""
    run_app(_main, "wsol-bench", "config")


if __name__ == "__main__":
    main()
