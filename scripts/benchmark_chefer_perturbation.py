"""Chefer et al.'s positive/negative perturbation test: the published loop against the batched
engine, in images per second, on the shipped model.

The published procedure (pertubation_eval_from_hdf5.py of the authors' repository) is run as
written, once per test as the script is run once per --neg: per loader batch a clean pass, then
per step torch.topk of the map, the chosen pixels set to 0 in the [0, 1] image, normalisation
and one forward pass. It is timed image by image (a loader batch of 1: one image and one
perturbation per pass, 20 passes per image for both tests) and at the script's default loader
batch of 16 images. The batched engine reuses the clean logits of the explanation pass and
sends the 18 perturbed inputs per image through the model in chunks. All three use the fused
attention kernel, so the ratios measure batching; all three must give the same curves.

Usage: python scripts/benchmark_chefer_perturbation.py [N images, default 32] [--batch-size B]
           [--model wsol_synthetic_vit] [--device cpu]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from torch import nn

from wsol_bench.datasets import EvalTransform, build_dataset
from wsol_bench.environment import timed
from wsol_bench.methods import get_explainer
from wsol_bench.metrics.chefer_perturbation import CheferSettings, score_chefer_batch
from wsol_bench.metrics.faithfulness import default_batch_size
from wsol_bench.models import data_config, fused_attention, load_model, pretrained_file
from wsol_bench.regions.heatmaps import to_heatmaps

IMAGES_PER_CALL = 32  # images per engine call, as a data loader would hand them over
PUBLISHED_STEPS = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]


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
                   loader_batch: int) -> np.ndarray:
    """One run of the published script: 0/1 correct [images, steps] of one test."""
    dc = data_config(model)
    base_size = raw.shape[2] * raw.shape[3]
    hits = []
    for s in range(0, len(raw), loader_batch):
        data, vis_b, target = raw[s:s + loader_batch], vis[s:s + loader_batch], labels[s:s + loader_batch]
        model(normalize(data.clone(), dc.mean, dc.std))  # the script's clean pass (model accuracy)
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
    return np.array(hits, dtype=float)


def run_published(model: nn.Module, raw, vis, labels, loader_batch: int) -> dict[str, np.ndarray]:
    """Both tests, one script run each."""
    with fused_attention(model):
        return {test: published_loop(model, raw, vis, labels, test == "negative", loader_batch)
                for test in ("positive", "negative")}


def run_batched(model: nn.Module, images, heatmaps, labels, clean_logits, settings) -> dict[str, np.ndarray]:
    """Both tests from the engine, IMAGES_PER_CALL images per call."""
    parts = [score_chefer_batch(model, images[s:s + IMAGES_PER_CALL], heatmaps[s:s + IMAGES_PER_CALL],
                                labels[s:s + IMAGES_PER_CALL], settings, clean_logits[s:s + IMAGES_PER_CALL])
             for s in range(0, len(images), IMAGES_PER_CALL)]
    return {test: torch.cat([p[test] for p in parts]).numpy() for test in ("positive", "negative")}



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("images", type=int, nargs="?", default=32)
    parser.add_argument("--batch-size", type=int, default=None,
                        help="perturbed images per engine pass (default: the engine's default for the device)")
    parser.add_argument("--model", default="wsol_synthetic_vit")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    model = load_model(args.model, pretrained=pretrained_file(args.model) is not None, device=args.device)
    raw, labels = raw_images(model, args.images)
    raw, labels = raw.to(args.device), labels.to(args.device)
    dc = data_config(model)
    images = normalize(raw.clone(), dc.mean, dc.std)
    explainer = get_explainer("agcam", model)
    maps, logits = [], []
    for s in range(0, len(images), 16):
        explanation = explainer(images[s:s + 16], labels[s:s + 16])
        maps.append(explanation.maps)
        logits.append(explanation.logits)
    heatmaps, _ = to_heatmaps(torch.cat(maps), tuple(images.shape[2:]))
    clean_logits = torch.cat(logits)
    chunk = args.batch_size or default_batch_size(torch.device(args.device))
    settings = CheferSettings(batch_size=chunk)

    run_batched(model, images[:2], heatmaps[:2], labels[:2], clean_logits[:2], settings)  # warm-up
    one, one_s = timed(lambda: run_published(model, raw, heatmaps, labels, loader_batch=1), args.device)
    sixteen, sixteen_s = timed(lambda: run_published(model, raw, heatmaps, labels, loader_batch=16), args.device)
    fast, fast_s = timed(lambda: run_batched(model, images, heatmaps, labels, clean_logits, settings), args.device)
    n = args.images
    print(f"torch {torch.__version__}, {args.model} on {args.device}, {torch.get_num_threads()} threads, "
          f"{n} images, AG-CAM maps, both tests")
    print(f"  published loop, 1 image per pass (20 passes/image)   {n / one_s:8.2f} img/s")
    print(f"  published loop, loader batch 16 (script default)     {n / sixteen_s:8.2f} img/s")
    print(f"  batched engine, chunks of {chunk:3d} (18 inputs/image)    {n / fast_s:8.2f} img/s"
          f"   ({one_s / fast_s:.1f}x image by image, {sixteen_s / fast_s:.1f}x batch 16)")
    for test in ("positive", "negative"):
        same = np.array_equal(one[test], fast[test]) and np.array_equal(sixteen[test], fast[test])
        print(f"  {test}: mean step accuracy {np.round(fast[test].mean(0), 3).tolist()}, "
              f"curves equal across the three: {same}")
        assert same, f"{test} curves differ between the published loop and the engine"


if __name__ == "__main__":
    main()
