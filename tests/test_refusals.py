"""Refusals of the user's settings, arguments and files are `UserError`s of the most specific
class (the commands print them as one line, exit code 2); one representative per module."""

from __future__ import annotations

import pytest
import torch
from conftest import make_vit

from methods import get_explainer
from wsol_bench.environment import check_device
from wsol_bench.errors import InputFileError, SettingError, UserError
from wsol_bench.metrics.box_accuracy import BoxAccuracy
from wsol_bench.metrics.faithfulness import FaithfulnessSettings, score_batch
from wsol_bench.metrics.pxap import PxAP
from wsol_bench.models import ModelLoadError, UnsupportedModelError, load_model, read_checkpoint
from wsol_bench.progress import progress_enabled
from wsol_bench.regions.engine import check_source
from wsol_bench.regions.thresholds import check_thresholds

TINY = {"img_size": 32, "patch_size": 8, "embed_dim": 24, "depth": 2, "num_heads": 3}


class Opaque:
    """An arbitrary Python object: torch.load(weights_only=True) refuses to unpickle it."""


def _refusal(call) -> UserError:
    with pytest.raises(UserError) as info:
        call()
    assert "\n" not in str(info.value), str(info.value)
    return info.value


@pytest.mark.parametrize("call,cls,text", [
    (lambda: get_explainer("rollout", make_vit(), discard_ratio=1.5), SettingError,
     "rollout: discard_ratio=1.5"),
    (lambda: get_explainer("agcam", make_vit(), head_fusion="max"), SettingError, "agcam: head_fusion='max'"),
    (lambda: get_explainer("no_such_method", make_vit()), SettingError, "unknown method 'no_such_method'"),
    (lambda: get_explainer("center", make_vit())(torch.zeros(2, 3, 32, 32), torch.tensor([0, 9])),
     SettingError, "center: target 9 is out of range"),
    (lambda: get_explainer("rollout", make_vit(global_pool="avg")), UnsupportedModelError,
     "global_pool='avg'"),
], ids=["explainer-parameter", "explainer-choice", "unknown-method", "target", "model-structure"])
def test_explainer_refusals_are_user_errors(call, cls, text):
    error = _refusal(call)
    assert type(error) is cls and text in str(error)


@pytest.mark.parametrize("call,text", [
    (lambda: check_thresholds([0.5, 1.5], "metric.thresholds"), "metric.thresholds=[0.5, 1.5] holds [1.5]"),
    (lambda: check_thresholds(["high"], "sweep.thresholds"), "sweep.thresholds=['high']"),
    (lambda: check_thresholds([0.5, 0.3, 0.5], "metric.thresholds"), "repeats [0.5]; give each threshold once"),
    (lambda: BoxAccuracy([0.5, 0.1], boxes="components"), "strictly increasing"),
    (lambda: BoxAccuracy(iou_thresholds=(30, 70), boxes="components"), "include 50"),
    (lambda: PxAP().update(torch.full((1, 4, 4), 2.0), torch.ones(1, 4, 4, dtype=torch.bool)), "[0, 1]"),
    (lambda: check_source("contours"), "unknown sweep.boxes 'contours'"),
], ids=["threshold-range", "threshold-type", "threshold-repeat", "threshold-order", "iou-thresholds", "pxap-heatmaps",
        "box-source"])
def test_metric_and_threshold_refusals_are_setting_errors(call, text):
    error = _refusal(call)
    assert type(error) is SettingError and text in str(error)


@pytest.mark.parametrize("call,text", [
    (lambda: FaithfulnessSettings(steps=1), "faithfulness steps must be an integer >= 2"),
    (lambda: FaithfulnessSettings(baseline="noise"), "faithfulness baseline 'noise' is unknown"),
    (lambda: FaithfulnessSettings(mode="auc"), "faithfulness mode 'auc' is unknown"),
    (lambda: score_batch(make_vit(), torch.zeros(2, 3, 32, 32), torch.zeros(2, 4, 4), torch.tensor([0, 1])),
     "heatmaps (2, 4, 4) do not match images (2, 3, 32, 32)"),
], ids=["steps", "baseline", "mode", "heatmap-shape"])
def test_faithfulness_setting_refusals_are_setting_errors(call, text):
    error = _refusal(call)
    assert type(error) is SettingError and text in str(error)


def test_model_loading_refusals_are_user_errors(tmp_path):
    """An unknown name, an argument the architecture does not take, an absent file and a file
    torch.load(weights_only=True) refuses: each a one-line ModelLoadError naming it."""
    assert "unknown model 'no_such_vit'" in str(_refusal(lambda: load_model("no_such_vit")))
    error = _refusal(lambda: load_model("vit_tiny_patch16_224", **TINY, dept=2))
    assert isinstance(error, ModelLoadError) and "'dept'" in str(error) and "model.kwargs" in str(error)
    assert "nothere.pth" in str(_refusal(lambda: read_checkpoint(tmp_path / "nothere.pth")))
    pickled = tmp_path / "objects.pth"
    torch.save({"head.weight": torch.zeros(2, 2), "extra": Opaque()}, pickled)
    error = _refusal(lambda: read_checkpoint(pickled))
    assert isinstance(error, ModelLoadError)
    assert str(error).startswith(f"cannot read checkpoint {pickled} with torch.load(weights_only=True): ")
    assert "Opaque" in str(error) and str(error).endswith("Re-save it as a plain state dict or safetensors.")


def test_device_and_progress_settings_are_setting_errors():
    assert type(_refusal(lambda: check_device("tpu"))) is SettingError
    assert "progress='sometimes'" in str(_refusal(lambda: progress_enabled("sometimes")))


def test_damaged_metric_state_file_is_an_input_file_error(tmp_path):
    from wsol_bench.metrics.base import load_states

    path = tmp_path / "sweep.json"
    for text in ("{not json", '{"format": 1, "methods": {"agcam": {"sweep": {"class": "Nope"}}}}'):
        path.write_text(text)
        error = _refusal(lambda: load_states(path))
        assert type(error) is InputFileError and str(path) in str(error)
