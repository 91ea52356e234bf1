"""Seconds to score 100 thresholds (AG-CAM pixel scores with masks, MaxBoxAcc v1/v2 and PxAP)
for N images x M methods of smooth random heatmaps, and the projection to 50,000 images.
With --boxes opencv (the default, wsolevaluation's exact boxes) the OpenCV contours are their
own stage; with --boxes components MaxBoxAcc reuses the sweep's components.

Heatmaps are upsampled 14x14 Gaussian noise (what a ViT-B/16 map looks like after
`to_heatmaps`), with one random GT box and a GT mask inside it per image.

Usage: python scripts/benchmark_sweep.py [--images 100] [--methods 7] [--size 224] [--batch 50]
                                         [--boxes opencv|components]
"""

from __future__ import annotations

import argparse
import time

import torch

from wsol_bench.metrics.box_accuracy import BoxAccuracy
from wsol_bench.metrics.localization import GroundTruth, localization_scores
from wsol_bench.metrics.pxap import PxAP
from wsol_bench.metrics.sweep import SweepMeans
from wsol_bench.regions.heatmaps import to_heatmaps
from wsol_bench.regions.thresholds import DEFAULT_THRESHOLDS


def random_ground_truth(count: int, size: int, generator: torch.Generator
                        ) -> tuple[GroundTruth, list[torch.Tensor]]:
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
    parser.add_argument("--boxes", choices=("opencv", "components"), default="opencv")
    args = parser.parse_args()
    generator = torch.Generator().manual_seed(0)
    gt, boxes = random_ground_truth(args.images, args.size, generator)
    correct = torch.rand(args.images, generator=generator) > 0.2
    maps = torch.randn(args.methods, args.images, 14, 14, generator=generator)
    heatmaps = [to_heatmaps(m, (args.size, args.size))[0] for m in maps]
    thresholds = DEFAULT_THRESHOLDS
    print(f"{args.methods} methods x {args.images} images, {args.size}x{args.size}, "
          f"{len(thresholds)} thresholds, "
          f"torch threads {torch.get_num_threads()}")

    stages = ("sweep", "contours", "box_accuracy", "pxap")
    wall = {name: 0.0 for name in stages}
    cpu = {name: 0.0 for name in stages}
    components_total = 0

    def timed(name: str, fn, *fn_args):
        """Run fn, adding its wall-clock and process CPU seconds (the CPU is shared: CPU time is
        the steadier figure) to the stage's totals."""
        wall_start, cpu_start = time.perf_counter(), time.process_time()
        out = fn(*fn_args)
        wall[name] += time.perf_counter() - wall_start
        cpu[name] += time.process_time() - cpu_start
        return out

    for heat in heatmaps:
        box_acc, pxap = BoxAccuracy(thresholds, boxes=args.boxes), PxAP(thresholds)
        means = SweepMeans(thresholds, [f"{p}_{m}" for p in ("box", "mask")
                                        for m in ("pixel_acc", "iou", "dice", "precision", "recall")])
        for start in range(0, args.images, args.batch):
            part = slice(start, start + args.batch)
            batch_gt = GroundTruth(gt.box_masks[part], gt.seg_masks[part], gt.seg_valid[part],
                                   gt.num_boxes[part])
            scores, components = timed("sweep", localization_scores, heat[part], batch_gt, thresholds, "agcam")
            timed("sweep", means.update, scores, correct[part])
            if args.boxes == "opencv":
                components = timed("contours", box_acc.regions, heat[part])
            timed("box_accuracy", box_acc.update, components, boxes[part], correct[part])
            timed("pxap", pxap.update, heat[part], gt.seg_masks[part], gt.seg_valid[part])
            components_total += len(components.area)
        means.compute()
        box_acc.compute()
        pxap.compute()

    pairs = args.images * args.methods
    for name in stages:
        print(f"  {name:<13} wall {wall[name]:7.2f} s   cpu {cpu[name]:7.2f} s   "
              f"({1e3 * cpu[name] / pairs:6.2f} ms cpu per image-method)")
    total_wall, total_cpu = sum(wall.values()), sum(cpu.values())
    print(f"total: wall {total_wall:.2f} s, cpu {total_cpu:.2f} s for {pairs} image-methods "
          f"({1e3 * total_cpu / pairs:.2f} ms cpu each); "
          f"{components_total / pairs / len(thresholds):.1f} {args.boxes} regions per image and threshold")
    per_image = total_cpu / args.images
    print(f"projection for 50,000 images x {args.methods} methods: {per_image * 50_000 / 60:.1f} min cpu "
          f"({per_image * 50_000 / args.methods / 60:.1f} min per method)")


if __name__ == "__main__":
    main()
