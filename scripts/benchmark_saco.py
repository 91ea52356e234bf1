"""SaCo throughput and agreement: the paper's procedure image by image against the batched engine.

The reference follows Algorithm 1 of Wu et al. (CVPR 2024) literally: for each image one clean
pass, then one pass per subset, one image per forward pass (K + 1 = 11 passes per image). The
batched engine reuses the clean logits of the explanation pass and stacks the K perturbed
inputs of every image into chunks. Both score AG-CAM maps of synthetic val images (and random
maps, the chance level: SaCo near 0) on the shipped model and must give the same output drops.

The two are timed in alternation on blocks of `--block` images (which one goes first alternates
too), `--rounds` times over the images in one process, so a load that comes and goes on a
shared machine hits both alike; images/s are totals over all blocks, and the ratio of every
block is listed. The model alone is timed in the same blocks, at batch 1 and at the engine's
chunk size: the reference cannot be faster than K + 1 batch-1 passes per image, nor the engine
than K passes at the chunk size, so their ratio bounds what batching can gain.

Usage: python scripts/benchmark_saco.py [N images, default 16] [--rounds 3] [--block 8]
           [--batch-size N] [--device cpu] [--model wsol_synthetic_vit] [--num-subsets 10]
           [--grouping pixel|patch] [--methods agcam random] [--threads T]
"""

from __future__ import annotations

import argparse
import os

import torch
from torch import nn
from torch.nn.functional import avg_pool2d

from wsol_bench.datasets.synthetic import synthetic_model_inputs
from wsol_bench.environment import alternate_timings, speed_lines
from wsol_bench.methods import get_explainer
from wsol_bench.metrics.faithfulness import default_batch_size
from wsol_bench.metrics.saco import SacoSettings, model_patch_size, score_saco_batch
from wsol_bench.models import forward_alone, fused_attention, load_model, pretrained_file
from wsol_bench.regions.heatmaps import to_heatmaps

IMAGES_PER_CALL = 32  # images per score_saco_batch call, as a data loader would hand them over


def explain(model: nn.Module, method: str, images: torch.Tensor, labels: torch.Tensor
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Heatmaps at image size and the clean logits of the explanation pass."""
    explainer = get_explainer(method, model)
    maps, logits = [], []
    for s in range(0, len(images), 16):
        explanation = explainer(images[s:s + 16], labels[s:s + 16])
        maps.append(explanation.maps)
        logits.append(explanation.logits)
    heatmaps, _ = to_heatmaps(torch.cat(maps), tuple(images.shape[2:]))
    return heatmaps, torch.cat(logits)


def subset_masks(heat: torch.Tensor, k: int, patch: int | None) -> list[torch.Tensor]:
    """The K subsets of one map as pixel masks, the literal way: a plain stable sort of the
    pixels (or of the patches' mean salience), cut into K equal parts."""
    units = heat if patch is None else avg_pool2d(heat[None, None], patch)[0, 0]
    order = torch.sort(units.flatten(), descending=True, stable=True).indices
    masks = []
    for i in range(k):
        mask = torch.zeros(order.numel(), dtype=torch.bool)
        mask[order[order.numel() * i // k:order.numel() * (i + 1) // k]] = True
        mask = mask.view(units.shape)
        if patch is not None:
            mask = mask.repeat_interleave(patch, 0).repeat_interleave(patch, 1)
        masks.append(mask)
    return masks


@torch.inference_mode()
def reference_drops(model: nn.Module, images: torch.Tensor, heatmaps: torch.Tensor, k: int,
                    patch: int | None) -> torch.Tensor:
    """Output drops [N, K] the literal way: per image a clean pass and K one-image passes, the
    subsets cut from a plain sort, the image's per-channel mean as baseline, the predicted
    class. Fused attention as in the engine, so the ratio measures batching alone."""
    rows = []
    with fused_attention(model):
        for image, heat in zip(images, heatmaps):
            clean = model(image[None]).double().softmax(1)[0]
            label = int(clean.argmax())
            fill = image.mean((1, 2))[:, None]
            drops = []
            for mask in subset_masks(heat, k, patch):
                perturbed = image.clone()
                perturbed[:, mask] = fill
                drops.append(clean[label] - model(perturbed[None]).double().softmax(1)[0, label])
            rows.append(torch.stack(drops))
    return torch.stack(rows).cpu()


def reference_saco(heatmaps: torch.Tensor, drops: torch.Tensor, k: int, patch: int | None) -> torch.Tensor:
    """SaCo [N] from the reference's drops, Algorithm 1's double loop over subset pairs:
    salience s_i = the map summed over subset i; +(s_i - s_j) when d_i >= d_j, else -(s_i - s_j),
    over the sum of |s_i - s_j|; NaN when that sum is 0."""
    scores = []
    for heat, row in zip(heatmaps.cpu(), drops.tolist()):
        saliences = [float(heat[mask].double().sum()) for mask in subset_masks(heat, k, patch)]
        score = total = 0.0
        for i in range(k - 1):
            for j in range(i + 1, k):
                gap = saliences[i] - saliences[j]
                score, total = score + (gap if row[i] >= row[j] else -gap), total + abs(gap)
        scores.append(score / total if total > 0 else float("nan"))
    return torch.tensor(scores, dtype=torch.float64)


def batched(model: nn.Module, images: torch.Tensor, heatmaps: torch.Tensor, clean_logits: torch.Tensor,
            settings: SacoSettings) -> dict[str, torch.Tensor]:
    """The engine on calls of IMAGES_PER_CALL images, with the explanation pass's clean logits."""
    parts = [score_saco_batch(model, images[s:s + IMAGES_PER_CALL], heatmaps[s:s + IMAGES_PER_CALL],
                              settings=settings, clean_logits=clean_logits[s:s + IMAGES_PER_CALL])
             for s in range(0, len(images), IMAGES_PER_CALL)]
    return {key: torch.cat([p[key] for p in parts]) for key in ("saco", "drops", "degenerate")}


def score_method(model: nn.Module, images: torch.Tensor, heatmaps: torch.Tensor, clean_logits: torch.Tensor,
                 settings: SacoSettings, patch: int | None, args: argparse.Namespace) -> None:
    """Time the reference and the engine on one method's maps and print the comparison."""
    k, n, chunk = settings.num_subsets, len(images), settings.batch_size
    contenders = {
        "reference": lambda i: reference_drops(model, images[i], heatmaps[i], k, patch),
        "engine": lambda i: batched(model, images[i], heatmaps[i], clean_logits[i], settings),
        "model_batch_1": lambda i: forward_alone(model, images[i], 1, i.stop - i.start),
        "model_chunk": lambda i: forward_alone(model, images[i], chunk, 2 * chunk),
    }
    for run in contenders.values():  # warm-up
        run(slice(0, 2))
    seconds, outputs = alternate_timings(contenders, n, args.block, args.rounds, args.device)
    total = {name: sum(values) for name, values in seconds.items()}
    counted = args.rounds * n
    ref = torch.cat(outputs["reference"])
    fast = {key: torch.cat([part[key] for part in outputs["engine"]]) for key in outputs["engine"][0]}
    ref_saco = reference_saco(heatmaps, ref, k, patch)
    valid = ~fast["degenerate"]
    drop_gap = (ref[valid] - fast["drops"][valid]).abs().max().item() if valid.any() else 0.0
    saco_gap = (ref_saco[valid] - fast["saco"][valid]).abs().max().item() if valid.any() else 0.0
    print(f"  mean SaCo {fast['saco'][valid].mean():+.3f} (sd {fast['saco'][valid].std():.3f}), "
          f"{int((~valid).sum())} degenerate")
    print(f"  reference (batch 1, {k + 1} passes/image)      {counted / total['reference']:8.2f} img/s")
    print(f"  batched   (chunks of {chunk:<3d}, {k} passes/image) {counted / total['engine']:8.2f} img/s")
    print("\n".join(speed_lines(seconds, counted, chunk, "reference", k + 1, k)))
    print(f"  largest per-image |drop reference - batched| {drop_gap:.2e}, |SaCo reference - batched| {saco_gap:.2e}")
    assert drop_gap < 1e-4, f"batched drops differ from the reference by {drop_gap:.2e}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("images", type=int, nargs="?", default=16)
    parser.add_argument("--rounds", type=int, default=3, help="passes over the images")
    parser.add_argument("--block", type=int, default=8, help="images per turn of each contender")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="perturbed images per forward pass (default: the engine's default for the device)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default="wsol_synthetic_vit")
    parser.add_argument("--num-subsets", type=int, default=10)
    parser.add_argument("--grouping", choices=("pixel", "patch"), default="pixel")
    parser.add_argument("--methods", nargs="+", default=["agcam", "random"])
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads for both (default: torch's); 1 keeps a busy shared machine's "
                             "other processes from stalling the threads of every pass")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.backends.cuda.matmul.allow_tf32 = False  # batch-1 and batched passes agree to float32 precision
    torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(0)
    device = torch.device(args.device)
    model = load_model(args.model, pretrained=pretrained_file(args.model) is not None, device=args.device)
    images, labels = synthetic_model_inputs(model, args.images)
    images, labels = images.to(device), labels.to(device)
    chunk = args.batch_size or default_batch_size(device)
    settings = SacoSettings(num_subsets=args.num_subsets, batch_size=chunk, grouping=args.grouping)
    patch = model_patch_size(model) if args.grouping == "patch" else None
    print(f"torch {torch.__version__}, device {args.device}, threads {torch.get_num_threads()}, model {args.model}, "
          f"{len(images)} images, K={args.num_subsets}, grouping {args.grouping}, baseline: per-channel image mean; "
          f"{args.rounds} rounds in blocks of {args.block} images, reference and engine taking turns; "
          f"load average {os.getloadavg()[0]:.2f}")
    for method in args.methods:
        heatmaps, clean_logits = explain(model, method, images, labels)
        print(f"\n{method} maps:")
        score_method(model, images, heatmaps, clean_logits, settings, patch, args)
    print(f"\nload average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
