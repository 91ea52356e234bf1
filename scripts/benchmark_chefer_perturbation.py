"""Chefer et al.'s positive/negative perturbation test: the published loop against the batched
engine, in images per second, on the shipped model.

The published procedure (pertubation_eval_from_hdf5.py of the authors' repository) is run as
written, once per test as the script is run once per --neg, with one image per loader batch:
per image a clean pass, then per step torch.topk of the map, the chosen pixels set to 0 in the
[0, 1] image, normalisation and one forward pass (20 passes per image for both tests). The
batched engine reuses the clean logits of the explanation pass and sends the distinct perturbed
inputs (18 per image) through the model in chunks. Both use the fused attention kernel, so the
ratio measures everything but the kernel choice, and both must give the same curves.

The two are timed in alternation on blocks of `--block` images (which one goes first alternates
too), `--rounds` times over the images in one process, so a load that comes and goes on a
shared machine hits both alike; images/s are totals over all blocks, and the ratio of every
block is listed. The model alone is timed in the same blocks, at batch 1 and at the engine's
chunk size: the published loop cannot be faster than 20 batch-1 passes per image, nor the
engine than its passes at the chunk size, so their ratio bounds what batching can gain.

Usage: python scripts/benchmark_chefer_perturbation.py [N images, default 16] [--rounds 3]
           [--block 8] [--batch-size B] [--script-batch B] [--model wsol_synthetic_vit]
           [--device cpu] [--threads T]
"""

from __future__ import annotations

import argparse
import os

import numpy as np
import torch
from torch import nn

from wsol_bench.datasets import EvalTransform, build_dataset
from wsol_bench.environment import alternate_timings, speed_lines
from wsol_bench.methods import get_explainer
from wsol_bench.metrics.chefer_perturbation import (
    CheferSettings,
    RemovalPlan,
    pixel_counts,
    score_chefer_batch,
)
from wsol_bench.metrics.faithfulness import default_batch_size
from wsol_bench.models import data_config, forward_alone, fused_attention, load_model, pretrained_file
from wsol_bench.regions.heatmaps import explained_heatmaps

IMAGES_PER_CALL = 32  # images per engine call, as a data loader would hand them over
PUBLISHED_STEPS = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
TESTS = ("positive", "negative")


def raw_images(model: nn.Module, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`count` synthetic val images resized to the model input, in [0, 1] (what the script's
    hdf5 file holds), and their labels."""
    size = data_config(model).input_size[1:]
    dataset = build_dataset("synthetic", split="val", num_images=count,
                            transform=EvalTransform(size, (0.0,) * 3, (1.0,) * 3))
    samples = [dataset[i] for i in range(count)]
    return torch.stack([s.image for s in samples]), torch.tensor([s.label for s in samples])


def normalize(tensor: torch.Tensor, mean, std) -> torch.Tensor:
    """In place, as the published scripts normalise."""
    mean = torch.as_tensor(mean, dtype=tensor.dtype, device=tensor.device)
    std = torch.as_tensor(std, dtype=tensor.dtype, device=tensor.device)
    return tensor.sub_(mean[None, :, None, None]).div_(std[None, :, None, None])


@torch.inference_mode()
def published_loop(model: nn.Module, raw: torch.Tensor, vis: torch.Tensor, labels: torch.Tensor, neg: bool,
                   loader_batch: int) -> tuple[np.ndarray, np.ndarray]:
    """One run of the published script: 0/1 clean correct [images] and correct [images, steps]
    of one test."""
    dc = data_config(model)
    base_size = raw.shape[2] * raw.shape[3]
    clean, hits = [], []
    for s in range(0, len(raw), loader_batch):
        data, vis_b, target = raw[s:s + loader_batch], vis[s:s + loader_batch], labels[s:s + loader_batch]
        pred = model(normalize(data.clone(), dc.mean, dc.std))  # the script's clean pass (model accuracy)
        clean += (pred.max(1).indices == target).tolist()
        if neg:
            vis_b = -vis_b
        vis_b = vis_b.reshape(len(data), -1)
        batch_hits = []
        for step in PUBLISHED_STEPS:
            _, idx = torch.topk(vis_b, int(base_size * step), dim=-1)
            idx = idx.unsqueeze(1).repeat(1, data.shape[1], 1)
            perturbed = data.clone().reshape(len(data), data.shape[1], -1).scatter_(-1, idx, 0)
            out = model(normalize(perturbed.reshape(*data.shape), dc.mean, dc.std))
            batch_hits.append((out.max(1).indices == target).tolist())
        hits += np.array(batch_hits).T.tolist()
    return np.array(clean, dtype=float), np.array(hits, dtype=float)


def run_published(model: nn.Module, raw, vis, labels, loader_batch: int) -> dict[str, np.ndarray]:
    """Both tests, one script run each; `clean_correct` from the first run's clean passes."""
    with fused_attention(model):
        runs = {test: published_loop(model, raw, vis, labels, test == "negative", loader_batch) for test in TESTS}
    return {"clean_correct": runs["positive"][0], **{test: runs[test][1] for test in TESTS}}


def run_batched(model: nn.Module, images, heatmaps, labels, clean_logits, settings) -> dict[str, np.ndarray]:
    """Both tests from the engine, IMAGES_PER_CALL images per call."""
    parts = [score_chefer_batch(model, images[s:s + IMAGES_PER_CALL], heatmaps[s:s + IMAGES_PER_CALL],
                                labels[s:s + IMAGES_PER_CALL], settings, clean_logits[s:s + IMAGES_PER_CALL])
             for s in range(0, len(images), IMAGES_PER_CALL)]
    return {key: torch.cat([p[key] for p in parts]).numpy() for key in (*TESTS, "clean_correct")}


def trapezoid_areas(clean: np.ndarray, curve: np.ndarray) -> np.ndarray:
    """Per image: the trapezoid area of [clean, steps..., 0] over [0, 0.1, ..., 0.9, 1]."""
    y = np.concatenate([clean[:, None], curve, np.zeros((len(curve), 1))], axis=1)
    return np.trapezoid(y, [0.0, *PUBLISHED_STEPS, 1.0], axis=1)


def compare(reference: dict[str, np.ndarray], fast: dict[str, np.ndarray]) -> list[str]:
    """Per test, the differing cells (clean point and steps) and the largest per-image area
    difference between the two; refuses any difference."""
    lines = []
    for test in TESTS:
        cells = int((reference[test] != fast[test]).sum() + (reference["clean_correct"] != fast["clean_correct"]).sum())
        gap = np.abs(trapezoid_areas(reference["clean_correct"], reference[test])
                     - trapezoid_areas(fast["clean_correct"], fast[test])).max()
        lines.append(f"  {test}: mean step accuracy {np.round(fast[test].mean(0), 3).tolist()}; "
                     f"differing cells {cells}, largest per-image |AUC difference| {gap:.1e}")
        assert cells == 0, f"{test} curves differ between the published loop and the engine"
    return lines


def distinct_inputs(heatmaps: torch.Tensor, settings: CheferSettings) -> int:
    """The perturbed inputs the engine passes for these maps (18 per image unless some coincide)."""
    counts = pixel_counts(heatmaps.shape[1] * heatmaps.shape[2], settings.steps)
    return RemovalPlan(heatmaps.flatten(1), counts, settings.tests, clean_pass=False).total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("images", type=int, nargs="?", default=16)
    parser.add_argument("--rounds", type=int, default=3, help="passes over the images")
    parser.add_argument("--block", type=int, default=8, help="images per turn of each contender")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="perturbed images per engine pass (default: the engine's default for the device)")
    parser.add_argument("--script-batch", type=int, default=None,
                        help="also time the published loop at this loader batch (the script's default is 16; "
                             "at most --block)")
    parser.add_argument("--model", default="wsol_synthetic_vit")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads for both (default: torch's); 1 keeps a busy shared machine's "
                             "other processes from stalling the threads of every pass")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_model(args.model, pretrained=pretrained_file(args.model) is not None, device=args.device)
    raw, labels = raw_images(model, args.images)
    raw, labels = raw.to(args.device), labels.to(args.device)
    dc = data_config(model)
    images = normalize(raw.clone(), dc.mean, dc.std)
    heatmaps, _, clean_logits = explained_heatmaps(get_explainer("agcam", model), images, labels)
    chunk = args.batch_size or default_batch_size(torch.device(args.device))
    settings = CheferSettings(batch_size=chunk)
    n, passes = args.images, distinct_inputs(heatmaps, settings) / args.images
    contenders = {
        "reference": lambda i: run_published(model, raw[i], heatmaps[i], labels[i], loader_batch=1),
        "engine": lambda i: run_batched(model, images[i], heatmaps[i], labels[i], clean_logits[i], settings),
        "model_batch_1": lambda i: forward_alone(model, images[i], 1, i.stop - i.start),
        "model_chunk": lambda i: forward_alone(model, images[i], chunk, 2 * chunk),
    }
    if args.script_batch:
        contenders["script"] = lambda i: run_published(model, raw[i], heatmaps[i], labels[i], args.script_batch)
    for run in contenders.values():  # warm-up
        run(slice(0, 2))
    load_before = os.getloadavg()
    seconds, outputs = alternate_timings(contenders, n, args.block, args.rounds, args.device)
    total = {name: sum(values) for name, values in seconds.items()}
    counted = args.rounds * n

    print(f"torch {torch.__version__}, {args.model} on {args.device}, {torch.get_num_threads()} threads, {n} images, "
          f"AG-CAM maps, both tests; {args.rounds} rounds in blocks of {args.block} images, reference and engine "
          f"taking turns; load average {load_before[0]:.2f} before, {os.getloadavg()[0]:.2f} after")
    print(f"  published loop, 1 image per loader batch (20 passes/image)  {counted / total['reference']:8.2f} img/s")
    if args.script_batch:
        print(f"  published loop, loader batch {args.script_batch:<3d}                      "
              f"{counted / total['script']:8.2f} img/s")
    print(f"  batched engine, chunks of {chunk:<3d} ({passes:.2f} passes/image)       "
          f"{counted / total['engine']:8.2f} img/s")
    print("\n".join(speed_lines(seconds, counted, chunk, "published loop", 20, passes)))
    joined = {name: {key: np.concatenate([part[key] for part in outputs[name]]) for key in outputs[name][0]}
              for name in ("reference", "engine", *(("script",) if args.script_batch else ()))}
    for line in compare(joined["reference"], joined["engine"]):
        print(line)
    if args.script_batch:
        assert all(np.array_equal(joined["script"][t], joined["engine"][t]) for t in TESTS), "loader-batch curves differ"


if __name__ == "__main__":
    main()
