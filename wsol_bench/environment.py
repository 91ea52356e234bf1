"""What a run or a training writes about where it ran: Python, platform, device and the
versions of the packages its numbers depend on."""

from __future__ import annotations

import platform
import sys
from importlib import metadata

import torch

PACKAGES = ("wsol-bench", "torch", "torchvision", "timm", "hydra-core", "omegaconf", "numpy", "pandas",
            "scipy", "torchmetrics", "pycocotools", "opencv-python-headless", "safetensors", "pillow")


def environment(device: str) -> dict:
    """Package versions, Python, platform and the device a run used."""
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    dev = torch.device(device)
    info = {"python": sys.version.split()[0], "platform": platform.platform(), "device": str(dev),
            "torch_threads": torch.get_num_threads(), "packages": versions}
    if dev.type == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(dev)
    return info


def package_version() -> str:
    """The installed wsol-bench version ("unknown" when it is not installed, e.g. a bare checkout)."""
    try:
        return metadata.version("wsol-bench")
    except metadata.PackageNotFoundError:
        return "unknown"


DEVICE_TYPES = ("cpu", "cuda", "mps")


def check_device(name: str) -> torch.device:
    """The torch device `name` names, if this machine has it; otherwise a ValueError naming the
    `device` setting and the valid values."""
    try:
        device = torch.device(str(name))
    except RuntimeError:
        raise ValueError(f"device={name!r} is not a device; valid: cpu, cuda, cuda:N (mps on Apple)") from None
    if device.type not in DEVICE_TYPES:
        raise ValueError(f"device={name!r} is not supported; valid: cpu, cuda, cuda:N (mps on Apple)")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={name}: CUDA is not available on this machine; use device=cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device={name}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                             f"cuda:0..cuda:{torch.cuda.device_count() - 1}")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device={name}: MPS is not available on this machine; use device=cpu")
    return device
