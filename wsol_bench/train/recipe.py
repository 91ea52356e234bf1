"""A training run from a resolved configuration (what `wsol-bench-train` runs): the model
(a timm model, fine-tuned, or the shipped architecture from scratch), the recipe, resuming,
and the weights and record the benchmark loads unchanged
(`wsol-bench model.name=<name> model.checkpoint=<out_dir>/model.safetensors`)."""

from __future__ import annotations

import json
import logging
import os
import random
import shlex
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
from omegaconf import DictConfig
from torch import nn

from wsol_bench.config.checks import check_resume
from wsol_bench.environment import available_cores, check_device, environment
from wsol_bench.errors import InputFileError, MissingInputError, SettingError, counted
from wsol_bench.files import atomic_write, write_json
from wsol_bench.models import (
    ModelLoadError,
    architecture_data_config,
    head_classes,
    load_model,
    load_weights_only,
    read_checkpoint,
)
from wsol_bench.models.loading import TRAINING_METADATA
from wsol_bench.progress import progress_enabled
from wsol_bench.train.data import BATCH_AUGMENTS, SAMPLE_AUGMENTS, as_dict, make_data, split_spec
from wsol_bench.train.trainer import (
    CHECKPOINT,
    CHECKPOINT_FORMAT,
    CHECKPOINT_KEYS,
    Recipe,
    Trainer,
    evaluate,
    save_atomic,
)

log = logging.getLogger("wsol_bench.train.recipe")
DATA_KEYS = ("train_params", "val_params", "cache", "timm_augment", "reset_head")
HEAD_MODULES = ("head", "head_dist")


def preprocessing(cfg: DictConfig) -> dict[str, Any]:
    """Input size, mean, std and interpolation: the architecture's own (as the benchmark reads
    them), with any `preprocess.*` value set in the config taking precedence."""
    name = cfg.model.name
    if not timm.is_model(name):
        raise ModelLoadError(f"unknown model.name={name!r}; valid: wsol_synthetic_vit (shipped) or any timm "
                             "model name (with an optional pretrained tag)")
    dc = architecture_data_config(name, **as_dict(cfg.model.kwargs))
    pre = cfg.preprocess
    return {"size": [int(s) for s in (pre.input_size or dc.input_size[1:])],
            "mean": list(pre.mean or dc.mean), "std": list(pre.std or dc.std),
            "interpolation": pre.interpolation or dc.interpolation}


def recipe_from(cfg: DictConfig) -> Recipe:
    """The optimisation settings of the train group (keys and types are checked earlier: by the
    schema, wsol_bench.config.trainer.TrainConfig, when Hydra composes the config)."""
    recipe = Recipe(**{k: v for k, v in as_dict(cfg.train).items() if k not in DATA_KEYS})
    valid = BATCH_AUGMENTS + SAMPLE_AUGMENTS
    if recipe.augment not in valid:
        raise SettingError(f"unknown train.augment={recipe.augment!r}; valid: {', '.join(valid)}")
    if recipe.augment == "timm" and cfg.train.get("cache", False):
        raise SettingError("train.augment=timm crops the decoded originals; it needs train.cache=false")
    return recipe


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
        raise SettingError(f"out_dir={path} is not a writable folder ({exc}); pass a writable "
                           "out_dir=...") from exc
    return path


def build_training_model(mcfg: DictConfig, num_classes: int, reset_head: bool,
                         dynamic_size: bool = False) -> nn.Module:
    """The model to train, with a `num_classes` head. Weights: model.checkpoint (a head of
    another size is an error unless train.reset_head), a timm pretrained tag (timm gives it a
    new head), the shipped weights (model.pretrained=true with a shipped name), or random.
    `dynamic_size` lets a ViT take other input sizes (its position embedding is resampled on
    the fly), for progressive resizing; the weights keep the shapes of the plain model."""
    name, kwargs = mcfg.name, as_dict(mcfg.kwargs)
    if dynamic_size:
        kwargs["dynamic_img_size"] = True
    if kwargs.pop("num_classes", num_classes) != num_classes:
        raise SettingError(f"model.kwargs.num_classes={mcfg.kwargs.num_classes} differs from the dataset's "
                           f"{counted(num_classes, 'class', 'classes')}; remove it (the head always matches the "
                           "dataset)")
    checkpoint = mcfg.checkpoint
    if checkpoint is None and mcfg.pretrained:
        return load_model(name, pretrained=True, num_classes=num_classes, **kwargs)
    model = load_model(name, pretrained=False, num_classes=num_classes, **kwargs)
    if checkpoint is not None:
        load_initial_weights(model, checkpoint, num_classes, reset_head)
    return model


def load_initial_weights(model: nn.Module, checkpoint: str | Path, num_classes: int,
                         reset_head: bool) -> None:
    """Load a checkpoint into `model`; with `reset_head` the classifier keeps its fresh
    initialisation (fine-tuning to new classes)."""
    state = read_checkpoint(checkpoint)
    if reset_head:  # the checkpoint's head, whatever its shape, is dropped
        state = {k: v for k, v in state.items() if k.split(".")[0] not in HEAD_MODULES}
    elif (classes_in_head := head_classes(state, checkpoint)) is not None and classes_in_head != num_classes:
        raise ModelLoadError(f"model.checkpoint={checkpoint} has a {classes_in_head}-class head but the dataset "
                             f"has {counted(num_classes, 'class', 'classes')}; set train.reset_head=true to "
                             f"fine-tune it with a new {num_classes}-class head")
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # tensor shape mismatches
        raise ModelLoadError(f"model.checkpoint={checkpoint} does not fit model.name: {exc}") from exc
    missing = [k for k in missing if not (reset_head and k.split(".")[0] in HEAD_MODULES)]
    if missing or unexpected:
        raise ModelLoadError(f"model.checkpoint={checkpoint} does not match the model: missing "
                             f"{missing[:5]}, unexpected {list(unexpected)[:5]}")


def prepare_for_training(model: nn.Module, fused_attention: bool | None = None) -> nn.Module:
    """Undo the explanation-time settings of `load_model`: trainable weights, and the attention
    kernel `fused_attention` (None: timm's default, fused where torch has the kernel)."""
    fused = timm.layers.use_fused_attn() if fused_attention is None else bool(fused_attention)
    for m in model.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = fused
    return model.requires_grad_(True).train()


def fingerprint(cfg: DictConfig, pre: dict[str, Any]) -> dict[str, Any]:
    """The settings that define a run; a resumed run must match them (device, workers, progress
    and out_dir may change)."""
    return {"model": as_dict(cfg.model), "dataset": as_dict(cfg.dataset), "train": as_dict(cfg.train),
            "preprocess": pre, "seed": int(cfg.seed)}


def diff_keys(now: Any, before: Any, prefix: str = "") -> list[str]:
    """'key: before -> now' for every dotted key whose value differs between two nested dicts."""
    if isinstance(now, dict) and isinstance(before, dict):
        keys = sorted(set(now) | set(before))
        return [d for k in keys for d in diff_keys(now.get(k), before.get(k), f"{prefix}{k}.")]
    return [] if now == before else [f"{prefix[:-1]}: {before!r} -> {now!r}"]


def _restart_hint(ckpt: Path) -> str:
    return (f"pass resume=false to start again in out_dir={ckpt.parent} (its {ckpt.name} is replaced after "
            "the first epoch), or another out_dir")


def read_resume_checkpoint(ckpt: Path) -> dict[str, Any]:
    """The payload `Trainer.checkpoint` wrote to `ckpt`, read with weights_only=True. A file that
    is not one (damaged, another program's, a pickle of Python objects) is refused naming it."""
    hint = _restart_hint(ckpt)
    payload = load_weights_only(ckpt, hint[0].upper() + hint[1:] + ".")
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT \
            or not set(CHECKPOINT_KEYS) <= set(payload):
        raise InputFileError(f"checkpoint {ckpt} is not one wsol-bench-train writes (format "
                             f"{CHECKPOINT_FORMAT} with {', '.join(CHECKPOINT_KEYS)}); {hint}")
    return payload


def resume_if_asked(cfg: DictConfig, trainer: Trainer, settings: dict[str, Any], ckpt: Path) -> None:
    """Continue from `ckpt` per `resume` (auto: when it exists; true: it must; false: never)."""
    resume = check_resume(cfg.resume)
    if resume == "true" and not ckpt.is_file():
        raise MissingInputError(f"resume=true but out_dir={ckpt.parent} holds no {CHECKPOINT}; pass the "
                                "folder of the run to continue as out_dir=...")
    if resume == "false" or not ckpt.is_file():
        return
    payload = read_resume_checkpoint(ckpt)
    changed = diff_keys(settings, payload["fingerprint"])
    if changed:
        raise SettingError(f"out_dir={ckpt.parent} holds a checkpoint of other settings "
                           f"({'; '.join(changed[:6])}); resume with the same settings, or pass a new "
                           "out_dir (or resume=false to restart)")
    try:
        trainer.restore(payload)
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:  # entries of another shape or kind
        raise InputFileError(f"checkpoint {ckpt} does not restore this run ({type(exc).__name__}: "
                             f"{' '.join(str(exc).split())}); {_restart_hint(ckpt)}") from exc
    log.info("resumed from %s after epoch %d (step %d)", ckpt, trainer.state.epoch, trainer.state.step)


def train_from_config(cfg: DictConfig, out_dir: Path) -> dict[str, Any]:
    """Run (or resume) the training that `cfg` describes; returns the record written to
    `<out_dir>/model.json` next to `<out_dir>/model.safetensors` (or, when `stop_after_epochs`
    ends the run early, {"complete": False, "epoch": n})."""
    out_dir = check_out_dir(Path(out_dir))
    device = check_device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    workers = int(cfg.num_workers) if cfg.num_workers is not None else available_cores()
    recipe = recipe_from(cfg)
    pre = preprocessing(cfg)
    seed_everything(int(cfg.seed))  # initialisation, and per-image augmentation in this process
    progress = progress_enabled(cfg.progress)
    data = make_data(cfg, recipe.batch_size, recipe.augment, pre, device, workers, progress)
    if data.steps == 0:
        raise SettingError(f"fewer training images than train.batch_size={recipe.batch_size}; lower it or "
                           "add images")
    reset_head = bool(cfg.train.get("reset_head", False))
    dynamic = recipe.epoch_sizes is not None and set(recipe.epoch_sizes) != {pre["size"][0]}
    if dynamic and pre["size"][0] != pre["size"][1]:
        raise SettingError(f"train.epoch_sizes are square sides but the input size is {pre['size']}; "
                           "set a square preprocess.input_size or train.epoch_sizes=null")
    model = prepare_for_training(build_training_model(cfg.model, data.num_classes, reset_head, dynamic),
                                 recipe.fused_attention)
    trainer = Trainer(model, recipe, data.steps, device, data.num_classes, int(cfg.seed))
    settings = fingerprint(cfg, pre)
    ckpt = out_dir / CHECKPOINT
    resume_if_asked(cfg, trainer, settings, ckpt)
    budget = cfg.stop_after_epochs
    stop_at = recipe.epochs if budget is None else min(recipe.epochs, trainer.state.epoch + int(budget))
    while trainer.state.epoch < stop_at:
        stats = trainer.train_epoch(data.train(trainer.order_rng, trainer.epoch_size), progress=progress)
        correct, counted, val_skipped = evaluate(trainer.model, data.val(), device, progress=progress,
                                                 total=data.val_steps)
        size = trainer.epoch_size
        if size is not None and size != pre["size"][0]:
            # progressive resizing: also the accuracy at the size this epoch trained at
            small, small_counted, _ = evaluate(trainer.model, data.val(size), device, total=data.val_steps)
            stats["val_acc_at_train_size"] = small / small_counted if small_counted else float("nan")
        row = trainer.finish_epoch(stats, correct, counted, val_skipped)
        log.info("epoch %d/%d: loss %.4f, val acc %.4f (%d/%d)%s, %.1f img/s, skipped train %s, val %d",
                 row["epoch"], recipe.epochs, row["train_loss"], row["val_acc"], correct, counted,
                 f" ({row['val_acc_at_train_size']:.4f} at {size}px)" if "val_acc_at_train_size" in row else "",
                 row["images_per_second"] or 0, row["train_skipped"] or "none", val_skipped)
        save_atomic(trainer.checkpoint(settings), ckpt)
    if trainer.state.epoch < recipe.epochs:
        log.info("stopped after epoch %d of %d (stop_after_epochs); run again with out_dir=%s to continue",
                 trainer.state.epoch, recipe.epochs, out_dir)
        return {"complete": False, "epoch": trainer.state.epoch}
    return export(cfg, trainer, pre, data.facts, out_dir)


def benchmark_overrides(cfg: DictConfig, weights: Path) -> list[str]:
    """`wsol-bench` overrides that load `weights` with the preprocessing they were trained with."""
    out = [f"model.name={cfg.model.name}", f"model.checkpoint={weights}", "model.pretrained=false"]
    kwargs = as_dict(cfg.model.kwargs)
    if kwargs:
        items = ",".join(f"{k}:{v}" for k, v in kwargs.items()).replace(" ", "")
        out.append(f"++model.kwargs={{{items}}}")
    for key in ("input_size", "mean", "std", "interpolation"):
        value = cfg.preprocess[key]
        if value is not None:
            text = str(value) if key == "interpolation" else "[" + ",".join(map(str, value)) + "]"
            out.append(f"preprocess.{key}={text}")
    return out


def training_metadata(cfg: DictConfig, epochs: int, val_acc: float) -> dict[str, str]:
    """The safetensors metadata of the exported weights: what they were trained on, which the
    benchmark's tables name (`wsol_bench.models.weights_label`) wherever the file is moved."""
    train = split_spec(cfg, "train")
    facts = {"trainer": "wsol-bench-train", "model": str(cfg.model.name), "epochs": int(epochs),
             "dataset": f"{train.name}/{train.params.get('split', '?')}", "val_acc": float(val_acc)}
    return {TRAINING_METADATA: json.dumps(facts)}


def export(cfg: DictConfig, trainer: Trainer, pre: dict[str, Any], facts: dict[str, Any],
           out_dir: Path) -> dict[str, Any]:
    """Final weights as safetensors (the keys `load_model` expects) and the JSON record."""
    from safetensors.torch import save_file

    weights = out_dir / "model.safetensors"
    state = {k: v.detach().cpu().contiguous() for k, v in trainer.model.state_dict().items()}
    s = trainer.state
    last = s.history[-1]
    umask = os.umask(0)
    os.umask(umask)

    def write(tmp: Path) -> None:
        save_file(state, str(tmp), metadata=training_metadata(cfg, s.epoch, last["val_acc"]))
        tmp.chmod(0o666 & ~umask)  # safetensors creates the file owner-only

    atomic_write(weights, write)
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
