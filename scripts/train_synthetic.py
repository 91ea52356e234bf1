"""Train the shipped synthetic ViT (`wsol_synthetic_vit`) from scratch, reproducibly.

Recipe: a timm VisionTransformer with a convolutional stem (four stride-2 3x3 convs,
224 -> 14x14 tokens; width 96, 6 blocks, 3 heads; `wsol_bench.models.conv_stem`), trained on a fixed set of synthetic train images (pre-rendered once, in parallel),
augmented with the 8 flips/rotations of the square (shape classes are invariant to them),
AdamW (lr 5e-4, weight decay 0.05), linear warm-up then cosine decay, label smoothing 0.1,
batch 32, seed 0, at most 4 epochs, stopping after the first epoch with val
accuracy >= 98.5 %. The best epoch on the synthetic val split is saved as safetensors to
`wsol_bench/weights/wsol_synthetic_vit.safetensors` with a JSON beside it recording the recipe,
the val accuracy and the training time.

Usage: python scripts/train_synthetic.py [--render-cache DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import time
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]


def _render(args: tuple[int, str, int]) -> tuple[np.ndarray, int]:
    from wsol_bench.datasets.synthetic import render_scene
    index, split, seed = args
    scene = render_scene(index, seed=seed, split=split)
    return scene.image, scene.label


def render_split(split: str, count: int, seed: int, workers: int, first: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Pre-render images first..first+count-1 of `split` into uint8 [N, 3, 224, 224] and labels [N]."""
    with Pool(workers) as pool:
        out = pool.map(_render, [(i, split, seed) for i in range(first, first + count)], chunksize=64)
    images = torch.from_numpy(np.stack([o[0] for o in out])).permute(0, 3, 1, 2).contiguous()
    labels = torch.tensor([o[1] for o in out], dtype=torch.long)
    return images, labels


def to_input(images_u8: torch.Tensor) -> torch.Tensor:
    """uint8 images -> the model's normalisation (mean 0.5, std 0.5)."""
    return images_u8.float().div_(127.5).sub_(1.0)


def dihedral(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random flip/rotation by multiples of 90 degrees, one per image."""
    ops = torch.randint(0, 8, (len(images),), generator=generator)
    out = images.clone()
    for i, op in enumerate(ops.tolist()):
        img = images[i]
        if op & 4:
            img = img.flip(-1)
        out[i] = torch.rot90(img, op & 3, dims=(-2, -1))
    return out


@torch.no_grad()
def accuracy(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, batch: int = 200) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(images), batch):
        logits = model(to_input(images[i:i + batch]))
        correct += int((logits.argmax(1) == labels[i:i + batch]).sum())
    return correct / len(images)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--train-images", type=int, default=20000)
    parser.add_argument("--val-images", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--first-train-index", type=int, default=0,
                        help="index of the first synthetic train image (a second phase sees new images)")
    parser.add_argument("--init-from", type=Path, default=None,
                        help="start from these weights (safetensors) instead of a random init")
    parser.add_argument("--stop-at", type=float, default=0.985,
                        help="stop after the first epoch whose val accuracy reaches this")
    parser.add_argument("--render-cache", type=Path, default=None,
                        help="folder to keep the rendered images in, so reruns skip rendering")
    parser.add_argument("--out", type=Path,
                        default=ROOT / "wsol_bench" / "weights" / "wsol_synthetic_vit.safetensors")
    args = parser.parse_args()

    from safetensors.torch import save_file
    from wsol_bench.datasets import synthetic

    from wsol_bench.models import SHIPPED_MODELS, build_shipped

    torch.manual_seed(args.seed)
    start = time.time()
    # The cache name carries a hash of the generator's source, so a changed generator never
    # trains on stale images.
    source = Path(synthetic.__file__).read_bytes()
    key = (f"{args.first_train_index}_{args.train_images}_{args.val_images}_"
           f"{hashlib.sha256(source).hexdigest()[:12]}")
    cache = args.render_cache / f"synthetic_{key}.pt" if args.render_cache else None
    if cache is not None and cache.is_file():
        train_x, train_y, val_x, val_y = torch.load(cache, weights_only=True)
    else:
        train_x, train_y = render_split("train", args.train_images, 0, args.workers, args.first_train_index)
        val_x, val_y = render_split("val", args.val_images, 0, args.workers)
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            torch.save((train_x, train_y, val_x, val_y), cache)
    render_s = time.time() - start
    print(f"rendered {len(train_x)} train + {len(val_x)} val images in {render_s:.0f}s", flush=True)

    spec = SHIPPED_MODELS["wsol_synthetic_vit"]
    model = build_shipped("wsol_synthetic_vit")
    if args.init_from is not None:  # a second phase continues from the first phase's weights
        from safetensors.torch import load_file
        model.load_state_dict(load_file(str(args.init_from)))
    decay = [p for n, p in model.named_parameters() if p.ndim > 1 and "pos_embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1 or "pos_embed" in n]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=args.lr)
    steps_per_epoch = len(train_x) // args.batch_size
    total = steps_per_epoch * args.epochs
    warmup = steps_per_epoch // 2

    def lr_at(step: int) -> float:
        if step < warmup:
            return args.lr * (step + 1) / warmup
        return 0.5 * args.lr * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    generator = torch.Generator().manual_seed(args.seed)
    step, best, history = 0, -1.0, []
    train_start = time.time()
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(len(train_x), generator=generator)
        running = 0.0
        for b in range(steps_per_epoch):
            idx = order[b * args.batch_size:(b + 1) * args.batch_size]
            x = to_input(dihedral(train_x[idx], generator))
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step)
            loss = F.cross_entropy(model(x), train_y[idx], label_smoothing=0.1)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            running += loss.item()
            step += 1
            if b % 50 == 0:
                print(f"epoch {epoch} step {b}/{steps_per_epoch} loss {running / (b + 1):.4f} "
                      f"elapsed {time.time() - train_start:.0f}s", flush=True)
        acc = accuracy(model, val_x, val_y)
        history.append({"epoch": epoch, "train_loss": running / steps_per_epoch, "val_acc": acc})
        print(f"epoch {epoch} val acc {acc:.4f}", flush=True)
        if acc > best:
            best = acc
            args.out.parent.mkdir(parents=True, exist_ok=True)
            save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(args.out))
        if acc >= args.stop_at:
            print(f"val accuracy {acc:.4f} >= {args.stop_at}: stopping", flush=True)
            break
    record = {
        "model": "wsol_synthetic_vit", "kwargs": spec["kwargs"],
        "recipe": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                   if k not in ("out", "render_cache")},
        "best_val_acc": best, "val_images": args.val_images, "history": history,
        "render_seconds": round(render_s, 1), "train_seconds": round(time.time() - train_start, 1),
        "torch": torch.__version__, "threads": torch.get_num_threads(),
    }
    previous = args.init_from.with_suffix(".json") if args.init_from is not None else None
    if previous is not None and previous.is_file():
        record["previous_phase"] = json.loads(previous.read_text())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(record, indent=2))
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    sys.exit(main())
