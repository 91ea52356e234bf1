"""Train the shipped synthetic ViT (`wsol_synthetic_vit`) from scratch with its seeded recipe,
the `train=synthetic` then `train=synthetic_phase2` presets of `wsol-bench-train`, and install
the result as the package's shipped weights.

    python scripts/train_synthetic.py                       # into results/train_synthetic, then install
    python scripts/train_synthetic.py --no-install          # train only
    python scripts/train_synthetic.py -- device=cuda        # overrides after -- go to both phases

Both phases train at the model's own 224 px on the same 20,000 rendered train images (one image
cache in <out-dir>/cache): phase 1 for 12 epochs from scratch, phase 2 for 10 more from phase 1's
weights with a new warm-up and cosine decay. A rerun with the same out-dir resumes where it
stopped. The installed JSON is phase 2's `model.json` record with
phase 1's record under "previous_phase" and the wall-clock time of the whole recipe.
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


def run_phase(preset: str, out: Path, cache: Path, overrides: list[str]) -> dict:
    """One `wsol-bench-train` run (seed 0); returns its model.json record."""
    command = [sys.executable, "-m", "wsol_bench.cli.train", f"train={preset}", "seed=0", f"out_dir={out}",
               f"cache_dir={cache}", f"hydra.run.dir={out / 'hydra'}", *overrides]
    print("running:", " ".join(command), flush=True)
    subprocess.run(command, check=True)
    return json.loads((out / "model.json").read_text())


def main() -> None:
    """Run both phases, then copy the weights and the record into wsol_bench/weights/."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", type=Path, default=ROOT / "results" / "train_synthetic")
    parser.add_argument("--no-install", action="store_true", help="leave the shipped weights unchanged")
    parser.add_argument("overrides", nargs="*", help="extra wsol-bench-train overrides (after --)")
    args = parser.parse_args()
    out = args.out_dir.resolve()
    start = time.perf_counter()
    first = run_phase("synthetic", out / "phase1", out / "cache", args.overrides)
    record = run_phase("synthetic_phase2", out / "phase2", out / "cache",
                       [f"model.checkpoint={out / 'phase1' / 'model.safetensors'}", *args.overrides])
    minutes = (time.perf_counter() - start) / 60
    print(f"final val accuracy {record['final_val_acc']:.4f}; recipe wall clock {minutes:.1f} min")
    if not args.no_install:
        install(out, first, record, minutes)


def install(out: Path, first: dict, record: dict, minutes: float) -> None:
    """Copy phase 2's weights into the package and write the combined record beside them."""
    shutil.copyfile(out / "phase2" / "model.safetensors", WEIGHTS.with_suffix(".safetensors"))
    # The shipped record names the packaged file, not where this run wrote its files.
    for phase in (first, record):
        phase["weights"] = WEIGHTS.with_suffix(".safetensors").name
        phase["benchmark_overrides"] = ["model=wsol_synthetic_vit"]
        phase["benchmark_command"] = "wsol-bench model=wsol_synthetic_vit"
    record["recipe"]["model"]["checkpoint"] = "phase 1's model.safetensors"
    record["previous_phase"] = first
    record["recipe_wall_clock_minutes"] = round(minutes, 1)
    record["command"] = "python scripts/train_synthetic.py"
    WEIGHTS.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"installed {WEIGHTS.with_suffix('.safetensors')} and its .json")


if __name__ == "__main__":
    main()
