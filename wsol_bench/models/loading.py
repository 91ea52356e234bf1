"""Loading the Vision Transformers the benchmark explains.

`load_model` builds any timm VisionTransformer by name (the shipped model included: it is
registered with timm), with weights from a timm pretrained tag (timm's own download and cache,
or the packaged file), a local checkpoint (safetensors or .pth), or none; it returns the model
in eval mode with fused attention switched off on every attention module and parameters
frozen, ready for the explainers.

Offline (HF_HUB_OFFLINE set, or the Hugging Face hub's host not answering within HUB_TIMEOUT
seconds, checked once per process), a pretrained tag's weights come from a local copy only (the
hub cache, or timm's download folder TORCH_HOME/hub/checkpoints), and without one the load fails
at once, instead of after the hub client's minute of retries.
"""

from __future__ import annotations

import functools
import json
import os
import socket
import threading
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import timm
import torch
from torch import nn

from wsol_bench.errors import UserError, counted
from wsol_bench.models.attention import disable_fused_attention


class ModelLoadError(UserError, RuntimeError):
    """A model could not be built or its weights could not be loaded; the message says why
    and what to do."""


HUB_TIMEOUT = 2.0  # seconds the hub's host may take to accept a connection before we count as offline
HUB_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # what timm fetches from a hub repo, in order
# the safetensors metadata entry in which wsol-bench-train records what the weights were trained on
TRAINING_METADATA = "wsol_bench.training"


@dataclass(frozen=True)
class DataConfig:
    """Preprocessing a model expects."""

    input_size: tuple[int, int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bilinear"
    crop_pct: float = 0.875  # timm's eval transform resizes the shorter side to size / crop_pct


def pretrained_file(name: str) -> Path | None:
    """The local file timm's pretrained config of `name` (with its tag) loads weights from,
    if it names one (the shipped model's packaged weights); None for downloads."""
    try:
        cfg = timm.models.get_pretrained_cfg(name)
    except Exception:  # not a registered model or tag  # noqa: BLE001
        return None
    file = getattr(cfg, "file", None) if cfg is not None else None
    return Path(file) if file else None


def training_facts(checkpoint: str | Path) -> dict[str, Any]:
    """What wsol-bench-train recorded about a checkpoint it wrote ("epochs", "dataset",
    "val_acc"): from the file's own safetensors metadata, else from the model.json the trainer
    wrote beside it; {} for any other file, or one that cannot be read."""
    path = Path(checkpoint).expanduser()
    try:
        if path.suffix == ".safetensors":
            from safetensors import SafetensorError, safe_open

            try:
                with safe_open(str(path), framework="pt") as handle:
                    recorded = (handle.metadata() or {}).get(TRAINING_METADATA)
            except SafetensorError:  # not a safetensors file: loading it is refused later, naming it
                return {}
            if recorded:
                return json.loads(recorded)
        record = json.loads((path.parent / "model.json").read_text())
        if Path(record["weights"]).resolve() != path.resolve():
            return {}
        train = record.get("train_dataset") or {}
        dataset = f"{train['name']}/{train.get('params', {}).get('split', '?')}" if "name" in train else None
        return {"epochs": record["epochs"], "val_acc": record.get("final_val_acc"), "dataset": dataset}
    except (OSError, ValueError, KeyError, TypeError):  # no record, or not one the trainer wrote: no facts
        return {}


def weights_label(name: str, *, pretrained: bool = True, checkpoint: str | Path | None = None) -> str:
    """The model as a table caption or log line names it: `name` alone for its pretrained tag's
    weights (the published or shipped ones); otherwise `name` with where its weights come from:
    random (model.pretrained=false), or the user's checkpoint, with what wsol-bench-train
    recorded about it (epochs, dataset, validation accuracy)."""
    if checkpoint is None:
        return name if pretrained else f"{name} with random weights (model.pretrained=false)"
    facts = training_facts(checkpoint)
    trained = []
    if "epochs" in facts:
        trained.append(f"wsol-bench-train: {counted(facts['epochs'], 'epoch')}"
                       + (f" on {facts['dataset']}" if facts.get("dataset") else ""))
    if isinstance(facts.get("val_acc"), (int, float)):
        trained.append(f"val acc {100 * facts['val_acc']:.1f} %")
    if pretrained_file(name) is not None:
        trained.append("not the shipped weights")
    return f"{name} with your checkpoint {checkpoint}" + (f" ({', '.join(trained)})" if trained else "")


def _strip_prefixes(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # DataParallel/DDP save "module.", Lightning-style wrappers save "model."; both may stack.
    out = {}
    for key, value in state_dict.items():
        changed = True
        while changed:
            changed = False
            for prefix in ("module.", "model."):
                if key.startswith(prefix):
                    key, changed = key[len(prefix):], True
        out[key] = value
    return out


def _load_failure(exc: Exception) -> str:
    # torch's weights_only refusal spans many lines of advice on loading the file unsafely; the
    # cause is the line after "WeightsUnpickler error:" (e.g. "Unsupported global: GLOBAL x.Y")
    text = str(exc)
    marker = "WeightsUnpickler error:"
    if marker in text:
        text = text.split(marker, 1)[1].strip().split("\n\n")[0].split(". ")[0]
    return " ".join(text.split())


def load_weights_only(path: Path, fix: str) -> Any:
    """`torch.load(path, weights_only=True)` on the CPU. A file it cannot read (damaged,
    truncated, not a torch file, or a pickle of arbitrary Python objects, which weights_only
    refuses) is a ModelLoadError naming the file, the cause in one line, and `fix`."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle with arbitrary objects, truncated files, ...
        raise ModelLoadError(f"cannot read checkpoint {path} with torch.load(weights_only=True): "
                             f"{_load_failure(exc)}. {fix}") from exc


def read_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """State dict from a .safetensors file or a .pth/.pt file (loaded with weights_only=True);
    a {"state_dict": ...} or {"model": ...} wrapper is unwrapped and prefixes stripped."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ModelLoadError(f"checkpoint file not found: {path} (pass an existing file as "
                             "model.checkpoint=...)")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        try:
            state = load_file(str(path))
        except Exception as exc:  # not a safetensors file, truncated, damaged header  # noqa: BLE001
            raise ModelLoadError(f"checkpoint {path} is not a readable safetensors file ({exc}); pass the "
                                 "file the trainer wrote, or a .pth state dict") from None
    else:
        state = load_weights_only(path, "Re-save it as a plain state dict or safetensors.")
        for wrapper in ("state_dict", "model", "module"):
            if isinstance(state, dict) and wrapper in state and isinstance(state[wrapper], dict):
                state = state[wrapper]
                break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelLoadError(f"checkpoint {path} does not hold a state dict of tensors")
    return _strip_prefixes(state)


def head_classes(state: dict[str, torch.Tensor], checkpoint: str | Path) -> int | None:
    """The number of classes of the checkpoint's classifier head (the rows of `head.weight`);
    None without a head. A head weight that is not a [classes, features] matrix is a
    ModelLoadError naming the checkpoint, the tensor and its shape."""
    head = state.get("head.weight")
    if head is None:
        return None
    if head.ndim != 2 or head.shape[0] < 1:
        raise ModelLoadError(f"checkpoint {checkpoint}: tensor head.weight has shape {list(head.shape)}, but a "
                             "classifier head's weight is a [classes, features] matrix; pass the checkpoint the "
                             "trainer wrote (or a timm ViT state dict)")
    return int(head.shape[0])


def _create(name: str, **kwargs: Any) -> nn.Module:
    try:
        return timm.create_model(name, **kwargs)
    except TypeError as exc:  # an argument the architecture does not take, or of the wrong type
        raise ModelLoadError(f"cannot build model {name!r} with the arguments {kwargs} ({exc}); fix "
                             "model.kwargs (the architecture's own arguments, e.g. img_size, depth)") from exc
    except RuntimeError as exc:
        if "Unknown model" in str(exc) or "Invalid pretrained tag" in str(exc):
            raise ModelLoadError(f"unknown model {name!r}: {exc}. Valid: wsol_synthetic_vit (shipped) or any "
                                 "timm model, e.g. vit_base_patch16_224.orig_in21k_ft_in1k") from exc
        raise


def _pretrained_help(name: str, cause: str) -> ModelLoadError:
    """The refusal of pretrained weights that could not be had: `cause`, and where to put a copy."""
    cfg = _pretrained_cfg(name)
    sources = []
    if cfg.get("hf_hub_id"):
        sources.append(f"the Hugging Face hub repo {cfg['hf_hub_id']} (model.safetensors; put the "
                       "repo in the hub cache, HF_HOME, and set HF_HUB_OFFLINE=1)")
    if cfg.get("url"):
        filename = cfg["url"].rsplit("/", 1)[-1]
        sources.append(f"the file {filename} from {cfg['url']} (put it in TORCH_HOME/hub/checkpoints, "
                       f"or pass model.checkpoint=/path/to/{filename} model.pretrained=false)")
    where = "; or ".join(sources) or "timm's pretrained source for this tag"
    return ModelLoadError(f"pretrained weights for {name!r} could not be fetched ({cause}). Offline, copy {where}.")


def _pretrained_cfg(name: str) -> dict[str, Any]:
    """timm's pretrained config of `name` (with its tag) as a dict; empty when it has none."""
    try:
        cfg = timm.models.get_pretrained_cfg(name)
    except Exception:  # not a registered model or tag  # noqa: BLE001
        return {}
    return cfg.to_dict() if cfg is not None else {}


def _answers(host: str, port: int, timeout: float) -> str | None:
    """None when `host`:`port` accepts a TCP connection within `timeout` seconds, else why not.
    The lookup and the connection run in a thread of their own: a name lookup has no timeout."""
    outcome: list[str | None] = []

    def connect() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            outcome.append(None)
        except OSError as exc:
            outcome.append(exc.strerror or str(exc) or type(exc).__name__)

    probe = threading.Thread(target=connect, daemon=True)
    probe.start()
    probe.join(timeout)
    return outcome[0] if outcome else f"no answer within {timeout:g} s"


@functools.cache
def hub_unreachable() -> str | None:
    """Why the Hugging Face hub cannot be reached from this process (offline mode set, or its
    host, or the proxy to it, does not accept a connection within HUB_TIMEOUT seconds), or None
    when it can. Checked once per process."""
    from huggingface_hub import constants

    if constants.is_offline_mode() or os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE"):
        return "HF_HUB_OFFLINE is set"
    endpoint = urlsplit(constants.ENDPOINT)
    host, port = endpoint.hostname or "", endpoint.port or (443 if endpoint.scheme == "https" else 80)
    proxy = urllib.request.getproxies().get(endpoint.scheme)
    if proxy and not urllib.request.proxy_bypass(host):
        proxied = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        host, port = proxied.hostname or "", proxied.port or 80
    why = _answers(host, port, HUB_TIMEOUT)
    return None if why is None else f"offline: {host}:{port} cannot be reached ({why})"


def local_pretrained_file(name: str) -> Path | None:
    """A copy of `name`'s pretrained weights on this machine that timm can load without the
    network: the hub repo's file in the Hugging Face cache, or the tag's download in timm's
    folder (TORCH_HOME/hub/checkpoints); None when there is none."""
    cfg = _pretrained_cfg(name)
    if cfg.get("hf_hub_id"):
        from huggingface_hub import try_to_load_from_cache

        repo, _, revision = str(cfg["hf_hub_id"]).partition("@")
        for filename in ([cfg["hf_hub_filename"]] if cfg.get("hf_hub_filename") else HUB_WEIGHT_FILES):
            found = try_to_load_from_cache(repo, filename, revision=revision or None)
            if isinstance(found, str):
                return Path(found)
    if cfg.get("url"):
        download = Path(torch.hub.get_dir()) / "checkpoints" / str(cfg["url"]).rsplit("/", 1)[-1]
        if download.is_file():
            return download
    return None


def _create_pretrained(name: str, **kwargs: Any) -> nn.Module:
    """timm model `name` with its pretrained tag's weights: downloaded (or read from the caches)
    by timm online; offline from a local copy only, and refused at once without one."""
    offline = hub_unreachable()
    if offline is not None:
        local = local_pretrained_file(name)
        if local is None:
            raise _pretrained_help(name, offline)
        overlay = {**kwargs.pop("pretrained_cfg_overlay", {}), "file": str(local), "source": "timm"}
        return _create(name, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
    try:
        return _create(name, pretrained=True, **kwargs)
    except ModelLoadError:
        raise
    except Exception as exc:  # network errors surface as many types (OSError, HTTP, hub)
        raise _pretrained_help(name, f"{type(exc).__name__}: {exc}") from exc


def load_model(name: str, *, pretrained: bool = False, checkpoint: str | Path | None = None,
               num_classes: int | None = None, device: str | torch.device = "cpu",
               **timm_kwargs: Any) -> nn.Module:
    """Build timm model `name` ready for explanation: eval mode, fused attention off,
    parameters frozen, on `device`.

    Weights come from a timm pretrained tag (`pretrained=True`; the shipped model's is its
    packaged file), or `checkpoint` (a local .safetensors/.pth). `num_classes` is checked
    against the checkpoint's head: a mismatch is an error, never a silently new head.
    """
    packaged = pretrained_file(name) if pretrained and checkpoint is None else None
    if packaged is not None and not packaged.is_file():
        raise ModelLoadError(f"the weights of {name} are missing: {packaged}; reinstall wsol-bench or "
                             "retrain with scripts/train_synthetic.py")
    state = read_checkpoint(checkpoint) if checkpoint is not None else None
    classes_in_head = head_classes(state, checkpoint) if state is not None else None
    if num_classes is not None and classes_in_head is not None and classes_in_head != num_classes:
        raise ModelLoadError(f"checkpoint {checkpoint} has a {classes_in_head}-class head but "
                             f"num_classes={num_classes} was requested (dataset classes)")
    kwargs = dict(timm_kwargs)
    if num_classes is not None or classes_in_head is not None:
        kwargs.setdefault("num_classes", num_classes if num_classes is not None else classes_in_head)

    if pretrained and state is None and packaged is None:
        model = _create_pretrained(name, **kwargs)
    else:
        model = _create(name, pretrained=pretrained and state is None, **kwargs)

    if state is not None:
        model_classes = getattr(model, "num_classes", None)
        if classes_in_head is not None and model_classes is not None and classes_in_head != model_classes:
            raise ModelLoadError(f"checkpoint {checkpoint} has a {classes_in_head}-class head but "
                                 f"model {name} was built with {counted(model_classes, 'class', 'classes')}")
        try:
            missing, unexpected = model.load_state_dict(state, strict=False)
        except RuntimeError as exc:  # tensor shape mismatches
            raise ModelLoadError(f"checkpoint {checkpoint} does not fit {name}: {exc}") from exc
        if missing or unexpected:
            raise ModelLoadError(f"checkpoint {checkpoint} does not match {name}: missing "
                                 f"{list(missing)[:5]}, unexpected {list(unexpected)[:5]}")
    elif num_classes is not None and getattr(model, "num_classes", num_classes) != num_classes:
        raise ModelLoadError(f"model {name} has {counted(model.num_classes, 'class', 'classes')} but num_classes="
                             f"{num_classes} was requested")

    disable_fused_attention(model)
    model.requires_grad_(False)  # explainers take gradients w.r.t. activations, never weights
    return model.eval().to(device)


def data_config(model: nn.Module) -> DataConfig:
    """Input size, mean, std and interpolation the model expects (timm's pretrained config)."""
    cfg = timm.data.resolve_data_config({}, model=model)
    return DataConfig(input_size=tuple(cfg["input_size"]), mean=tuple(cfg["mean"]),
                      std=tuple(cfg["std"]), interpolation=cfg.get("interpolation", "bilinear"),
                      crop_pct=float(cfg.get("crop_pct", 0.875)))


def architecture_data_config(name: str, **timm_kwargs: Any) -> DataConfig:
    """`data_config` of architecture `name` without reading any weights: the model is built
    on the meta device, so a re-scoring run learns the preprocessing (part of the map cache
    key) in milliseconds instead of loading a checkpoint it does not need."""
    with torch.device("meta"):
        model = _create(name, pretrained=False, **timm_kwargs)
    return data_config(model)


def patch_grid(model: nn.Module) -> tuple[int, int]:
    """(rows, cols) of the patch grid, read from the model, never assumed."""
    grid = model.patch_embed.grid_size
    return int(grid[0]), int(grid[1])


def map_grid(name: str, input_size: tuple[int, int], **timm_kwargs: Any) -> tuple[int, int]:
    """The patch grid of architecture `name` for [H, W] inputs (its maps' shape), built on the
    meta device. Inputs the model cannot take are refused naming preprocess.input_size."""
    with torch.device("meta"):
        model = _create(name, pretrained=False, **timm_kwargs)
    embed = getattr(model, "patch_embed", None)
    if embed is None or not hasattr(embed, "patch_size"):
        raise ModelLoadError(f"model {name} has no patch embedding (patch_embed.patch_size); explainers "
                             "need a VisionTransformer")
    height, width = (int(v) for v in input_size)
    patch_h, patch_w = (int(v) for v in embed.patch_size)
    if getattr(model, "dynamic_img_size", False):
        if height % patch_h or width % patch_w:
            raise ModelLoadError(f"preprocess.input_size=[{height}, {width}] is not a multiple of {name}'s "
                                 f"{patch_h}x{patch_w} patches")
        return height // patch_h, width // patch_w
    model_size = tuple(int(v) for v in embed.img_size)
    if (height, width) != model_size:
        raise ModelLoadError(f"preprocess.input_size=[{height}, {width}] does not fit {name}, which takes "
                             f"{model_size[0]}x{model_size[1]} images; leave preprocess.input_size=null (the "
                             f"model's own), or build the model for that size (model.kwargs.img_size="
                             f"[{height},{width}], or model.kwargs.dynamic_img_size=true)")
    return tuple(int(v) for v in embed.grid_size)


def attention_size(name: str, input_size: tuple[int, int], **timm_kwargs: Any) -> tuple[int, int, int]:
    """(layers, heads, tokens) of the self-attention of architecture `name` for [H, W] inputs,
    built on the meta device (no weights): what a pass keeps per image is heads x tokens^2
    attention weights per layer. (0, 0, 0) for a model without attention blocks."""
    rows, cols = map_grid(name, input_size, **timm_kwargs)
    with torch.device("meta"):
        model = _create(name, pretrained=False, **timm_kwargs)
    blocks = list(getattr(model, "blocks", []))
    heads = [int(getattr(getattr(b, "attn", None), "num_heads", 0)) for b in blocks]
    if not blocks or not all(heads):
        return 0, 0, 0
    return len(blocks), max(heads), rows * cols + int(getattr(model, "num_prefix_tokens", 0))
