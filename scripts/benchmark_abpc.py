"""ABPC throughput and agreement: the reference procedure against the batched engine.

The reference runs one image, one step, one curve per forward pass (22 passes per image);
the batched engine stacks the 18 perturbed inputs per image into chunks. Both score AG-CAM
maps of synthetic val images and must give the same ABPC.

Usage: python scripts/benchmark_abpc.py [--images 8] [--batch-size N] [--device cpu]
           [--models wsol_synthetic_vit vit_small_patch16_224] [--amp]
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from wsol_bench.datasets.synthetic import synthetic_model_inputs
from wsol_bench.environment import timed
from wsol_bench.methods import get_explainer
from wsol_bench.metrics.faithfulness import (
    FaithfulnessSettings,
    constant_baseline_probs,
    default_batch_size,
    score_batch,
)
from wsol_bench.models import fused_attention, load_model, pretrained_file
from wsol_bench.regions.heatmaps import to_heatmaps

IMAGES_PER_CALL = 32  # images per score_batch call, as a data loader would hand them over
STEPS = 11
FRACTIONS = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]  # the reference's literal list



@torch.inference_mode()
def reference_abpc(model: nn.Module, images: torch.Tensor, heatmaps: torch.Tensor,
                   targets: torch.Tensor) -> torch.Tensor:
    """ABPC the way the published code computes it: for each image, curve and step, one
    forward pass of one image (step 0 and 100 % included, nothing shared), baseline 0. It
    uses the fused attention kernel as the batched engine does, so the ratio measures batching."""
    scores = []
    with fused_attention(model):  # switched once for all passes, not per pass
        for image, heat, target in zip(images, heatmaps, targets.tolist()):
            n = heat.numel()
            morf_order = torch.sort(heat.flatten(), descending=True, stable=True).indices
            areas = []
            for order in (morf_order, morf_order.flip(0)):  # LeRF: the reverse of the MoRF order
                probs = []
                for fraction in FRACTIONS:
                    count = int(n * fraction)  # truncated, as the reference (5017 of 50176 at 0.1)
                    perturbed = image.clone().flatten(1)
                    perturbed[:, order[:count]] = 0.0
                    logits = model(perturbed.view(1, *image.shape))
                    probs.append(logits.float().softmax(1)[0, target].item())
                areas.append(sum(probs) / STEPS)
            scores.append(areas[1] - areas[0])
    return torch.tensor(scores, dtype=torch.float64)


def batched_abpc(model: nn.Module, images: torch.Tensor, heatmaps: torch.Tensor, targets: torch.Tensor,
                 clean_logits: torch.Tensor, settings: FaithfulnessSettings) -> torch.Tensor:
    """ABPC from the batched engine, with the clean logits of the explanation pass and the
    fully removed image's probabilities computed once for the run."""
    full = constant_baseline_probs(model, images.shape[1:], settings)
    parts = []
    for s in range(0, len(images), IMAGES_PER_CALL):
        part = slice(s, s + IMAGES_PER_CALL)
        parts.append(score_batch(model, images[part], heatmaps[part], targets[part], settings,
                                 clean_logits=clean_logits[part], full_removal_probs=full)["abpc"])
    return torch.cat(parts)



def benchmark(name: str, args: argparse.Namespace) -> float:
    """Explain N synthetic images with AG-CAM on model `name`, time both ABPC paths and
    return the largest ABPC difference between them."""
    torch.manual_seed(0)
    model = load_model(name, pretrained=pretrained_file(name) is not None, device=args.device)  # shipped: its weights
    device = torch.device(args.device)
    images, labels = synthetic_model_inputs(model, args.images)
    images, labels = images.to(device), labels.to(device)
    explainer = get_explainer("agcam", model)
    maps, logits = [], []
    for s in range(0, len(images), 16):
        explanation = explainer(images[s:s + 16], labels[s:s + 16])  # docs/protocol.md 5: ground-truth class
        maps.append(explanation.maps)
        logits.append(explanation.logits)
    heatmaps, degenerate = to_heatmaps(torch.cat(maps), tuple(images.shape[2:]))
    clean_logits = torch.cat(logits)
    chunk = args.batch_size or default_batch_size(device)
    settings = FaithfulnessSettings(batch_size=chunk)

    # Warm-up of both batch shapes (kernel selection, allocator), outside the timings.
    with torch.inference_mode():
        model(images[:1])
    batched_abpc(model, images[:4], heatmaps[:4], labels[:4], clean_logits[:4], settings)
    ref, ref_s = timed(lambda: reference_abpc(model, images, heatmaps, labels), device)
    fast, fast_s = timed(lambda: batched_abpc(model, images, heatmaps, labels, clean_logits, settings),
                         device)
    diff = (ref - fast).abs().max().item()
    n = len(images)
    print(f"\n{name}: {n} images, {int(degenerate.sum())} degenerate maps, "
          f"mean ABPC {100 * fast.mean():.2f}%")
    print(f"  reference (batch 1, 22 passes/image)   {n / ref_s:8.2f} img/s")
    print(f"  batched   (chunks of {chunk:3d}, 18/image) {n / fast_s:8.2f} img/s"
          f"   ({ref_s / fast_s:.1f}x the reference)")
    print(f"  max |ABPC reference - batched|        {diff:.2e}")
    if args.amp:
        amp_settings = FaithfulnessSettings(batch_size=chunk, amp=True)
        batched_abpc(model, images[:4], heatmaps[:4], labels[:4], clean_logits[:4], amp_settings)
        amp, amp_s = timed(lambda: batched_abpc(model, images, heatmaps, labels, clean_logits,
                                                amp_settings), device)
        print(f"  batched + autocast                     {n / amp_s:8.2f} img/s   "
              f"max |ABPC - fp32 batched| {(amp - fast).abs().max().item():.2e}")
    return diff


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=None,
                        help="perturbed images per forward pass (default: the engine's default for the device)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--models", nargs="+", default=["wsol_synthetic_vit", "vit_small_patch16_224"])
    parser.add_argument("--amp", action="store_true", help="also time the batched path under autocast")
    parser.add_argument("--allow-tf32", action="store_true",
                        help="keep TF32 on CUDA (faster; the two paths then differ by ~1e-4, unchecked)")
    args = parser.parse_args()
    if not args.allow_tf32:
        # TF32 rounds float32 inputs to 10 mantissa bits, and cuDNN picks convolution algorithms
        # per batch size, so batch-1 and batched passes would no longer agree to float32 precision.
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    print(f"torch {torch.__version__}, device {args.device}, threads {torch.get_num_threads()}, "
          f"steps {STEPS}, baseline 0 (normalised input), TF32 {'on' if args.allow_tf32 else 'off'}")
    diffs = {name: benchmark(name, args) for name in args.models}
    if not args.allow_tf32:
        bad = {name: diff for name, diff in diffs.items() if not diff < 1e-4}
        assert not bad, f"batched ABPC differs from the reference by more than 1e-4: {bad}"


if __name__ == "__main__":
    main()
