"""ROAD throughput and agreement: pytorch-grad-cam's ROADCombined, called image by image,
against the batched engine (wsol_bench.metrics.road) on the shipped model.

The reference is the library's own call, one image per call, seeded before each call: per
image it solves 18 sparse systems with scipy and runs 36 forward passes (the clean image
again for every percentile and curve). The engine solves the 18 systems of 32 images at once
and runs 18 perturbed images per image, reusing the logits of the explanation pass. Both
score AG-CAM maps of synthetic val images (target: the label, softmax probability) and must
give the same ROAD numbers.

The two are timed alternately in one process: the images are split into --rounds rounds, and
each round runs the engine on its images, then the reference on its images (or on its share
of --reference-images), so load from other processes hits both alike. Printed: each round's
images/s, the median of each, the ratio of the medians and the median of the per-round ratios,
the largest per-image difference and the load average before and after.

Usage: python scripts/benchmark_road.py [--images 32] [--rounds 4] [--reference-images N]
           [--device cpu] [--batch-size N] [--solve-batch-size N] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import statistics
from functools import partial

import torch
from torch import nn

from wsol_bench.datasets.synthetic import synthetic_model_inputs
from wsol_bench.environment import timed
from wsol_bench.methods import get_explainer
from wsol_bench.metrics.road import RoadSettings, road_scores
from wsol_bench.models import load_model
from wsol_bench.regions.heatmaps import explained_heatmaps

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


def load_average() -> str:
    """The 1, 5 and 15 minute load averages, or 'n/a' where the system has none."""
    try:
        return ", ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=4, help="alternating rounds of engine and reference")
    parser.add_argument("--reference-images", type=int, default=None,
                        help="images for the (slow) reference, spread over the rounds; default: all of --images")
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
    heatmaps, degenerate, clean_logits = explained_heatmaps(get_explainer("agcam", model), images, labels)
    settings = RoadSettings(seed=SEED, batch_size=args.batch_size, solve_batch_size=args.solve_batch_size)
    print(f"torch {torch.__version__}, device {args.device}, threads {torch.get_num_threads()}, "
          f"percentiles {list(settings.percentiles)}, noise {settings.noise}, {args.images} images, "
          f"{int(degenerate.sum())} degenerate maps")

    print(f"load average before: {load_average()}")
    batched_road(model, images[:1], heatmaps[:1], labels[:1], clean_logits[:1], settings)  # warm-up, plan
    rounds = max(1, min(args.rounds, args.images))
    per_round = -(-args.images // rounds)
    reference_count = min(args.reference_images or args.images, args.images)
    fast_rates, ref_rates, diffs, fast_parts = [], [], [], []
    for r in range(rounds):
        part = slice(r * per_round, min((r + 1) * per_round, args.images))
        n_fast = part.stop - part.start
        if n_fast <= 0:
            break
        fast, fast_s = timed(partial(batched_road, model, images[part], heatmaps[part], labels[part],
                                     clean_logits[part], settings), device)
        fast_parts.append(fast)
        n_ref = min(n_fast, max(1, reference_count * n_fast // args.images))
        ref, ref_s = timed(partial(reference_road, model, images[part][:n_ref].cpu(), heatmaps[part][:n_ref].cpu(),
                                   labels[part][:n_ref].cpu(), settings.percentiles), torch.device("cpu"))
        fast_rates.append(n_fast / fast_s)
        ref_rates.append(n_ref / ref_s)
        diffs.append((ref - fast["road_combined"][:n_ref].cpu()).abs().max().item())
        print(f"  round {r + 1}: engine {fast_rates[-1]:.3f} img/s ({n_fast} images), reference "
              f"{ref_rates[-1]:.3f} img/s ({n_ref} images), ratio {fast_rates[-1] / ref_rates[-1]:.1f}x",
              flush=True)
    fast = {key: torch.cat([p[key] for p in fast_parts]) for key in fast_parts[0]}
    passes = len(settings.curves) * len(settings.percentiles)
    ref_median, fast_median = statistics.median(ref_rates), statistics.median(fast_rates)
    print(f"  pytorch-grad-cam ROADCombined, 1 image per call ({2 * passes} passes/image) "
          f"{ref_median:8.3f} img/s  (median of {len(ref_rates)} rounds)")
    print(f"  batched engine ({passes} passes/image)                        "
          f"{fast_median:8.3f} img/s   ({fast_median / ref_median:.1f}x the reference; median of the "
          f"per-round ratios {statistics.median(f / r for f, r in zip(fast_rates, ref_rates)):.1f}x)")
    diff = max(diffs)
    print(f"  mean ROADCombined {fast['road_combined'].mean().item():.6f}; max |reference - batched| {diff:.2e}; "
          f"inputs with every pixel removed: {int(fast['all_removed'].sum())}")
    print(f"load average after: {load_average()}")
    assert diff < 1e-5, f"batched ROAD differs from pytorch-grad-cam by {diff:.2e}"


if __name__ == "__main__":
    main()
