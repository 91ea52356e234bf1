"""Model loading: checkpoints, prefixes, class-count checks, fused attention, offline errors."""

from __future__ import annotations

import pytest
import timm
import torch
from safetensors.torch import save_file

from wsol_bench.models import ModelLoadError, data_config, load_model, patch_grid

ARCH = "vit_tiny_patch16_224"
TINY = {"img_size": 32, "patch_size": 8, "embed_dim": 24, "depth": 2, "num_heads": 3}


def _state(num_classes: int = 4) -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    return timm.create_model(ARCH, num_classes=num_classes, **TINY).state_dict()


def test_safetensors_checkpoint_with_module_prefix_loads_exactly(tmp_path):
    """Weights saved by DataParallel ("module.") load unchanged; model is ready to explain."""
    state = _state()
    path = tmp_path / "w.safetensors"
    save_file({f"module.{k}": v.contiguous() for k, v in state.items()}, str(path))
    model = load_model(ARCH, checkpoint=path, **TINY)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert not model.training
    assert all(not p.requires_grad for p in model.parameters())
    assert all(not b.attn.fused_attn for b in model.blocks)
    assert model.num_classes == 4 and patch_grid(model) == (4, 4)


def test_pth_checkpoint_wrapped_in_state_dict_with_model_prefix(tmp_path):
    """A .pth {"state_dict": {"model.x": ...}} is unwrapped and loaded with weights_only."""
    state = _state()
    path = tmp_path / "w.pth"
    torch.save({"state_dict": {f"model.{k}": v for k, v in state.items()}, "epoch": 3}, path)
    model = load_model(ARCH, checkpoint=path, num_classes=4, **TINY)
    assert torch.equal(model.head.weight, state["head.weight"])


def test_num_classes_mismatch_names_file_and_numbers(tmp_path):
    """A 4-class checkpoint asked to serve 10 classes is an error, never a new head."""
    path = tmp_path / "four.safetensors"
    save_file({k: v.contiguous() for k, v in _state(4).items()}, str(path))
    with pytest.raises(ModelLoadError, match=r"four\.safetensors.*4-class.*num_classes=10"):
        load_model(ARCH, checkpoint=path, num_classes=10, **TINY)


def test_missing_checkpoint_and_unknown_model_are_named(tmp_path):
    """Missing files and unknown model names give messages that say what to do."""
    with pytest.raises(ModelLoadError, match="nothere.safetensors"):
        load_model(ARCH, checkpoint=tmp_path / "nothere.safetensors", **TINY)
    with pytest.raises(ModelLoadError, match="unknown model 'vit_nonexistent'.*wsol_synthetic_vit"):
        load_model("vit_nonexistent")


def test_mismatched_architecture_is_refused(tmp_path):
    """A checkpoint of another width does not silently half-load."""
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in _state().items()}, str(path))
    with pytest.raises(ModelLoadError, match="does not fit"):
        load_model(ARCH, checkpoint=path, **{**TINY, "embed_dim": 48})


def test_offline_pretrained_error_says_which_file_to_put_where(monkeypatch):
    """Without network the error names the paper's weights file and the checkpoint option."""
    real_create = timm.create_model

    def offline(name, pretrained=False, **kwargs):
        if pretrained:
            raise OSError("network is unreachable")
        return real_create(name, pretrained=False, **kwargs)

    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(ModelLoadError) as info:
        load_model("vit_base_patch16_224.orig_in21k_ft_in1k", pretrained=True)
    message = str(info.value)
    assert "jx_vit_base_p16_224-80ecf9dd.pth" in message
    assert "model.checkpoint=" in message and "timm/vit_base_patch16_224.orig_in21k_ft_in1k" in message


def test_data_config_reads_the_pretrained_config():
    """data_config gives the paper's preprocessing for the paper's weights tag."""
    model = timm.create_model("vit_base_patch16_224.orig_in21k_ft_in1k", pretrained=False)
    dc = data_config(model)
    assert dc.input_size == (3, 224, 224) and dc.mean == (0.5, 0.5, 0.5) and dc.std == (0.5, 0.5, 0.5)


def test_shipped_model_is_registered_with_timm_on_import():
    """A fresh process: `import wsol_bench.models` is enough for timm to build the shipped model
    with its packaged weights, and neither `import wsol_bench` nor the commands' modules and
    config tree load torch or timm (the commands answer --help and refusals before they load)."""
    import subprocess
    import sys

    light = ("import sys, wsol_bench, wsol_bench.cli.bench, wsol_bench.cli.train, wsol_bench.conf; "
             "print('torch' in sys.modules, 'timm' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", light], capture_output=True, text=True, timeout=300, check=True)
    assert out.stdout.split() == ["False", "False"]
    code = ("import timm, wsol_bench.models, torch; from safetensors.torch import load_file; "
            "m = timm.create_model('wsol_synthetic_vit', pretrained=True); "
            "sd = load_file(str(wsol_bench.models.shipped_weights_path())); "
            "print(all(torch.equal(m.state_dict()[k], v) for k, v in sd.items()), m.num_classes)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert out.stdout.split() == ["True", "6"]
