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
