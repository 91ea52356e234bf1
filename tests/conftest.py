"""Shared fixtures: tiny random timm ViTs prepared the way `load_model` prepares models."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch

from wsol_bench.models import disable_fused_attention

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def make_vit(seed: int = 0, *, img_size=32, patch_size=8, embed_dim=24, depth=3, num_heads=3,
             num_classes=5, **kwargs) -> torch.nn.Module:
    """A tiny random VisionTransformer: eval mode, fused attention off, frozen weights."""
    torch.manual_seed(seed)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=img_size,
                              patch_size=patch_size, embed_dim=embed_dim, depth=depth,
                              num_heads=num_heads, num_classes=num_classes, **kwargs)
    # Random init leaves the class token and position embeddings near zero; spread them out
    # so maps differ between images and classes.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    disable_fused_attention(model)
    model.requires_grad_(False)
    return model.eval()


@pytest.fixture
def tiny_vit() -> torch.nn.Module:
    return make_vit()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"reference data folder {SHARED_DATA} is absent")
    return SHARED_DATA


@pytest.fixture(autouse=True, scope="session")
def _one_thread_per_worker():
    """Tiny tensors: one intra-op thread per test process avoids oversubscribing the cores
    (pytest -n 2 runs two processes), which makes tiny-model tests ~100x faster."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def installed_copy(tmp_path_factory) -> Path:
    """The project installed as a user's `pip install .` would (not editable) into a folder
    of its own; put it first on PYTHONPATH to use it."""
    import subprocess
    import sys

    target = tmp_path_factory.mktemp("site")
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--quiet",
                    "--target", str(target), str(REPO)], check=True, timeout=600, capture_output=True)
    return target
