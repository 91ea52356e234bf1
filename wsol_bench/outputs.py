"""What a run writes next to its records: the resolved config and its environment."""

from __future__ import annotations

import json
import platform
import sys
from importlib import metadata
from pathlib import Path

import torch

PACKAGES = ("wsol-bench", "torch", "torchvision", "timm", "hydra-core", "omegaconf", "numpy", "pandas",
            "scikit-image", "scipy", "pycocotools", "opencv-python-headless", "safetensors", "pillow")


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


def write_json(path: Path, payload: dict) -> None:
    """Write JSON atomically (temporary file, then rename)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str))
    tmp.replace(path)
