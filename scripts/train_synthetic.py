"""Train the shipped synthetic ViT (`wsol_synthetic_vit`) from scratch with its seeded recipe,
the `train=synthetic` preset of `wsol-bench-train`, and install the result as the package's
shipped weights.

    python scripts/train_synthetic.py                       # into results/train_synthetic, then install
    python scripts/train_synthetic.py --no-install          # train only
    python scripts/train_synthetic.py -- device=cuda        # overrides after -- go to the trainer

The recipe trains at the model's own 224 px on 20,000 rendered train images (the image cache in
<out-dir>/cache) for 60 epochs; a rerun with the same out-dir resumes where it stopped. The
installed JSON is the run's `model.json` record with the recipe's wall-clock time.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = ROOT / "wsol_bench" / "weights" / "wsol_synthetic_vit"
PRESET = "synthetic"


def train(out: Path, cache: Path, overrides: list[str]) -> dict:
    """One `wsol-bench-train train=synthetic` run (seed 0); returns its model.json record."""
    command = [sys.executable, "-m", "wsol_bench.cli.train", f"train={PRESET}", "seed=0", f"out_dir={out}",
               f"cache_dir={cache}", f"hydra.run.dir={out / 'hydra'}", *overrides]
    print("running:", " ".join(command), flush=True)
    subprocess.run(command, check=True)
    return json.loads((out / "model.json").read_text())


def main() -> None:
    """Train, then copy the weights and the record into wsol_bench/weights/."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", type=Path, default=ROOT / "results" / "train_synthetic")
    parser.add_argument("--no-install", action="store_true", help="leave the shipped weights unchanged")
    parser.add_argument("overrides", nargs="*", help="extra wsol-bench-train overrides (after --)")
    args = parser.parse_args()
    out = args.out_dir.resolve()
    start = time.perf_counter()
    record = train(out / "run", out / "cache", args.overrides)
    minutes = (time.perf_counter() - start) / 60
    print(f"final val accuracy {record['final_val_acc']:.4f}; recipe wall clock {minutes:.1f} min")
    if not args.no_install:
        install(out / "run", record, minutes)


def install(run: Path, record: dict, minutes: float) -> None:
    """Copy the run's weights into the package and write its record beside them."""
    shutil.copyfile(run / "model.safetensors", WEIGHTS.with_suffix(".safetensors"))
    # The shipped record names the packaged file, not where this run wrote its files.
    record["weights"] = WEIGHTS.with_suffix(".safetensors").name
    record["benchmark_overrides"] = ["model=wsol_synthetic_vit"]
    record["benchmark_command"] = "wsol-bench model=wsol_synthetic_vit"
    record["recipe_wall_clock_minutes"] = round(minutes, 1)
    record["command"] = "python scripts/train_synthetic.py"
    WEIGHTS.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"installed {WEIGHTS.with_suffix('.safetensors')} and its .json")


if __name__ == "__main__":
    main()
