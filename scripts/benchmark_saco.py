"""SaCo throughput and agreement: the paper's procedure image by image against the batched engine.

The reference follows Algorithm 1 of Wu et al. (CVPR 2024) literally: for each image one clean
pass, then one pass per subset, one image per forward pass (K + 1 = 11 passes per image). The
batched engine reuses the clean logits of the explanation pass and stacks the K perturbed
inputs of every image into chunks. Both score AG-CAM maps of synthetic val images (and random
maps, the chance level) on the shipped model and must give the same output drops.

Usage: python scripts/benchmark_saco.py [N images, default 32] [--batch-size N] [--device cpu]
           [--model wsol_synthetic_vit] [--num-subsets 10] [--grouping pixel|patch]
"""

from __future__ import annotations

import argparse
from functools import partial

import torch
from torch import nn
from torch.nn.functional import avg_pool2d

from wsol_bench.datasets.synthetic import synthetic_model_inputs
from wsol_bench.environment import timed
from wsol_bench.methods import get_explainer
from wsol_bench.metrics.faithfulness import default_batch_size
from wsol_bench.metrics.saco import SacoSettings, model_patch_size, score_saco_batch
from wsol_bench.models import fused_attention, load_model, pretrained_file
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
            units = heat if patch is None else avg_pool2d(heat[None, None], patch)[0, 0]
            order = torch.sort(units.flatten(), descending=True, stable=True).indices
            fill = image.mean((1, 2))[:, None]
            drops = []
            for i in range(k):
                mask = torch.zeros(order.numel(), dtype=torch.bool)
                mask[order[order.numel() * i // k:order.numel() * (i + 1) // k]] = True
                mask = mask.view(units.shape)
                if patch is not None:
                    mask = mask.repeat_interleave(patch, 0).repeat_interleave(patch, 1)
                perturbed = image.clone()
                perturbed[:, mask] = fill
                drops.append(clean[label] - model(perturbed[None]).double().softmax(1)[0, label])
            rows.append(torch.stack(drops))
    return torch.stack(rows).cpu()


def batched(model: nn.Module, images: torch.Tensor, heatmaps: torch.Tensor, clean_logits: torch.Tensor,
            settings: SacoSettings) -> dict[str, torch.Tensor]:
    """The engine on calls of IMAGES_PER_CALL images, with the explanation pass's clean logits."""
    parts = [score_saco_batch(model, images[s:s + IMAGES_PER_CALL], heatmaps[s:s + IMAGES_PER_CALL],
                              settings=settings, clean_logits=clean_logits[s:s + IMAGES_PER_CALL])
             for s in range(0, len(images), IMAGES_PER_CALL)]
    return {key: torch.cat([p[key] for p in parts]) for key in ("saco", "drops", "degenerate")}



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("images", type=int, nargs="?", default=32)
    parser.add_argument("--batch-size", type=int, default=None,
                        help="perturbed images per forward pass (default: the engine's default for the device)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default="wsol_synthetic_vit")
    parser.add_argument("--num-subsets", type=int, default=10)
    parser.add_argument("--grouping", choices=("pixel", "patch"), default="pixel")
    args = parser.parse_args()
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
    k, n = args.num_subsets, len(images)
    print(f"torch {torch.__version__}, device {args.device}, threads {torch.get_num_threads()}, model {args.model}, "
          f"{n} images, K={k}, grouping {args.grouping}, baseline: per-channel image mean")

    for method in ("agcam", "random"):
        heatmaps, clean_logits = explain(model, method, images, labels)
        batched(model, images[:2], heatmaps[:2], clean_logits[:2], settings)  # warm-up of both paths
        reference_drops(model, images[:1], heatmaps[:1], k, patch)
        ref, ref_s = timed(partial(reference_drops, model, images, heatmaps, k, patch), device)
        fast, fast_s = timed(partial(batched, model, images, heatmaps, clean_logits, settings), device)
        valid = ~fast["degenerate"]
        diff = (ref[valid] - fast["drops"][valid]).abs().max().item() if valid.any() else 0.0
        print(f"\n{method} maps: mean SaCo {fast['saco'][valid].mean():+.3f} (sd {fast['saco'][valid].std():.3f}), "
              f"{int((~valid).sum())} degenerate")
        print(f"  reference (batch 1, {k + 1} passes/image)     {n / ref_s:8.2f} img/s")
        print(f"  batched   (chunks of {chunk:3d}, {k} passes/image) {n / fast_s:8.2f} img/s"
              f"   ({ref_s / fast_s:.1f}x the reference)")
        print(f"  max |drop reference - batched|           {diff:.2e}")
        assert diff < 1e-4, f"batched drops differ from the reference by {diff:.2e}"


if __name__ == "__main__":
    main()
