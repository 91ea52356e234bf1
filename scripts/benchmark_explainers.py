"""Images per second of every explainer at a fixed batch size, on the shipped model and on a
random ViT-S/16 (timm `vit_small_patch16_224`), with a plain forward as the yardstick.

Usage: python scripts/benchmark_explainers.py [--batch-size 16] [--batches 3] [--device cpu]
"""

from __future__ import annotations

import argparse
import time

import torch

from wsol_bench.methods import available, get_explainer
from wsol_bench.models import load_model, pretrained_file


def images_per_second(fn, images: torch.Tensor, batches: int) -> float:
    """Best-of-`batches` throughput after one warm-up call (noise on shared CPUs only slows)."""
    fn(images)
    best = float("inf")
    for _ in range(batches):
        if images.is_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn(images)
        if images.is_cuda:
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return len(images) / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--batches", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--models", nargs="+", default=["wsol_synthetic_vit", "vit_small_patch16_224"])
    args = parser.parse_args()
    print(f"torch {torch.__version__}, device {args.device}, threads {torch.get_num_threads()}, "
          f"batch {args.batch_size}")
    for name in args.models:
        torch.manual_seed(0)
        model = load_model(name, pretrained=pretrained_file(name) is not None, device=args.device)
        images = torch.randn(args.batch_size, 3, 224, 224, device=args.device)
        with torch.no_grad():
            forward = images_per_second(model, images, args.batches)
        print(f"\n{name}: plain forward {forward:8.1f} img/s")
        for method in available():
            explainer = get_explainer(method, model)
            ips = images_per_second(explainer, images, args.batches)
            print(f"  {method:<24} {ips:8.1f} img/s   ({forward / ips:5.1f}x a forward)")


if __name__ == "__main__":
    main()
