"""The training loop: AdamW, linear warm-up then cosine decay, optional mixed precision,
validation accuracy every epoch, and an atomic checkpoint after every epoch from which a run
resumes exactly where it stopped (same weights as an uninterrupted run)."""

from __future__ import annotations

import io
import logging
import math
import random
import time
from collections import Counter
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from wsol_bench.errors import InputFileError, SettingError
from wsol_bench.files import atomic_write_bytes
from wsol_bench.models import disable_fused_attention
from wsol_bench.train.data import LabelledBatch, augment_batch

log = logging.getLogger("wsol_bench.train.recipe")
CHECKPOINT = "checkpoint.pt"
CHECKPOINT_FORMAT = 1
CHECKPOINT_KEYS = ("fingerprint", "state", "model", "optimizer", "scheduler", "scaler", "rng", "order_rng",
                   "augment_rng")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


@dataclass(frozen=True)
class Recipe:
    """Optimisation settings (the `train` config group minus the data settings)."""

    epochs: int
    batch_size: int
    lr: float
    weight_decay: float = 0.05
    min_lr: float = 0.0             # floor of the cosine decay
    warmup_epochs: float = 0.5      # linear warm-up length, in epochs (fractions allowed)
    label_smoothing: float = 0.1
    grad_clip: float | None = 1.0   # max global gradient norm; null: no clipping
    augment: str = "none"           # batch augmentation (none, hflip, dihedral) or timm (per image)
    precision: str = "auto"         # auto: bf16 autocast on CUDA, fp32 on CPU; bf16 on CPU too
    # Attention kernel while training: True fused (scaled_dot_product_attention), False the
    # explicit softmax(q k^T) v, None timm's default. Unfused is the faster one under CPU bf16
    # autocast (the fused CPU kernel's backward dominates a small ViT's step). Evaluation always
    # runs unfused in fp32, as the benchmark does.
    fused_attention: bool | None = None
    # The square side the train images are downsampled to: one for every epoch, or a list with
    # one per epoch (progressive resizing); null trains at the input size. Validation is always
    # at the input size.
    epoch_sizes: int | tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise SettingError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0 or self.min_lr < 0 or self.warmup_epochs < 0 or self.weight_decay < 0:
            raise SettingError("train.lr must be > 0, and train.min_lr, train.warmup_epochs and "
                               "train.weight_decay >= 0")
        if self.epoch_sizes is not None:
            given = self.epoch_sizes
            sizes = (int(given),) * int(self.epochs) if isinstance(given, int) else tuple(int(v) for v in given)
            if len(sizes) != int(self.epochs) or min(sizes) < 1:
                raise SettingError(f"train.epoch_sizes needs one positive size, or a list with one per epoch "
                                   f"({self.epochs}), got {given}")
            object.__setattr__(self, "epoch_sizes", sizes)
        if self.precision not in PRECISIONS:
            raise SettingError(f"unknown train.precision={self.precision!r}; valid: {', '.join(PRECISIONS)}")


def warmup_cosine(total_steps: int, warmup_steps: int, min_ratio: float) -> Callable[[int], float]:
    """LR factor at optimizer step `s`: (s+1)/warmup during warm-up, then a cosine from 1 down to
    `min_ratio` at the last step."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return factor


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices only: biases, norms, position embeddings and class tokens
    (timm's `no_weight_decay`) are not decayed."""
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name in skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of `precision` on `device` (None: plain fp32)."""
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    if precision == "fp32":
        return None
    if precision == "bf16":  # CPU autocast supports bf16 (fast with AVX512-BF16 or AMX)
        return torch.bfloat16
    if device.type != "cuda":
        raise SettingError(f"train.precision={precision} needs device=cuda; fp16 autocast is CUDA only "
                           "(use train.precision=bf16, auto or fp32)")
    return torch.float16


def rng_states() -> dict[str, Any]:
    """Every global random state a training step may draw from."""
    np_state = np.random.get_state()
    states = {"torch": torch.get_rng_state(), "python": random.getstate(),
              "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]]}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    """Restore what `rng_states` saved."""
    torch.set_rng_state(states["torch"])
    version, keys, internal = states["python"]
    random.setstate((version, tuple(keys), internal))
    kind, keys, *rest = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    if "cuda" in states and torch.cuda.is_available() and len(states["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(states["cuda"])


def save_atomic(payload: dict[str, Any], path: Path) -> None:
    """torch.save to a temporary file in the same folder, flushed to disk, then renamed over
    `path`: a run killed mid-write leaves the previous checkpoint intact."""
    buffer = io.BytesIO()  # in memory first: a full disk is then the OSError naming the file and size
    torch.save(payload, buffer)
    atomic_write_bytes(path, buffer.getvalue(), durable=True)


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable[LabelledBatch], device: torch.device,
             progress: bool = False, total: int | None = None) -> tuple[int, int, int]:
    """(correct, counted, skipped) top-1 over `batches`, in fp32 and with fused attention off:
    the same numerical path as the benchmark's `load_model`, so the accuracy reproduces there."""
    was_training = model.training
    fused = {m: m.fused_attn for m in model.modules() if hasattr(m, "fused_attn")}
    disable_fused_attention(model)
    model.eval()
    correct = counted = skipped = 0
    try:
        for batch in tqdm(batches, total=total, desc="val", disable=not progress, leave=False):
            skipped += len(batch.skipped)
            if len(batch.labels) == 0:
                continue
            logits = model(batch.images.to(device, non_blocking=True))
            correct += int((logits.argmax(1).cpu() == batch.labels.cpu()).sum())
            counted += len(batch.labels)
    finally:
        for m, value in fused.items():
            m.fused_attn = value
        model.train(was_training)
    return correct, counted, skipped


@dataclass
class TrainState:
    """Progress that a checkpoint carries besides the weights and optimiser."""

    epoch: int = 0                   # completed epochs
    step: int = 0                    # completed optimiser steps
    train_seconds: float = 0.0       # time in training steps only (no validation, no decoding)
    images_seen: int = 0
    best_val_acc: float = -1.0
    best_epoch: int = -1
    history: list[dict[str, Any]] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # image id -> reason, train items skipped


class Trainer:
    """Owns model, optimiser, schedule and the random streams of data order and augmentation."""

    def __init__(self, model: nn.Module, recipe: Recipe, steps_per_epoch: int, device: torch.device,
                 num_classes: int, seed: int) -> None:
        self.model, self.recipe, self.device = model.to(device), recipe, device
        self.num_classes = num_classes
        self.steps_per_epoch = steps_per_epoch
        self.amp_dtype = autocast_dtype(recipe.precision, device)
        self.optimizer = torch.optim.AdamW(param_groups(model, recipe.weight_decay), lr=recipe.lr)
        total = steps_per_epoch * recipe.epochs
        warmup = round(recipe.warmup_epochs * steps_per_epoch)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, warmup_cosine(total, warmup, recipe.min_lr / recipe.lr))
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        # Two streams, so the data order never depends on how many augmentation draws happened.
        self.order_rng = torch.Generator().manual_seed(seed)
        self.augment_rng = torch.Generator().manual_seed(seed + 1)
        self.state = TrainState()

    # ------------------------------------------------------------ checkpoints
    def checkpoint(self, fingerprint: dict[str, Any]) -> dict[str, Any]:
        """Everything needed to continue exactly: weights, optimiser, schedule, scaler, RNGs."""
        return {"format": CHECKPOINT_FORMAT, "fingerprint": fingerprint, "state": vars(self.state),
                "model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(), "rng": rng_states(),
                "order_rng": self.order_rng.get_state(), "augment_rng": self.augment_rng.get_state()}

    def restore(self, payload: dict[str, Any]) -> None:
        """Continue from a `checkpoint` payload."""
        self.model.load_state_dict(payload["model"])
        self.optimizer.load_state_dict(payload["optimizer"])
        self.scheduler.load_state_dict(payload["scheduler"])
        self.scaler.load_state_dict(payload["scaler"])
        set_rng_states(payload["rng"])
        self.order_rng.set_state(payload["order_rng"])
        self.augment_rng.set_state(payload["augment_rng"])
        self.state = TrainState(**payload["state"])

    # ------------------------------------------------------------ one epoch
    @property
    def epoch_size(self) -> int | None:
        """The square side the next epoch trains at (train.epoch_sizes); None: the data's own."""
        sizes = self.recipe.epoch_sizes
        return sizes[self.state.epoch] if sizes and self.state.epoch < len(sizes) else None

    def train_epoch(self, batches: Iterable[LabelledBatch], progress: bool = False) -> dict[str, Any]:
        """One pass over `batches` (drawn at `epoch_size`); returns the epoch's mean loss,
        images, time and skips."""
        model, opt, recipe = self.model, self.optimizer, self.recipe
        model.train()
        size = self.epoch_size
        # The loss stays on the device and is read every few steps: a read per step would
        # stall a GPU on every tiny batch.
        loss_sum, images, skipped = torch.zeros((), device=self.device), 0, Counter()
        desc = f"epoch {self.state.epoch + 1}/{recipe.epochs}" + (f" at {size}px" if size else "")
        bar = tqdm(total=self.steps_per_epoch, desc=desc,
                   disable=not progress, unit="step")
        steps, start = 0, time.perf_counter()
        for batch in batches:
            for s in batch.skipped:
                skipped[s.reason] += 1
                self.state.skipped[s.image_id] = s.reason
            if len(batch.labels) == 0:
                continue
            self._check_labels(batch.labels)
            labels = batch.labels.to(self.device, non_blocking=True)
            x = batch.images.to(self.device, non_blocking=True)
            if recipe.augment != "timm":
                x = augment_batch(recipe.augment, x, self.augment_rng)
            amp = (torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype is not None
                   else nullcontext())
            with amp:
                loss = F.cross_entropy(model(x), labels, label_smoothing=recipe.label_smoothing)
            opt.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            if recipe.grad_clip is not None:
                self.scaler.unscale_(opt)
                nn.utils.clip_grad_norm_(model.parameters(), recipe.grad_clip)
            self.scaler.step(opt)
            self.scaler.update()
            self.scheduler.step()
            self.state.step += 1
            steps += 1
            loss_sum += loss.detach().float()
            images += len(labels)
            if steps % 20 == 0 or steps == self.steps_per_epoch:
                mean_loss = self._read_loss(loss_sum, steps)
                rate = images / (time.perf_counter() - start)
                bar.set_postfix(loss=f"{mean_loss:.4f}", img_s=f"{rate:.1f}",
                                lr=f"{self.scheduler.get_last_lr()[0]:.2e}", refresh=False)
            bar.update(1)
        mean_loss = self._read_loss(loss_sum, max(1, steps))  # also waits for the device to finish
        seconds = time.perf_counter() - start
        bar.close()
        return {"train_loss": mean_loss, "images": images, "train_seconds": seconds, "skipped": dict(skipped),
                "size": size}

    def _read_loss(self, loss_sum: torch.Tensor, steps: int) -> float:
        mean = float(loss_sum) / steps
        if not math.isfinite(mean):
            raise SettingError(f"training loss became {mean} by step {self.state.step}; lower train.lr "
                               "or use train.precision=fp32")
        return mean

    def _check_labels(self, labels: torch.Tensor) -> None:
        bad = labels[(labels < 0) | (labels >= self.num_classes)]
        if len(bad):
            raise InputFileError(f"training label {int(bad[0])} is outside 0..{self.num_classes - 1} (the "
                                 "dataset's num_classes); check the dataset's labels and dataset.name")

    def finish_epoch(self, stats: dict[str, Any], correct: int, counted: int,
                     val_skipped: int) -> dict[str, Any]:
        """Record an epoch's results in the state (history, best accuracy, time)."""
        acc = correct / counted if counted else float("nan")
        seconds = stats["train_seconds"]
        s = self.state
        s.epoch += 1
        s.train_seconds += seconds
        s.images_seen += stats["images"]
        row = {"epoch": s.epoch, "step": s.step, "train_loss": stats["train_loss"], "val_acc": acc,
               "val_correct": correct, "val_images": counted, "val_skipped": val_skipped,
               "train_images": stats["images"], "train_skipped": stats["skipped"],
               "images_per_second": stats["images"] / seconds if seconds else None,
               "train_size": stats.get("size"),
               **({"val_acc_at_train_size": stats["val_acc_at_train_size"]}
                  if "val_acc_at_train_size" in stats else {}),
               "lr": self.scheduler.get_last_lr()[0]}
        s.history.append(row)
        if acc > s.best_val_acc:
            s.best_val_acc, s.best_epoch = acc, s.epoch
        return row
