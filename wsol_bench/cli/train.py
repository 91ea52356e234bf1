"""The `wsol-bench-train` command (Hydra): fine-tune a timm model, or train the shipped
architecture from scratch, on any dataset of the suite.

    wsol-bench-train                                  # train=synthetic: the shipped model's recipe
    wsol-bench-train train=voc_single_class dataset.params.root=/data device=cuda
    wsol-bench-train out_dir=results/runs/my_run      # again: resumes from its checkpoint
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from wsol_bench.config.errors import run_app
from wsol_bench.config.keys import check_known_keys
from wsol_bench.train.recipe import USER_ERRORS, train_from_config

log = logging.getLogger("wsol_bench.train")


@hydra.main(config_path="pkg://wsol_bench.conf", config_name="trainer", version_base="1.3")
def _main(cfg: DictConfig) -> None:
    out_dir = Path(cfg.out_dir) if cfg.out_dir else Path(HydraConfig.get().runtime.output_dir)
    try:
        check_known_keys(cfg)  # keys added with +key=value, which Hydra lets past the schema
        train_from_config(cfg, out_dir)
    except USER_ERRORS as exc:
        if os.environ.get("WSOL_BENCH_DEBUG"):
            raise
        log.error("%s", exc)
        print(f"wsol-bench-train: error: {exc}", file=sys.stderr)
        sys.exit(2)


def main() -> None:
    """Console entry point (set WSOL_BENCH_DEBUG=1 for tracebacks of user errors)."""
    run_app(_main, "wsol-bench-train", "trainer")


if __name__ == "__main__":
    main()
