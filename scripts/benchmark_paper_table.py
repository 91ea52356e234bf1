"""Time the AG-CAM paper's ImageNet table on the device at hand and project it to the 50,000
images of ImageNet val.

The setting is the paper's: ViT-B/16 (random weights: the timing does not depend on them) at
224x224, the four paper methods (AG-CAM, Attention Rollout, Grad-CAM, Transformer Attribution),
localization on the predicted class's maps, ABPC on the ground-truth class's maps (11 steps,
18 forward images per image and method) and the 100-threshold sweep (wsolevaluation's metrics).
Images come from the synthetic dataset resized to 224x224, so no download is needed.

Each configuration is one real `wsol-bench` run (its own map store, so nothing is read back);
the per-stage seconds come from its run.json. Stages: loading (decoding and resizing),
explaining (per method, both target policies), ABPC (the perturbed passes) and the model-free
scoring kernels (regions at every threshold, records, sweep states). On a GPU the kernels run
in worker processes while the GPU works, so the projected wall time is the larger of the two
streams; on CPU they share the cores, so it is their sum.

Configurations: strict fp32 and the fast mode (TF32 + autocast for the perturbed passes +
torch.compile of them); the fast mode's ABPC and localization are compared with strict fp32.
Then the scoring kernels alone: --rescore-images images are explained once (by default with
the shipped model, whose maps have the 14x14 grid of ViT-B/16 at 224 and are cheap on CPU),
and the scoring pass from the stored maps is timed in the main process and with 1 and 2
scoring workers: the per-core rate and the parallel speed-up behind the sweep projection.

With --fork (CPU only) each run is a process forked from this one after it imported wsol-bench
once, instead of a new Python: the same runs and stage seconds (which never include start-up),
without the several seconds of imports per run; the wall seconds printed then exclude them.

Usage: python scripts/benchmark_paper_table.py [--device cuda] [--images 512] [--batch-size 64]
           [--model vit_base_patch16_224] [--size 224] [--workers 8] [--no-fast] [--out DIR]
           [--rescore-images 256] [--rescore-model wsol_synthetic_vit] [--fork]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

from wsol_bench.cli.child import start_bench
from wsol_bench.environment import available_cores

PAPER_METHODS = ["agcam", "rollout", "gradcam", "transformer_attribution"]
IMAGENET_VAL = 50_000


def run_bench(overrides: list[str], out: Path, store: Path, log: Path, fork: bool = False) -> dict:
    """One wsol-bench run into `out` with its maps in `store` (in a new Python, or with `fork` in
    a child of this process); returns its run.json plus the wall seconds of the process."""
    start = time.perf_counter()
    args = [*overrides, f"store.root={store}", f"hydra.run.dir={out}", "progress=false", "gallery_images=0"]
    if fork:
        code = forked_run(args, log)
    else:
        with log.open("w") as handle:
            code = subprocess.run([sys.executable, "-m", "wsol_bench", *args], stdout=handle,
                                  stderr=subprocess.STDOUT, text=True, check=False).returncode
    if code != 0:
        sys.exit(f"run failed ({code}); see {log}:\n" + log.read_text()[-3000:])
    info = json.loads((out / "run.json").read_text())
    info["wall"] = time.perf_counter() - start
    return info


def forked_run(args: list[str], log: Path) -> int:
    """`wsol-bench args` in a process forked from this one, its output in `log`; its exit code.
    This process has imported wsol-bench (and torch) but never ran a model, so the child
    starts clean but for the imports."""
    _, status = os.waitpid(start_bench(args, log, fork=True), 0)
    return os.waitstatus_to_exitcode(status)


def stage_seconds(info: dict, methods: list[str]) -> dict[str, float]:
    """Seconds per stage of one run (summed over both target policies for explaining)."""
    seconds = info["seconds"]
    stages = {"loading": seconds.get("loading", 0.0)}
    for m in methods:
        stages[f"explain {m}"] = seconds.get(f"explaining/{m}", 0.0)
    stages["ABPC"] = seconds.get("scoring_here/faithfulness", 0.0)
    stages["scoring kernels"] = seconds.get("scoring_kernels", 0.0)
    return stages


def print_stages(title: str, stages: dict[str, float], images: int, device_stream: list[str],
                 workers: int) -> float:
    """Print img/s and the projection per stage; returns the projected wall minutes."""
    print(f"\n{title}")
    print(f"  {'stage':<34}{'seconds':>9}{'img/s':>10}{'50k min':>10}")
    for name, sec in stages.items():
        rate = images / sec if sec > 0 else float("inf")
        print(f"  {name:<34}{sec:>9.2f}{rate:>10.1f}{sec / images * IMAGENET_VAL / 60:>10.1f}")
    per_image = {k: v / images for k, v in stages.items()}
    device = sum(per_image[k] for k in device_stream)
    kernels = per_image["scoring kernels"]
    if workers > 0:  # kernels in `workers` processes beside the device stream
        wall = max(device, kernels / workers) * IMAGENET_VAL / 60
        how = f"max(device stream, kernels / {workers} workers)"
    else:
        wall = (device + kernels) * IMAGENET_VAL / 60
        how = "device stream + kernels, one process"
    print(f"  projected ImageNet val table: {wall:.1f} min ({how})")
    return wall


def compare(strict: Path, fast: Path) -> None:
    """What the fast mode changes: ABPC per method and the localization table."""
    a = pd.read_csv(strict / "faithfulness.csv").set_index(["method", "image_id"])["abpc"]
    b = pd.read_csv(fast / "faithfulness.csv").set_index(["method", "image_id"])["abpc"].reindex(a.index)
    delta = (b - a).groupby(level="method")
    print("\nfast mode vs strict fp32, ABPC (x100 as in the tables)")
    print(f"  {'method':<26}{'mean strict':>12}{'mean fast':>12}{'d mean':>10}{'max |d| img':>13}")
    for m, d in delta:
        print(f"  {m:<26}{100 * a[m].mean():>12.4f}{100 * b[m].mean():>12.4f}{100 * d.mean():>10.4f}"
              f"{100 * d.abs().max():>13.4f}")
    ta, tb = (pd.read_csv(p / "table.csv").set_index("method") for p in (strict, fast))
    cols = [c for c in ("box_pixel_acc", "box_iou", "box_dice") if c in ta]
    diff = (tb[cols] - ta[cols]).abs().max().max()
    print(f"  localization table: largest change {diff:.4f} points ({', '.join(cols)})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--images", type=int, default=None, help="default: 512 on a GPU, 8 on CPU")
    parser.add_argument("--batch-size", type=int, default=None, help="default: 64 on a GPU, 8 on CPU")
    parser.add_argument("--model", default="vit_base_patch16_224")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--workers", type=int, default=None,
                        help="scoring workers of the timed runs; default: cores-1 on a GPU, 0 on CPU")
    parser.add_argument("--no-fast", action="store_true", help="strict fp32 only")
    parser.add_argument("--rescore-images", type=int, default=256,
                        help="images of the scoring-kernel measurement (maps of --rescore-model)")
    parser.add_argument("--rescore-model", default="wsol_synthetic_vit",
                        help="the model whose maps the kernels score (its speed does not matter there)")
    parser.add_argument("--out", default=None, help="keep the run folders here (default: a temporary folder)")
    parser.add_argument("--fork", action="store_true",
                        help="CPU only: fork each run from this process after importing wsol-bench once, "
                             "instead of starting a new Python (the stage seconds are the same)")
    args = parser.parse_args()
    gpu = args.device.startswith("cuda")
    if args.fork and (gpu or os.name != "posix"):
        parser.error("--fork needs --device cpu on a POSIX system (a process that used CUDA cannot fork)")
    if args.fork:
        import wsol_bench.run.runner  # noqa: F401  (imported once here, inherited by every run)
    images = args.images or (512 if gpu else 8)
    batch = args.batch_size or (64 if gpu else 8)
    cores = available_cores()
    workers = args.workers if args.workers is not None else (max(cores - 1, 0) if gpu else 0)
    root = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="paper_table_"))
    root.mkdir(parents=True, exist_ok=True)
    # the synthetic dataset's 6 classes: the head's size does not change the timing
    common = [f"device={args.device}", f"model.name={args.model}", "model.pretrained=false", "++model.kwargs.num_classes=6",
              f"preprocess.input_size=[{args.size},{args.size}]", f"dataset.params.num_images={images}",
              f"method=[{','.join(PAPER_METHODS)}]", "faithfulness=abpc", "sweep=grid", f"batch_size={batch}",
              "store.shard_size=64", f"scoring_workers={workers}"]
    print(f"{args.model} at {args.size}x{args.size} on {args.device}, {images} images, batch {batch}, "
          f"methods {', '.join(PAPER_METHODS)}, ABPC + 100-threshold sweep; {cores} cores, "
          f"{workers} scoring workers; runs in {root}")
    device_stream = ["loading", *[f"explain {m}" for m in PAPER_METHODS], "ABPC"]

    modes = {"strict fp32": ["tf32=false"]}
    if not args.no_fast:
        modes["fast (TF32, autocast, compile)"] = ["tf32=true", "faithfulness.amp=true", "faithfulness.compile=true"]
    folders = {}
    for k, (title, extra) in enumerate(modes.items()):
        out, store = root / f"run{k}", root / f"store{k}"
        info = run_bench([*common, *extra], out, store, root / f"run{k}.log", args.fork)
        print_stages(f"{title}: wall {info['wall']:.1f} s for the run", stage_seconds(info, PAPER_METHODS),
                     images, device_stream, workers)
        folders[title] = (out, store)
    if len(folders) == 2:
        (strict, _), (fast, _) = folders.values()
        compare(strict, fast)

    # The model-free kernels alone, from stored maps (no model pass): one explanation run of
    # --rescore-images images without ABPC, then the scoring pass with 0, 1 and 2 workers.
    rescore_model = args.rescore_model
    rescore = [f"device={args.device}", f"model.name={rescore_model}",
               f"model.pretrained={'true' if rescore_model == 'wsol_synthetic_vit' else 'false'}",
               "++model.kwargs.num_classes=6", f"preprocess.input_size=[{args.size},{args.size}]",
               f"dataset.params.num_images={args.rescore_images}", f"method=[{','.join(PAPER_METHODS)}]",
               "sweep=grid", "batch_size=16", "store.shard_size=64"]
    store = root / "store_rescore"
    run_bench([*rescore, "scoring_workers=0"], root / "rescore_explain", store, root / "rescore_explain.log",
              args.fork)
    passes, kernels = {}, {}
    for w in (0, 1, 2):
        info = run_bench([*rescore, f"scoring_workers={w}"], root / f"rescore{w}", store,
                         root / f"rescore{w}.log", args.fork)
        passes[w], kernels[w] = info["pass_seconds"], info["seconds"].get("scoring_kernels", 0.0)
    count = args.rescore_images * len(PAPER_METHODS)
    per_core = count / kernels[1] if kernels[1] else float("inf")  # one worker: one single-threaded process
    speedup = passes[1] / passes[2] if passes[2] else float("nan")
    print(f"\nscoring kernels from stored maps ({rescore_model}'s maps, {args.rescore_images} images x "
          f"{len(PAPER_METHODS)} methods, 100 thresholds): {per_core:.1f} image-methods/s per core")
    print(f"  scoring pass: {passes[0]:.2f} s in the main process, {passes[1]:.2f} s with 1 worker, "
          f"{passes[2]:.2f} s with 2 workers (2 vs 1: {speedup:.2f}x)")
    for cores_at in sorted({16, cores}):
        minutes = 5 * IMAGENET_VAL / per_core / cores_at / 60 if per_core else 0.0
        print(f"  projected: 100 thresholds x 5 methods x 50,000 images on {cores_at} cores: {minutes:.1f} min "
              "(measured per-core rate, linear scaling)")
    if not args.out:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
