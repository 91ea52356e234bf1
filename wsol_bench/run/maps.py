"""The maps of a run: the preprocessing and the map-store key that identify them, the stores,
and the model and explainers (loaded only when a map is missing)."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from wsol_bench.config.checks import check_batch_memory, check_checkpoint, check_std
from wsol_bench.datasets import EvalTransform
from wsol_bench.datasets.base import RESAMPLER
from wsol_bench.environment import package_version, precision_key
from wsol_bench.errors import counted
from wsol_bench.methods import get_explainer
from wsol_bench.methods.registry import explainer_class, source_digest
from wsol_bench.models import (
    ModelLoadError,
    architecture_data_config,
    attention_size,
    load_model,
    map_grid,
    pretrained_file,
)
from wsol_bench.run.store import MapStore, file_digest

log = logging.getLogger("wsol_bench")


def as_dict(node) -> dict:
    """A config node (or None) as a plain dict of keyword arguments."""
    return {} if node is None else dict(OmegaConf.to_container(node, resolve=True, throw_on_missing=True))


def build_transform(cfg: DictConfig) -> EvalTransform:
    """The model's preprocessing (read from its architecture, no weights needed), with any
    value the config sets taking precedence."""
    dc = architecture_data_config(cfg.model.name, **as_dict(cfg.model.kwargs))
    pre = cfg.preprocess
    check_std(pre.std)
    size = tuple(pre.input_size) if pre.input_size is not None else tuple(dc.input_size[1:])
    return EvalTransform(size=size, mean=pre.mean if pre.mean is not None else dc.mean,
                         std=pre.std if pre.std is not None else dc.std,
                         interpolation=pre.interpolation or dc.interpolation,
                         # .get: run folders written before these settings existed are rebuilt too
                         resize=pre.get("resize", "squash"),
                         crop_pct=pre.crop_pct if pre.get("crop_pct") is not None else dc.crop_pct)


def check_pass_memory(cfg: DictConfig, transform: EvalTransform) -> None:
    """Refuse, before any image is read, a batch_size whose input batch and attention maps (read
    from the architecture on the meta device) exceed the memory of the run's device; on a GPU
    the input batch is also held in this machine's memory, where the loader builds it."""
    size = tuple(int(v) for v in transform.size)
    attention = attention_size(cfg.model.name, size, **as_dict(cfg.model.kwargs))
    batch, device = int(cfg.batch_size), torch.device(str(cfg.device))
    if device.type != "cuda":
        check_batch_memory(batch, size, attention)
        return
    check_batch_memory(batch, size)
    total = torch.cuda.get_device_properties(device).total_memory
    check_batch_memory(batch, size, attention, total=total, where=f"the memory of {device}")


def model_identity(mcfg: DictConfig, seed: int) -> dict:
    """What determines the model's function: architecture, its options and the weights'
    content (checkpoint or shipped file digest, or the timm pretrained tag)."""
    ident = {"name": mcfg.name, "kwargs": as_dict(mcfg.kwargs)}
    if mcfg.checkpoint is not None:
        check_checkpoint(mcfg.checkpoint)
        path = Path(mcfg.checkpoint)
        ident["weights"] = f"sha256:{file_digest(path)}"
    elif mcfg.pretrained and pretrained_file(mcfg.name) is not None:  # a local file, e.g. the shipped model's
        ident["weights"] = f"sha256:{file_digest(pretrained_file(mcfg.name))}"
    elif mcfg.pretrained:
        ident["weights"] = f"timm-pretrained:{mcfg.name}"
    else:
        ident["weights"] = f"random-init:seed={seed}"
    return ident


def data_fingerprint(dataset) -> str | None:
    """The dataset's own fingerprint of its data (ids, annotations, file stamps), computed once
    per dataset object; None (with a warning) for a dataset class that offers none."""
    cached = getattr(dataset, "_wsol_fingerprint", None)
    if cached is None:
        if not hasattr(dataset, "fingerprint"):
            log.warning("%s has no fingerprint(): cached maps are identified by its settings only, so "
                        "replaced images would not be noticed", type(dataset).__name__)
            return None
        cached = dataset.fingerprint()
        dataset._wsol_fingerprint = cached
    return cached


def store_settings(cfg: DictConfig, transform: EvalTransform, method_key: str, target_policy: str,
                   data: str | None = None) -> dict:
    """Exactly the settings that determine a method's maps (the map-store key); `data` is the
    dataset's fingerprint, so maps of replaced or edited images are never found."""
    m = cfg.method[method_key]
    return {
        "model": model_identity(cfg.model, int(cfg.seed)),
        "dataset": {"name": cfg.dataset.name, "split": cfg.dataset.split, "params": as_dict(cfg.dataset.params),
                    "data": data},
        "preprocess": {"size": list(transform.size), "mean": list(transform.mean), "std": list(transform.std),
                       "interpolation": transform.interpolation, "resize": transform.resize,
                       "resampler": RESAMPLER,
                       **({"crop_pct": transform.crop_pct} if transform.resize == "timm" else {})},
        # the package version and the explainer's source: an edited method recomputes its maps
        "code": {"wsol_bench": package_version(), "method": source_digest(explainer_class(m.name))},
        "method": {"name": m.name, "params": as_dict(m.get("params"))},
        "target_policy": target_policy,
        **precision_key(str(cfg.device), bool(cfg.tf32)),
        # float32 keys stay as they were; float16 maps are other numbers
        **({"map_dtype": str(cfg.store.dtype)} if str(cfg.store.get("dtype", "float32")) != "float32" else {}),
    }


class LazyModel:
    """Loads the model on first use only: a run whose maps are all cached never reads weights."""

    def __init__(self, cfg: DictConfig, num_classes: int | None) -> None:
        self.cfg, self.num_classes, self._model = cfg, num_classes, None

    def get(self) -> torch.nn.Module:
        if self._model is None:
            mcfg = self.cfg.model
            torch.manual_seed(int(self.cfg.seed))  # random-init models are a function of the seed
            self._model = load_model(mcfg.name, pretrained=bool(mcfg.pretrained), checkpoint=mcfg.checkpoint,
                                     device=self.cfg.device, **as_dict(mcfg.kwargs))
            classes = getattr(self._model, "num_classes", None)
            if classes is not None and self.num_classes is not None and classes != self.num_classes:
                raise ModelLoadError(f"model {mcfg.name} predicts {classes} classes but dataset "
                                     f"{self.cfg.dataset.name} has {self.num_classes}; load a checkpoint "
                                     "trained on it (model.checkpoint=...)")
        return self._model


def map_stores(cfg: DictConfig, dataset, transform: EvalTransform, policies: list[str]) -> dict[str, dict[str, MapStore]]:
    """{target policy: {method: store}} of every configured method, for each of `policies`."""
    grid = map_grid(cfg.model.name, transform.size, **as_dict(cfg.model.kwargs))
    data = data_fingerprint(dataset)
    dtype = str(cfg.store.get("dtype", "float32"))

    def store(key: str, policy: str) -> MapStore:
        cls = explainer_class(cfg.method[key].name)
        shape = tuple(transform.size) if cls.resolution == "pixel" else grid  # pixel maps have the input size
        return MapStore(cfg.store.root, store_settings(cfg, transform, key, policy, data), int(cfg.store.shard_size),
                        grid=shape, dtype=dtype, class_specific=bool(cls.class_specific))

    return {policy: {key: store(key, policy) for key in cfg.method} for policy in policies}


def log_missing(stores: dict[str, dict[str, MapStore]], shards: range, root: str) -> int:
    """Log which methods have shards to explain among `shards` (files absent; a shard that
    fails validation is found and reported during the pass); returns how many."""
    count = 0
    for policy, named in stores.items():
        lacking = {m: sum(not s.has(i) for i in shards) for m, s in named.items()}
        lacking = {m: k for m, k in lacking.items() if k}
        count += sum(lacking.values())
        if lacking:
            explaining = ", ".join(f"{m} ({counted(k, 'shard')})" for m, k in lacking.items())
            log.info("explaining %s (target %s); cache %s", explaining, policy, root)
    if not count:
        log.info("all maps found in the cache %s; no explanation pass", root)
    return count


class Explainers:
    """The run's explainers, each built on first use (a run whose maps are all cached builds
    none and never loads the model)."""

    def __init__(self, cfg: DictConfig, model: LazyModel) -> None:
        self.cfg, self.model, self._made = cfg, model, {}

    def __call__(self, key: str):
        if key not in self._made:
            self._made[key] = self.on(self.model.get(), key)
        return self._made[key]

    def on(self, model: torch.nn.Module, key: str):
        """A new explainer of method `key` (its name and parameters) on `model`: the run's
        model or a changed copy of it (a sanity check's randomised model)."""
        entry = self.cfg.method[key]
        return get_explainer(entry.name, model, **as_dict(entry.get("params")))
