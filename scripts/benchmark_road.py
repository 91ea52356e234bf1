"""ROAD throughput and agreement: pytorch-grad-cam's ROADCombined, called image by image,
against the batched engine (wsol_bench.metrics.road) on the shipped model.

The reference is the library's own call, one image per call, seeded before each call: per
image it solves 18 sparse systems with scipy and runs 36 forward passes (the clean image
again for every percentile and curve). The engine solves the 18 systems of 32 images at once
and runs 18 perturbed images per image, reusing the logits of the explanation pass. Both
score AG-CAM maps of synthetic val images (target: the label, softmax probability) and must
give the same ROAD numbers.

Usage: python scripts/benchmark_road.py [--images 32] [--reference-images N] [--device cpu]
           [--batch-size N] [--solve-batch-size N] [--threads N]
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from wsol_bench.datasets.synthetic import synthetic_model_inputs
from wsol_bench.environment import timed
from wsol_bench.methods import get_explainer
from wsol_bench.metrics.road import RoadSettings, road_scores
from wsol_bench.models import load_model
from wsol_bench.regions.heatmaps import to_heatmaps

IMAGES_PER_CALL = 32  # images per road_scores call, as a data loader would hand them over
SEED = 0



def reference_road(model: nn.Module, images: torch.Tensor, heatmaps: torch.Tensor,
                   labels: torch.Tensor, percentiles: tuple[float, ...]) -> torch.Tensor:
    """ROADCombined of pytorch-grad-cam, one image per call, torch.manual_seed(SEED) first."""
    from pytorch_grad_cam.metrics.road import ROADCombined
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget

    metric = ROADCombined(percentiles=list(percentiles))
    scores = []
    for image, heat, label in zip(images, heatmaps, labels.tolist()):
        torch.manual_seed(SEED)
        scores.append(float(metric(image[None], heat[None].numpy(), [ClassifierOutputSoftmaxTarget(label)],
                                   model)[0]))
    return torch.tensor(scores, dtype=torch.float64)


def batched_road(model: nn.Module, images: torch.Tensor, heatmaps: torch.Tensor, labels: torch.Tensor,
                 clean_logits: torch.Tensor, settings: RoadSettings) -> dict[str, torch.Tensor]:
    """The engine, IMAGES_PER_CALL images per call, with the explanation pass's logits."""
    parts = []
    for s in range(0, len(images), IMAGES_PER_CALL):
        part = slice(s, s + IMAGES_PER_CALL)
        parts.append(road_scores(model, images[part], heatmaps[part], labels[part], settings,
                                 clean_logits=clean_logits[part]))
    return {key: torch.cat([p[key] for p in parts]) for key in parts[0]}



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--reference-images", type=int, default=None,
                        help="images for the (slow) reference; default: all of --images")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=None, help="perturbed images per forward pass")
    parser.add_argument("--solve-batch-size", type=int, default=None, help="imputation systems solved together")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = False  # strict float32 on CUDA, as the reference on CPU
    torch.backends.cudnn.allow_tf32 = False
    model = load_model("wsol_synthetic_vit", pretrained=True, device=args.device)
    images, labels = synthetic_model_inputs(model, args.images)
    images, labels = images.to(device), labels.to(device)
    explainer = get_explainer("agcam", model)
    maps, logits = [], []
    for s in range(0, len(images), 16):
        explanation = explainer(images[s:s + 16], labels[s:s + 16])
        maps.append(explanation.maps)
        logits.append(explanation.logits)
    heatmaps, degenerate = to_heatmaps(torch.cat(maps), tuple(images.shape[2:]))
    clean_logits = torch.cat(logits)
    settings = RoadSettings(seed=SEED, batch_size=args.batch_size, solve_batch_size=args.solve_batch_size)
    print(f"torch {torch.__version__}, device {args.device}, threads {torch.get_num_threads()}, "
          f"percentiles {list(settings.percentiles)}, noise {settings.noise}, {args.images} images, "
          f"{int(degenerate.sum())} degenerate maps")

    batched_road(model, images[:1], heatmaps[:1], labels[:1], clean_logits[:1], settings)  # warm-up, plan
    fast, fast_s = timed(lambda: batched_road(model, images, heatmaps, labels, clean_logits, settings), device)
    count = args.reference_images or args.images
    ref, ref_s = timed(lambda: reference_road(model, images[:count].cpu(), heatmaps[:count].cpu(),
                                              labels[:count].cpu(), settings.percentiles), torch.device("cpu"))
    passes = len(settings.curves) * len(settings.percentiles)
    print(f"  pytorch-grad-cam ROADCombined, 1 image per call ({2 * passes} passes/image) "
          f"{count / ref_s:8.3f} img/s  ({count} images)")
    print(f"  batched engine ({passes} passes/image)                        "
          f"{args.images / fast_s:8.3f} img/s   ({ref_s / count / (fast_s / args.images):.1f}x the reference)")
    diff = (ref - fast["road_combined"][:count]).abs().max().item()
    print(f"  mean ROADCombined {fast['road_combined'].mean().item():.6f}; max |reference - batched| {diff:.2e}; "
          f"inputs with every pixel removed: {int(fast['all_removed'].sum())}")
    assert diff < 1e-5, f"batched ROAD differs from pytorch-grad-cam by {diff:.2e}"


if __name__ == "__main__":
    main()
