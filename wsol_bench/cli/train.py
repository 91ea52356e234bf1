"""The `wsol-bench-train` command (Hydra): fine-tune a timm model, or train the shipped
architecture from scratch, on any dataset of the suite.

    wsol-bench-train                                  # train=synthetic: the shipped model's recipe
    wsol-bench-train train=voc_single_class dataset.params.root=/data device=cuda
    wsol-bench-train out_dir=results/runs/my_run      # again: resumes from its checkpoint
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from wsol_bench.cli.errors import job_refusals, run_command
from wsol_bench.config.checks import check_trainer_settings
from wsol_bench.config.keys import check_known_keys


@hydra.main(config_path="pkg://wsol_bench.conf", config_name="trainer", version_base="1.3")
def _main(cfg: DictConfig) -> None:
    out_dir = Path(cfg.out_dir) if cfg.out_dir else Path(HydraConfig.get().runtime.output_dir)
    with job_refusals("wsol-bench-train"):
        check_known_keys(cfg)  # keys added with +key=value, which Hydra lets past the schema
        check_trainer_settings(cfg)  # every check that needs no library: refused before torch loads
        from wsol_bench.train.recipe import train_from_config  # torch and timm: there is work to do

        train_from_config(cfg, out_dir)
        print(f"\nrun folder: {out_dir.absolute()}")


def main() -> None:
    """Console entry point (set WSOL_BENCH_DEBUG=1 for the traceback of a refusal)."""
    sys.exit(run_command("wsol-bench-train", _main, "trainer"))


if __name__ == "__main__":
    main()
