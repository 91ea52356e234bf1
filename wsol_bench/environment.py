"""What a run or a training writes about where it ran: Python, platform, device and the
versions of the packages its numbers depend on; and the wall time of work on a device."""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from importlib import metadata
from pathlib import Path

import torch

from wsol_bench.errors import SettingError

PACKAGES = ("wsol-bench", "torch", "torchvision", "timm", "hydra-core", "omegaconf", "numpy", "pandas",
            "scipy", "torchmetrics", "pycocotools", "opencv-python-headless", "safetensors", "pillow")


def environment(device: str) -> dict:
    """Package versions, Python, platform, the device a run used and whether its wsol-bench code
    ran from an installed copy or from a source checkout (an editable install included)."""
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    dev = torch.device(device)
    info = {"python": sys.version.split()[0], "platform": platform.platform(), "device": str(dev),
            "torch_threads": torch.get_num_threads(), "cpu_cores": available_cores(),
            "tf32": {"matmul": torch.backends.cuda.matmul.allow_tf32, "cudnn": torch.backends.cudnn.allow_tf32},
            "packages": versions, "wsol_bench_code": code_origin()}
    if dev.type == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(dev)
    return info


def code_origin() -> str:
    """"checkout" when this package runs from a source checkout (its methods/ and pyproject.toml
    beside it), else "installed"; no path, so run folders stay free of machine paths."""
    root = Path(__file__).resolve().parent.parent
    return "checkout" if (root / "methods").is_dir() and (root / "pyproject.toml").is_file() else "installed"


def package_version() -> str:
    """The installed wsol-bench version ("unknown" when it is not installed, e.g. a bare checkout)."""
    try:
        return metadata.version("wsol-bench")
    except metadata.PackageNotFoundError:
        return "unknown"


DEVICE_TYPES = ("cpu", "cuda", "mps")


def check_device(name: str) -> torch.device:
    """The torch device `name` names, if this machine has it; otherwise a SettingError naming the
    `device` setting and the valid values."""
    try:
        device = torch.device(str(name))
    except RuntimeError:
        raise SettingError(f"device={name!r} is not a device; valid: cpu, cuda, cuda:N (mps on "
                           "Apple)") from None
    if device.type not in DEVICE_TYPES:
        raise SettingError(f"device={name!r} is not supported; valid: cpu, cuda, cuda:N (mps on Apple)")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SettingError(f"device={name}: CUDA is not available on this machine; use device=cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise SettingError(f"device={name}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                               f"cuda:0..cuda:{torch.cuda.device_count() - 1}")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise SettingError(f"device={name}: MPS is not available on this machine; use device=cpu")
    return device


def available_cores() -> int:
    """CPU cores this process may use (its affinity mask, which a cluster job narrows, not the
    machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def set_tf32(enabled: bool) -> None:
    """TF32 tensor cores for float32 matmuls and convolutions on CUDA (faster, about 1e-3
    relative error), or strict float32 for both; PyTorch's own default allows TF32 in
    convolutions only, so a run sets both either way."""
    torch.backends.cuda.matmul.allow_tf32 = bool(enabled)
    torch.backends.cudnn.allow_tf32 = bool(enabled)


def precision_key(device: str, tf32: bool) -> dict:
    """What the numeric precision adds to a cache key: {"tf32": True} when TF32 is in effect
    (a CUDA device with tf32 on), else nothing, so strict-fp32 keys stay as they were and
    fast-mode maps and rows are never mixed with strict ones."""
    return {"tf32": True} if tf32 and torch.device(device).type == "cuda" else {}


def timed(fn: Callable[[], object], device: torch.device | str = "cpu") -> tuple[object, float]:
    """fn()'s result and its wall-clock seconds, the device's queued work included (CUDA is
    synchronised before and after, so asynchronous kernels are not timed as free)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    result = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return result, time.perf_counter() - start


def alternate_timings(contenders: dict[str, Callable[[slice], object]], num_images: int, block: int, rounds: int,
                      device: torch.device | str = "cpu") -> tuple[dict[str, list[float]], dict[str, list]]:
    """Seconds of every contender on every block of `block` images, the contenders taking turns
    (their order reversed from one block to the next, so a change in the machine's load hits
    all of them alike), and each one's outputs of the last round. For benchmark scripts."""
    seconds: dict[str, list[float]] = {name: [] for name in contenders}
    outputs: dict[str, list] = {name: [] for name in contenders}
    order = list(contenders)
    for r in range(rounds):
        for start in range(0, num_images, block):
            images = slice(start, min(start + block, num_images))
            for name in order:
                out, took = timed(partial(contenders[name], images), device)
                seconds[name].append(took)
                if r == rounds - 1:
                    outputs[name].append(out)
            order.reverse()
    return seconds, outputs


def speed_lines(seconds: dict[str, list[float]], counted: int, chunk: int, reference: str, reference_passes: float,
                engine_passes: float) -> list[str]:
    """A benchmark's ratio and bound lines from `alternate_timings`' seconds of the contenders
    "reference", "engine", "model_batch_1" (the model alone on the reference's images, one per
    pass) and "model_chunk" (2 x `chunk` images, `chunk` per pass): the engine's speed-up over
    the whole run and per block, and the most each side could reach at the model's own rate."""
    total = {name: sum(values) for name, values in seconds.items()}
    ratios = sorted(r / e for r, e in zip(seconds["reference"], seconds["engine"]))
    rate_1 = counted / total["model_batch_1"]
    rate_chunk = len(seconds["model_chunk"]) * 2 * chunk / total["model_chunk"]
    bound_reference, bound_engine = rate_1 / reference_passes, rate_chunk / engine_passes
    return [(f"  engine / {reference}: {total['reference'] / total['engine']:.2f}x over all blocks; per block median "
            f"{statistics.median(ratios):.2f}x, range {ratios[0]:.2f}x to {ratios[-1]:.2f}x"),
            (f"  model alone: {rate_1:.1f} img/s at batch 1, {rate_chunk:.1f} at batch {chunk} -> at most "
            f"{bound_reference:.2f} img/s for the {reference}, {bound_engine:.2f} for the engine, "
            f"{bound_engine / bound_reference:.2f}x between them")]
