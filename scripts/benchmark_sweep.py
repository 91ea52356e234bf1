"""Seconds to score 100 thresholds (AG-CAM pixel scores with masks, MaxBoxAcc v1/v2 and PxAP)
for N images x M methods of smooth random heatmaps, and the projection to 50,000 images.

Heatmaps are upsampled 14x14 Gaussian noise (what a ViT-B/16 map looks like after
`to_heatmaps`), with one random GT box and a GT mask inside it per image.

Usage: python scripts/benchmark_sweep.py [--images 100] [--methods 7] [--size 224] [--batch 50]
"""

from __future__ import annotations

import argparse
import time

import torch

from wsol_bench.heatmaps import to_heatmaps
from wsol_bench.localization import GroundTruth
from wsol_bench.metrics.wsoleval import BoxAccuracy, PxAP
from wsol_bench.sweep import DEFAULT_THRESHOLDS, SweepResult, sweep_heatmaps


def random_ground_truth(count: int, size: int, generator: torch.Generator) -> tuple[GroundTruth, list[torch.Tensor]]:
    """One box per image covering 20-80% of each side, and a mask of its inner half."""
    boxes = []
    box_masks = torch.zeros(count, size, size, dtype=torch.bool)
    seg = torch.zeros(count, size, size, dtype=torch.bool)
    for i in range(count):
        w, h = (torch.randint(size // 5, 4 * size // 5, (2,), generator=generator)).tolist()
        x0 = int(torch.randint(0, size - w, (1,), generator=generator))
        y0 = int(torch.randint(0, size - h, (1,), generator=generator))
        boxes.append(torch.tensor([[x0, y0, x0 + w - 1, y0 + h - 1]]))
        box_masks[i, y0:y0 + h, x0:x0 + w] = True
        seg[i, y0 + h // 4:y0 + 3 * h // 4, x0 + w // 4:x0 + 3 * w // 4] = True
    valid = torch.ones_like(seg)
    return GroundTruth(box_masks=box_masks, seg_masks=seg, seg_valid=valid, num_boxes=[1] * count), boxes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--methods", type=int, default=7)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=50)
    args = parser.parse_args()
    generator = torch.Generator().manual_seed(0)
    gt, boxes = random_ground_truth(args.images, args.size, generator)
    correct = torch.rand(args.images, generator=generator) > 0.2
    maps = torch.randn(args.methods, args.images, 14, 14, generator=generator)
    heatmaps = [to_heatmaps(m, (args.size, args.size))[0] for m in maps]
    thresholds = DEFAULT_THRESHOLDS
    print(f"{args.methods} methods x {args.images} images, {args.size}x{args.size}, {len(thresholds)} thresholds, "
          f"torch threads {torch.get_num_threads()}")

    timings = {"sweep": 0.0, "box_accuracy": 0.0, "pxap": 0.0}
    components_total = 0
    wall = time.perf_counter()
    for heat in heatmaps:
        box_acc, pxap, results = BoxAccuracy(thresholds), PxAP(thresholds), []
        for start in range(0, args.images, args.batch):
            part = slice(start, start + args.batch)
            batch_gt = GroundTruth(gt.box_masks[part], gt.seg_masks[part], gt.seg_valid[part], gt.num_boxes[part])
            tick = time.perf_counter()
            result, components = sweep_heatmaps(heat[part], batch_gt, thresholds, "agcam")
            results.append(result)
            timings["sweep"] += time.perf_counter() - tick
            tick = time.perf_counter()
            box_acc.update_components(components, boxes[part], correct[part])
            timings["box_accuracy"] += time.perf_counter() - tick
            tick = time.perf_counter()
            pxap.update(heat[part], gt.seg_masks[part], gt.seg_valid[part])
            timings["pxap"] += time.perf_counter() - tick
            components_total += len(components.area)
        SweepResult.concat(results).best_thresholds(correct)
        box_acc.compute()
        pxap.compute()
    seconds = time.perf_counter() - wall

    pairs = args.images * args.methods
    for name, value in timings.items():
        print(f"  {name:<13} {value:7.2f} s  ({1e3 * value / pairs:6.2f} ms per image-method)")
    print(f"total {seconds:.2f} s for {pairs} image-methods ({1e3 * seconds / pairs:.2f} ms each; "
          f"{components_total / pairs / len(thresholds):.1f} components per image and threshold)")
    projection = seconds / args.images * 50_000
    print(f"projection for 50,000 images x {args.methods} methods: {projection / 60:.1f} min "
          f"({projection / args.methods / 60:.1f} min per method)")


if __name__ == "__main__":
    main()
