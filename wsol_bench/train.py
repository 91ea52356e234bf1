"""The `wsol-bench-train` command (Hydra): fine-tune a timm model, or train the shipped
architecture from scratch, on any dataset of the suite, and write weights the benchmark loads
unchanged (`wsol-bench model.name=<name> model.checkpoint=<out_dir>/model.safetensors`).

    wsol-bench-train                                  # train=synthetic: the shipped model's recipe
    wsol-bench-train train=voc_single_class dataset.params.root=/data device=cuda
    wsol-bench-train out_dir=results/train/my_run     # rerun: resumes from its checkpoint
"""

from __future__ import annotations

import logging
import os
import random
import shlex
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import timm
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.utils.data import DataLoader

from wsol_bench.capture import UnsupportedModelError
from wsol_bench.models import (SHIPPED_MODELS, ModelLoadError, architecture_data_config, build_shipped,
                               load_model, read_checkpoint, shipped_weights_path)
from wsol_bench.outputs import environment, write_json
from wsol_bench.train_data import (BATCH_AUGMENTS, SAMPLE_AUGMENTS, CachedBatches, DatasetSpec, LabelledBatch,
                                   ResizeNormalize, TimmTrainTransform, cached_images, collate_labelled)
from wsol_bench.trainer import CHECKPOINT, Recipe, Trainer, evaluate, save_atomic

log = logging.getLogger("wsol_bench.train")
USER_ERRORS = (ModelLoadError, UnsupportedModelError, ValueError, FileNotFoundError, KeyError)
DATA_KEYS = ("train_params", "val_params", "cache", "timm_augment", "reset_head")


def as_dict(node: Any) -> dict[str, Any]:
    """A config node (or None) as a plain, resolved dict."""
    return {} if node is None else dict(OmegaConf.to_container(node, resolve=True))


def preprocessing(cfg: DictConfig) -> dict[str, Any]:
    """Input size, mean, std and interpolation: the architecture's own (as the benchmark reads
    them), with any `preprocess.*` value set in the config taking precedence."""
    if cfg.model.name not in SHIPPED_MODELS and not timm.is_model(cfg.model.name):
        raise ModelLoadError(f"unknown model.name={cfg.model.name!r}; valid: {', '.join(SHIPPED_MODELS)} or any "
                             "timm model name (with an optional pretrained tag)")
    dc = architecture_data_config(cfg.model.name, **as_dict(cfg.model.kwargs))
    pre = cfg.preprocess
    return {"size": [int(s) for s in (pre.input_size or dc.input_size[1:])],
            "mean": list(pre.mean or dc.mean), "std": list(pre.std or dc.std),
            "interpolation": pre.interpolation or dc.interpolation}


def split_spec(cfg: DictConfig, which: str) -> DatasetSpec:
    """The dataset config's parameters with the train group's `<which>_params` on top."""
    return DatasetSpec(cfg.dataset.name, {**as_dict(cfg.dataset.params), **as_dict(cfg.train[f"{which}_params"])})


def build_split(spec: DatasetSpec, which: str, transform=None):
    """Build one split; constructor errors name the settings to fix."""
    try:
        dataset = spec.build(transform)
    except TypeError as exc:
        raise ValueError(f"dataset {spec.name!r} rejects its parameters {spec.params} ({exc}); fix dataset.params "
                         f"or train.{which}_params") from exc
    if not isinstance(getattr(dataset, "num_classes", None), int):
        raise ValueError(f"dataset {spec.name!r} has no class labels (no integer num_classes); the trainer needs a "
                         "classification dataset: choose another dataset.name")
    return dataset


def seed_everything(seed: int) -> None:
    """Seed torch, numpy and Python's `random` (timm's crops draw from the latter)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def check_out_dir(path: Path) -> Path:
    """Create `path` and prove it writable before any work is done."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise ValueError(f"out_dir={path} is not a writable folder ({exc}); pass a writable out_dir=...") from exc
    return path


def build_training_model(mcfg: DictConfig, num_classes: int, reset_head: bool) -> nn.Module:
    """The model to train with a `num_classes` head: weights from model.checkpoint (a head of
    another size is an error unless train.reset_head), a timm pretrained tag (timm gives it a
    new head), the shipped weights (model.pretrained=true with a shipped name) or random."""
    name, kwargs = mcfg.name, as_dict(mcfg.kwargs)
    if kwargs.pop("num_classes", num_classes) != num_classes:
        raise ValueError(f"model.kwargs.num_classes={mcfg.kwargs.num_classes} differs from the dataset's "
                         f"{num_classes} classes; remove it (the head always matches the dataset)")
    checkpoint = mcfg.checkpoint
    if checkpoint is None and name in SHIPPED_MODELS and mcfg.pretrained:
        checkpoint = shipped_weights_path(name)
    if checkpoint is None and mcfg.pretrained:
        return load_model(name, pretrained=True, num_classes=num_classes, **kwargs)
    model = (build_shipped(name, num_classes=num_classes, **kwargs) if name in SHIPPED_MODELS
             else load_model(name, pretrained=False, num_classes=num_classes, **kwargs))
    if checkpoint is not None:
        load_initial_weights(model, checkpoint, num_classes, reset_head)
    return model


def load_initial_weights(model: nn.Module, checkpoint: str | Path, num_classes: int, reset_head: bool) -> None:
    """Load a checkpoint into `model`; with `reset_head` its classifier is left freshly
    initialised (fine-tuning to new classes)."""
    state = read_checkpoint(checkpoint)
    head = {k for k in state if k.split(".")[0] in ("head", "head_dist")}
    head_classes = int(state["head.weight"].shape[0]) if "head.weight" in state else None
    if reset_head:
        state = {k: v for k, v in state.items() if k not in head}
    elif head_classes is not None and head_classes != num_classes:
        raise ModelLoadError(f"model.checkpoint={checkpoint} has a {head_classes}-class head but the dataset has "
                             f"{num_classes} classes; set train.reset_head=true to fine-tune it with a new "
                             f"{num_classes}-class head")
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # tensor shape mismatches
        raise ModelLoadError(f"model.checkpoint={checkpoint} does not fit model.name: {exc}") from exc
    missing = [k for k in missing if not (reset_head and k.split(".")[0] in ("head", "head_dist"))]
    if missing or unexpected:
        raise ModelLoadError(f"model.checkpoint={checkpoint} does not match the model: missing {missing[:5]}, "
                             f"unexpected {list(unexpected)[:5]}")


def prepare_for_training(model: nn.Module) -> nn.Module:
    """Undo the explanation-time settings of `load_model`: trainable weights, fused attention."""
    fused = timm.layers.use_fused_attn()
    for m in model.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = fused
    return model.requires_grad_(True).train()


def fingerprint(cfg: DictConfig, pre: dict[str, Any]) -> dict[str, Any]:
    """The settings that define a run; a resumed run must match them."""
    return {"model": as_dict(cfg.model), "dataset": as_dict(cfg.dataset), "train": as_dict(cfg.train),
            "preprocess": pre, "seed": int(cfg.seed)}


def diff_keys(a: Any, b: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested dicts."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b)) for d in diff_keys(a.get(k), b.get(k), f"{prefix}{k}.")]
    return [] if a == b else [f"{prefix[:-1]}: {b!r} -> {a!r}"]


def recipe_from(cfg: DictConfig) -> Recipe:
    """The optimisation settings of the train group; an unknown key is an error."""
    settings = {k: v for k, v in as_dict(cfg.train).items() if k not in DATA_KEYS}
    known = {f.name for f in fields(Recipe)}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise ValueError(f"unknown train settings {unknown}; valid: {sorted(known | set(DATA_KEYS))}")
    recipe = Recipe(**settings)
    if recipe.augment not in BATCH_AUGMENTS + SAMPLE_AUGMENTS:
        raise ValueError(f"unknown train.augment={recipe.augment!r}; valid: {', '.join(BATCH_AUGMENTS + SAMPLE_AUGMENTS)}")
    if recipe.augment == "timm" and cfg.train.cache:
        raise ValueError("train.augment=timm crops the decoded originals; it needs train.cache=false")
    return recipe


@dataclass
class TrainData:
    """Where batches come from: `train(generator)` yields one shuffled epoch, `val()` the
    validation split in order."""

    train: Callable[[torch.Generator], Iterator[LabelledBatch]]
    steps: int
    val: Callable[[], Iterator[LabelledBatch]]
    val_steps: int
    num_classes: int
    facts: dict[str, Any] = field(default_factory=dict)  # skipped items and decode time, for the record


def make_data(cfg: DictConfig, recipe: Recipe, pre: dict[str, Any], device: torch.device, workers: int) -> TrainData:
    """Train and val batches from the dataset config: from the image cache (train.cache=true)
    or streamed through DataLoader workers."""
    size, mean, std, interp = tuple(pre["size"]), pre["mean"], pre["std"], pre["interpolation"]
    train_spec, val_spec = split_spec(cfg, "train"), split_spec(cfg, "val")
    train_ds, val_ds = build_split(train_spec, "train"), build_split(val_spec, "val")
    if train_ds.num_classes != val_ds.num_classes:
        raise ValueError(f"train split has {train_ds.num_classes} classes but val split {val_ds.num_classes}; "
                         "check train.train_params / train.val_params")
    facts: dict[str, Any] = {
        "train_dataset": {"name": train_spec.name, "params": train_spec.params, "images": len(train_ds)},
        "val_dataset": {"name": val_spec.name, "params": val_spec.params, "images": len(val_ds)},
        # items the dataset left out while indexing (e.g. VOC images with several classes)
        "index_skipped": {w: len(getattr(d, "skipped", None) or []) for w, d in (("train", train_ds), ("val", val_ds))},
    }
    if cfg.train.cache:
        cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else None
        caches = [cached_images(s, size, interp, cache_dir=cache_dir, workers=workers, progress=cfg.progress)
                  for s in (train_spec, val_spec)]
        facts["decode_seconds"] = round(sum(c.seconds for c in caches), 1)
        facts["cache_skipped"] = {w: len(c.skipped) for w, c in zip(("train", "val"), caches)}
        train = CachedBatches(caches[0], recipe.batch_size, mean, std, device, shuffle=True)
        val = CachedBatches(caches[1], recipe.batch_size, mean, std, device, shuffle=False)
        return TrainData(train.epoch, len(train), val.epoch, len(val), train_ds.num_classes, facts)
    if recipe.augment == "timm":
        train_ds.transform = TimmTrainTransform(size, mean, std, interp, **as_dict(cfg.train.timm_augment))
    else:
        train_ds.transform = ResizeNormalize(size, mean, std, interp)
    val_ds.transform = ResizeNormalize(size, mean, std, interp)
    common = {"batch_size": recipe.batch_size, "num_workers": workers, "collate_fn": collate_labelled,
              "pin_memory": device.type == "cuda"}
    val_loader = DataLoader(val_ds, shuffle=False, **common)

    def train_epoch(generator: torch.Generator) -> Iterator[LabelledBatch]:
        return iter(DataLoader(train_ds, shuffle=True, drop_last=True, generator=generator, **common))

    return TrainData(train_epoch, len(train_ds) // recipe.batch_size, lambda: iter(val_loader), len(val_loader),
                     train_ds.num_classes, facts)


def train_from_config(cfg: DictConfig, out_dir: Path) -> dict[str, Any]:
    """Run (or resume) the training that `cfg` describes; returns the record written to
    `<out_dir>/model.json` next to `<out_dir>/model.safetensors`."""
    out_dir = check_out_dir(Path(out_dir))
    device = torch.device(cfg.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={cfg.device} but CUDA is not available here; use device=cpu")
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    workers = int(cfg.num_workers) if cfg.num_workers is not None else len(os.sched_getaffinity(0))
    recipe = recipe_from(cfg)
    pre = preprocessing(cfg)
    seed_everything(int(cfg.seed))  # initialisation, and per-image augmentation in this process
    data = make_data(cfg, recipe, pre, device, workers)
    if data.steps == 0:
        raise ValueError(f"fewer training images than train.batch_size={recipe.batch_size}; lower it or add images")
    model = prepare_for_training(build_training_model(cfg.model, data.num_classes, bool(cfg.train.reset_head)))
    trainer = Trainer(model, recipe, data.steps, device, data.num_classes, int(cfg.seed))
    settings = fingerprint(cfg, pre)
    ckpt = out_dir / CHECKPOINT
    resume = str(cfg.resume).lower()
    if resume not in ("auto", "true", "false"):
        raise ValueError(f"resume={cfg.resume!r}; valid: auto, true, false")
    if resume == "true" and not ckpt.is_file():
        raise FileNotFoundError(f"resume=true but out_dir={out_dir} holds no {CHECKPOINT}; pass the folder of the "
                                "run to continue as out_dir=...")
    if ckpt.is_file() and resume != "false":
        payload = torch.load(ckpt, map_location="cpu", weights_only=True)
        changed = diff_keys(settings, payload["fingerprint"])
        if changed:
            raise ValueError(f"out_dir={out_dir} holds a checkpoint of different settings ({'; '.join(changed[:6])}); "
                             "resume with the same settings, or pass a new out_dir (or resume=false to restart)")
        trainer.restore(payload)
        log.info("resumed from %s after epoch %d (step %d)", ckpt, trainer.state.epoch, trainer.state.step)
    budget = cfg.stop_after_epochs
    stop_at = recipe.epochs if budget is None else min(recipe.epochs, trainer.state.epoch + int(budget))
    while trainer.state.epoch < stop_at:
        stats = trainer.train_epoch(data.train(trainer.order_rng), progress=cfg.progress)
        correct, counted, val_skipped = evaluate(trainer.model, data.val(), device, progress=cfg.progress,
                                                 total=data.val_steps)
        row = trainer.finish_epoch(stats, correct, counted, val_skipped)
        log.info("epoch %d/%d: loss %.4f, val acc %.4f (%d/%d), %.1f img/s, skipped %s", row["epoch"],
                 recipe.epochs, row["train_loss"], row["val_acc"], correct, counted,
                 row["images_per_second"] or 0, row["train_skipped"] or "none")
        save_atomic(trainer.checkpoint(settings), ckpt)
    if trainer.state.epoch < recipe.epochs:
        log.info("stopped after epoch %d of %d (stop_after_epochs); rerun with out_dir=%s to continue",
                 trainer.state.epoch, recipe.epochs, out_dir)
        return {"complete": False, "epoch": trainer.state.epoch}
    return export(cfg, trainer, pre, data.facts, out_dir)


def benchmark_overrides(cfg: DictConfig, weights: Path) -> list[str]:
    """`wsol-bench` overrides that load these weights with the preprocessing they were trained with."""
    out = [f"model.name={cfg.model.name}", f"model.checkpoint={weights}", "model.pretrained=false"]
    kwargs = as_dict(cfg.model.kwargs)
    if kwargs:
        out.append("++model.kwargs={" + ",".join(f"{k}:{v}" for k, v in kwargs.items()).replace(" ", "") + "}")
    for key in ("input_size", "mean", "std", "interpolation"):
        value = cfg.preprocess[key]
        if value is not None:
            out.append(f"preprocess.{key}=" + (str(value) if key == "interpolation"
                                                else "[" + ",".join(map(str, value)) + "]"))
    return out


def export(cfg: DictConfig, trainer: Trainer, pre: dict[str, Any], facts: dict[str, Any], out_dir: Path) -> dict:
    """Final weights as safetensors (the keys `load_model` expects) and the JSON record."""
    from safetensors.torch import save_file

    weights = out_dir / "model.safetensors"
    tmp = weights.with_name(".model.safetensors.tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in trainer.model.state_dict().items()}, str(tmp))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o666 & ~umask)  # safetensors creates the file owner-only
    tmp.replace(weights)
    s = trainer.state
    last = s.history[-1]
    overrides = benchmark_overrides(cfg, weights.resolve())
    skipped_train: dict[str, int] = {}
    for reason in s.skipped.values():
        skipped_train[reason] = skipped_train.get(reason, 0) + 1
    record = {
        "model": cfg.model.name, "kwargs": as_dict(cfg.model.kwargs), "num_classes": trainer.num_classes,
        "weights": str(weights), "benchmark_overrides": overrides,
        "benchmark_command": " ".join(["wsol-bench", *map(shlex.quote, overrides)]),
        "recipe": {"train": as_dict(cfg.train), "dataset": as_dict(cfg.dataset), "model": as_dict(cfg.model),
                   "preprocess": pre, "seed": int(cfg.seed), "device": str(cfg.device)},
        "final_val_acc": last["val_acc"], "val_images": last["val_images"],
        "best_val_acc": s.best_val_acc, "best_epoch": s.best_epoch, "epochs": s.epoch, "steps": s.step,
        "history": s.history, "train_seconds": round(s.train_seconds, 1), "images_seen": s.images_seen,
        "images_per_second": round(s.images_seen / s.train_seconds, 2) if s.train_seconds else None,
        "skipped_train_items": skipped_train, **facts, "environment": environment(str(cfg.device)),
    }
    write_json(out_dir / "model.json", record)
    log.info("wrote %s (final val acc %.4f); benchmark it with: %s", weights, last["val_acc"],
             record["benchmark_command"])
    return record


@hydra.main(config_path="pkg://wsol_bench.conf", config_name="trainer", version_base="1.3")
def _main(cfg: DictConfig) -> None:
    out_dir = Path(cfg.out_dir) if cfg.out_dir else Path(HydraConfig.get().runtime.output_dir)
    try:
        train_from_config(cfg, out_dir)
    except USER_ERRORS as exc:
        if os.environ.get("WSOL_BENCH_DEBUG"):
            raise
        log.error("%s", exc)
        print(f"wsol-bench-train: error: {exc}", file=sys.stderr)
        sys.exit(2)


def main() -> None:
    """Console entry point (set WSOL_BENCH_DEBUG=1 for tracebacks of user errors)."""
    _main()


if __name__ == "__main__":
    main()
