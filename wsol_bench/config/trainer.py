"""Schema of the `wsol-bench-train` configuration (conf/trainer.yaml and its `train` presets)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING

from .bench import InputConfig
from .datasets import DatasetConfig
from .groups import ModelConfig


@dataclass
class TrainConfig:
    """A `train` preset: the fields of `wsol_bench.train.trainer.Recipe` (same defaults) and the
    data settings of `wsol_bench.train.recipe.DATA_KEYS`. `epoch_sizes` is a size, a list of
    sizes or None, a union OmegaConf cannot type; `Recipe` checks it."""

    train_params: dict[str, Any] = field(default_factory=dict)  # dataset.params for training
    val_params: dict[str, Any] = field(default_factory=dict)    # dataset.params for validation
    cache: bool = False
    epochs: int = MISSING
    batch_size: int = MISSING
    lr: float = MISSING
    min_lr: float = 0.0
    weight_decay: float = 0.05
    warmup_epochs: float = 0.5
    label_smoothing: float = 0.1
    grad_clip: float | None = 1.0
    augment: str = "none"
    timm_augment: dict[str, Any] = field(default_factory=dict)  # timm.data.create_transform kwargs
    precision: str = "auto"
    fused_attention: bool | None = None
    epoch_sizes: Any = None
    reset_head: bool = False


@dataclass
class TrainerConfig:
    """Top level of `wsol-bench-train`. `resume` and `progress` take auto, true or false, so
    they are typed loosely and checked where they are read."""

    device: str = MISSING
    seed: int = MISSING
    out_dir: str | None = None
    resume: Any = MISSING
    stop_after_epochs: int | None = None
    progress: Any = MISSING
    verbose: bool = False
    num_workers: int | None = None
    threads: int | None = None
    cache_dir: str | None = None
    preprocess: InputConfig = field(default_factory=InputConfig)
    dataset: DatasetConfig = MISSING
    model: ModelConfig = MISSING
    train: TrainConfig = MISSING
