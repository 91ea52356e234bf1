"""The `wsol-bench` command (Hydra). With no arguments it runs the quickstart preset."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from wsol_bench.capture import UnsupportedModelError
from wsol_bench.models import ModelLoadError

log = logging.getLogger("wsol_bench")
# Errors caused by the user's settings or files: print the message, not a traceback.
USER_ERRORS = (ModelLoadError, UnsupportedModelError, ValueError, FileNotFoundError, KeyError)


@hydra.main(config_path="pkg://wsol_bench.conf", config_name="config", version_base="1.3")
def _main(cfg: DictConfig) -> None:
    from wsol_bench.runner import run

    try:
        run(cfg, Path(HydraConfig.get().runtime.output_dir))
    except USER_ERRORS as exc:
        if os.environ.get("WSOL_BENCH_DEBUG"):
            raise
        log.error("%s", exc)
        print(f"wsol-bench: error: {exc}", file=sys.stderr)
        sys.exit(2)


def main() -> None:
    """Console entry point (set WSOL_BENCH_DEBUG=1 for tracebacks of user errors)."""
    _main()


if __name__ == "__main__":
    main()
