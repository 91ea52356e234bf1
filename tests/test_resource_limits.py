"""Sizes that would exhaust memory are refused in one line before any work, naming the setting or
file, the estimate and the limit: a threshold grid too fine, images and batches too large for the
machine, HDF5 entries declaring giant images or reference arrays, damaged or giant metric state
files, and a checkpoint whose head weight is no matrix. The machine's memory is replaced by a
fixed size where a refusal depends on it, so every case behaves the same on any machine."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_module
from safetensors.torch import save_file
from test_imagenet_segmentation import box_mask, random_image, write_gtsegs
from test_report import hand_run, mark_complete

from wsol_bench import limits
from wsol_bench.config.checks import check_settings
from wsol_bench.datasets import build_dataset
from wsol_bench.datasets.base import SkippedSample
from wsol_bench.errors import InputFileError, SettingError, UserError
from wsol_bench.metrics.base import JSON_MEMORY_PER_BYTE, load_states, save_states
from wsol_bench.metrics.box_accuracy import BoxAccuracy
from wsol_bench.metrics.localization import metric_columns
from wsol_bench.metrics.pxap import PxAP
from wsol_bench.metrics.segmentation import CheferSegmentation
from wsol_bench.metrics.sweep import SweepMeans
from wsol_bench.models import ModelLoadError, load_model
from wsol_bench.regions.thresholds import MAX_THRESHOLDS, check_thresholds
from wsol_bench.train.recipe import load_initial_weights

GIB = 2**30


@pytest.fixture
def machine_of(monkeypatch):
    """Make the machine's memory `size` bytes for the checks (what a refusal depends on)."""
    def patch(size: int) -> None:
        monkeypatch.setattr(limits, "machine_memory", lambda: size)
    return patch


def refusal(call, cls: type[UserError] = UserError) -> str:
    """The one-line message of the refusal `call` raises."""
    with pytest.raises(cls) as info:
        call()
    message = str(info.value)
    assert "\n" not in message, message
    return message


def settings(overrides: list[str]):
    """The composed `wsol-bench` config of `overrides`."""
    with initialize_config_module(config_module="wsol_bench.conf", version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def command_refusal(command, prog: str, args: list[str], cwd: Path) -> str:
    """The one line a command refused with (exit code 2, no traceback)."""
    proc = command(prog, args, cwd)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith(f"{prog}: error: ")
    return lines[0]


# -- settings: threshold grids, image sizes, batches ----------------------------------------------

@pytest.mark.parametrize("step,count", [("1e-9", "1,000,000,000"), ("1e-6", "1,000,000")])
def test_a_sweep_step_too_fine_is_refused_before_the_grid_is_built(step, count):
    message = refusal(lambda: check_settings(settings(["sweep=grid", f"sweep.step={step}"])), SettingError)
    assert f"sweep.step={float(step)} makes {count} thresholds" in message
    assert f"more than the {MAX_THRESHOLDS:,}" in message and "use sweep.step >= 0.0001" in message
    check_settings(settings(["sweep=grid", "sweep.step=0.0001"]))  # the finest allowed: 10,000 thresholds


def test_an_explicit_threshold_list_beyond_the_limit_is_refused():
    too_many = np.linspace(0, 1, MAX_THRESHOLDS + 1).tolist()
    message = refusal(lambda: check_thresholds(too_many, "metric.thresholds"), SettingError)
    assert f"metric.thresholds holds {MAX_THRESHOLDS + 1:,} thresholds" in message


def test_the_command_refuses_a_fine_sweep_in_one_line(command, tmp_path):
    line = command_refusal(command, "wsol-bench", ["sweep=grid", "sweep.step=1e-9", "progress=false",
                                                   f"store.root={tmp_path / 'cache'}"], tmp_path)
    assert "sweep.step=1e-09 makes 1,000,000,000 thresholds" in line
    assert not (tmp_path / "cache").exists()


def test_a_synthetic_image_beyond_the_pixel_limit_is_refused():
    message = refusal(lambda: check_settings(settings(["dataset.params.image_size=10000"])), SettingError)
    assert message.startswith("dataset.params.image_size=10000 is 10000x10000 = 100,000,000 pixels, more than "
                              f"the {limits.max_image_pixels():,}")


def test_a_synthetic_image_beyond_the_memory_limit_is_refused(machine_of):
    machine_of(GIB)
    message = refusal(lambda: check_settings(settings(["dataset.params.image_size=4000"])), SettingError)
    assert message.startswith("dataset.params.image_size=4000: drawing one image needs about 1.19 GiB, more "
                              "than the 0.50 GiB allowed (50% of this machine's memory, 1.00 GiB)")


def test_a_batch_of_a_given_input_size_is_refused_before_torch_work(machine_of):
    machine_of(8 * GIB)
    cfg = settings(["preprocess.input_size=[224,224]", "batch_size=100000"])
    message = refusal(lambda: check_settings(cfg), SettingError)
    assert message.startswith("batch_size=100000: the input batch (100000 x 3 x 224 x 224 float32) needs about "
                              "56.08 GiB, more than the 4.00 GiB allowed")
    assert message.endswith("lower batch_size to at most 7133")
    check_settings(settings(["preprocess.input_size=[224,224]", "batch_size=7133"]))


def test_a_model_input_beyond_the_pixel_limit_is_refused():
    message = refusal(lambda: check_settings(settings(["+model.kwargs.img_size=[20000,20000]"])), SettingError)
    assert message.startswith("model.kwargs.img_size=[20000, 20000] is 20000x20000")


def test_a_batch_and_its_attention_maps_are_refused_when_the_run_starts(command, tmp_path, machine_of,
                                                                        monkeypatch):
    """The model's own input size, layers and heads (read from its architecture, no weights)
    decide; the refusal comes before the dataset is even built."""
    import wsol_bench.run.runner as runner

    def no_dataset(*args, **kwargs):
        raise AssertionError("the dataset was built before the batch was refused")

    monkeypatch.setattr(runner, "build_dataset", no_dataset)
    machine_of(8 * GIB)
    line = command_refusal(command, "wsol-bench", ["batch_size=5000", "progress=false",
                                                   f"store.root={tmp_path / 'cache'}"], tmp_path)
    assert ("batch_size=5000: the input batch (5000 x 3 x 224 x 224 float32) with its attention maps (6 layers x 3 "
            "heads x 197x197 tokens) needs about 15.82 GiB, more than the 4.00 GiB allowed") in line
    assert line.endswith("lower batch_size to at most 1264")


def test_setting_refusals_answer_before_torch_loads(tmp_path):
    """The sweep grid, the synthetic image size and a batch of a given input size are refused by
    the checks that run before torch and timm are imported."""
    code = ("import sys\n"
            "from wsol_bench.cli import bench\n"
            "for args in (['sweep=grid', 'sweep.step=1e-9'], ['dataset.params.image_size=10000'],\n"
            "             ['preprocess.input_size=[224,224]', 'batch_size=100000000']):\n"
            "    sys.argv = ['wsol-bench', *args, 'hydra.run.dir=r']\n"
            "    try:\n"
            "        bench.main()\n"
            "    except SystemExit as exit_:\n"
            "        print('exit', exit_.code, file=sys.stderr)\n"
            "print('torch' in sys.modules, 'timm' in sys.modules)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.stdout.strip().splitlines()[-1] == "False False", proc.stdout[-2000:] + proc.stderr[-2000:]
    assert [line for line in proc.stderr.splitlines() if line.startswith("exit")] == ["exit 2"] * 3, proc.stderr
    for text in ("sweep.step=1e-09 makes", "dataset.params.image_size=10000 is", "batch_size=100000000: the input"):
        assert text in proc.stderr, text


# -- gtsegs_ijcv.mat: entries read only after their declared size is checked -------------------

def _declared(path: Path, name: str, shape: tuple[int, ...], dtype=np.uint8) -> h5py.Reference:
    """A chunked dataset of `shape` with nothing written: HDF5 keeps it sparse, so the file stays
    small whatever the shape declares."""
    with h5py.File(path, "a") as f:
        return f.create_dataset(name, shape=shape, dtype=dtype, chunks=True).ref


def _point(path: Path, key: str, index: int, ref_name: str) -> None:
    with h5py.File(path, "a") as f:
        if key == "value/img":
            f[key][index, 0] = f[ref_name].ref
        else:
            f[f[key][index, 0]][0, 0] = f[ref_name].ref


@pytest.mark.parametrize("kind", ["image", "mask"])
def test_an_entry_declaring_a_giant_image_or_mask_is_skipped_unread(tmp_path, kind):
    ok = (random_image(6, 8, 0), box_mask(6, 8, (1, 1, 4, 4)))
    path = write_gtsegs(tmp_path / "gtsegs_ijcv.mat", [ok, ok])
    shape = (3, 60000, 60000) if kind == "image" else (60000, 60000)
    _declared(path, "#refs#/giant", shape)
    _point(path, "value/img" if kind == "image" else "value/gt", 1, "#refs#/giant")
    ds = build_dataset("imagenet_segmentation", file=str(path))
    assert not isinstance(ds[0], SkippedSample)
    item = ds[1]
    assert isinstance(item, SkippedSample) and item.image_id == "imagenet_seg_000001"
    assert item.reason.startswith(f"{kind} entry /#refs#/giant of gtsegs_ijcv.mat declares 60000x60000 pixels, "
                                  f"more than the {limits.max_image_pixels():,} one image may have")


def test_an_image_entry_of_another_type_is_skipped_unread(tmp_path):
    path = write_gtsegs(tmp_path / "gtsegs_ijcv.mat", [(random_image(6, 8, 0), box_mask(6, 8, (1, 1, 4, 4)))])
    _declared(path, "#refs#/wide", (3, 40000, 40000), np.float64)  # 38 GB if read
    _point(path, "value/img", 0, "#refs#/wide")
    item = build_dataset("imagenet_segmentation", file=str(path))[0]
    assert isinstance(item, SkippedSample) and item.reason == "image is float64, expected uint8"


def _giant_reference_arrays(path: Path, count: int) -> Path:
    with h5py.File(path, "w") as f:
        for key in ("value/img", "value/gt"):
            f.create_dataset(key, shape=(count, 1), dtype=h5py.ref_dtype, chunks=True)
    return path


def test_reference_arrays_beyond_the_memory_limit_are_refused_before_any_record(tmp_path):
    path = _giant_reference_arrays(tmp_path / "gtsegs_ijcv.mat", 2_000_000_000)
    message = refusal(lambda: build_dataset("imagenet_segmentation", file=str(path)), InputFileError)
    assert message.startswith(f"{path}: the index of 2,000,000,000 items (value/img lists 2,000,000,000) needs "
                              "about 2980.23 GiB, more than the")
    assert "dataset.params.num_images" in message


def test_a_few_items_of_giant_reference_arrays_are_read_in_bounded_memory(tmp_path):
    path = _giant_reference_arrays(tmp_path / "gtsegs_ijcv.mat", 2_000_000_000)
    ds = build_dataset("imagenet_segmentation", file=str(path), num_images=2)
    assert len(ds) == 2 and isinstance(ds[0], SkippedSample)  # null references: skipped with the reason


# -- metric state files: checked when read -------------------------------------------------------

THRESHOLDS = [0.2, 0.5]


def _states_file(path: Path) -> Path:
    """A valid states/sweep.json of one method: 4 images, 3 of them correctly classified."""
    sweep = SweepMeans(THRESHOLDS, metric_columns(False))
    scores = {c: np.full((2, 4), 0.5) for c in sweep.columns} | {"n_pred_boxes": np.ones((2, 4), int)}
    sweep.update(scores, np.array([True, True, True, False]))
    boxes = BoxAccuracy(THRESHOLDS, boxes="components")
    boxes.num_images += 4
    boxes.correct_v1 += 2
    boxes.correct_v2 += 3
    boxes.top1_v1 += 1
    pxap = PxAP(THRESHOLDS)
    pxap.positive += 1
    save_states(path, {"agcam": {"sweep": sweep, "box_accuracy": boxes, "pxap": pxap}})
    return path


def _edited(path: Path, metric: str, edit) -> Path:
    payload = json.loads(path.read_text())
    edit(payload["methods"]["agcam"][metric])
    path.write_text(json.dumps(payload))
    return path


def _set(part: str, key: str, value):
    return lambda entry: entry[part].__setitem__(key, value)


@pytest.mark.parametrize("metric,edit,text", [
    ("sweep", lambda e: e["settings"]["columns"].__setitem__(0, float("nan")),
     "it holds NaN; a state file holds finite numbers only"),
    ("sweep", lambda e: e["settings"]["columns"].__setitem__(0, 5), "SweepMeans columns are score names"),
    ("box_accuracy", _set("state", "num_images", -4), "BoxAccuracy.num_images holds the count -4, outside 0"),
    ("pxap", _set("state", "negative", [0, 1.5, 0, 0]), "PxAP.negative holds a value that is not a whole number"),
    ("box_accuracy", _set("state", "correct_v1", [[1, 1], [1, 1]]),
     "BoxAccuracy.correct_v1 has shape [2, 2], expected [3, 2]"),
    ("sweep", _set("state", "images", [4, 5]), "images counts 5 correctly classified images but only 4 images"),
    ("sweep", lambda e: e["state"]["sums"][0][0][1].__setitem__(0, 5 << 40),
     "the sum of box_pixel_acc at threshold 0.5 is larger than its 4 images (all) can give"),
    ("box_accuracy", _set("state", "correct_v2", [[9, 9]] * 3), "correct_v2 counts 9 of 4 images"),
    ("box_accuracy", _set("state", "top1_v1", [[3, 3]] * 3), "top1_v1 counts more images than correct_v1"),
    ("box_accuracy", _set("state", "num_images", 0), "num_images is 0"),
    ("pxap", _set("settings", "thresholds", np.linspace(0, 0.99, MAX_THRESHOLDS + 1).tolist()),
     f"the threshold list holds {MAX_THRESHOLDS + 1:,} thresholds, more than the {MAX_THRESHOLDS:,}"),
], ids=["nan", "number-as-column", "negative", "fraction", "short-array", "correct-above-all", "score-sum-above-images",
        "correct-above-images", "top1-above-correct", "no-image", "too-many-thresholds"])
def test_an_impossible_state_is_refused_naming_the_file(tmp_path, metric, edit, text):
    path = _edited(_states_file(tmp_path / "sweep.json"), metric, edit)
    if "thresholds" in text:  # the state of the declared length, so only the count is wrong
        count = MAX_THRESHOLDS + 1
        _edited(path, metric, lambda e: e["state"].update(positive=[0] * (count + 2), negative=[0] * (count + 2)))
    message = refusal(lambda: load_states(path), InputFileError)
    assert message.startswith(f"metric state file {path} ") and text in message, message
    assert message.endswith("rerun the benchmark into this folder to write it again")


def test_a_segmentation_state_with_more_correct_than_labelled_pixels_is_refused(tmp_path):
    metric = CheferSegmentation()
    metric.correct += 10
    metric.labelled += 10
    metric.images += 1
    path = save_states(tmp_path / "segmentation.json", {"agcam": {"segmentation": metric}})
    load_states(path)
    _edited(path, "segmentation", _set("state", "correct", [11]))
    assert "correct 11 is more than labelled 10 pixels" in refusal(lambda: load_states(path), InputFileError)


def test_a_state_file_too_large_to_read_is_refused_before_reading(tmp_path, machine_of):
    path = _states_file(tmp_path / "sweep.json")
    table = load_states(path)["agcam"]["sweep"].compute()["correct"]  # valid, on this machine
    assert table["n_images"].tolist() == [3, 3] and table["box_iou"].tolist() == [0.5, 0.5]
    size = path.stat().st_size
    machine_of(size * JSON_MEMORY_PER_BYTE)  # the limit is half of that
    message = refusal(lambda: load_states(path), InputFileError)
    assert message.startswith(f"reading metric state file {path} ({size:,} bytes) needs about ")
    assert "no run writes a state file that large" in message


@pytest.mark.parametrize("edit,text", [
    (lambda methods: methods["agcam"]["box_accuracy"]["state"].__setitem__("num_images", -4),
     " is damaged: agcam/box_accuracy: BoxAccuracy.num_images holds the count -4"),
    (lambda methods: methods["agcam"].pop("box_accuracy"), ": method agcam has no box_accuracy metric"),
    (lambda methods: methods["agcam"].__setitem__("sweep", methods["agcam"]["pxap"]),
     ": method agcam holds a PxAP as sweep, expected SweepMeans"),
], ids=["negative-count", "missing-metric", "metric-of-another-class"])
def test_the_report_refuses_a_bad_sweep_state_in_one_line(tmp_path, command, edit, text):
    folder = hand_run(tmp_path / "run", "synthetic", "wsol_synthetic_vit")
    (folder / "states").mkdir()
    path = _states_file(folder / "states" / "sweep.json")
    payload = json.loads(path.read_text())
    edit(payload["methods"])
    path.write_text(json.dumps(payload))
    mark_complete(folder)
    line = command_refusal(command, "wsol-bench-report", [str(folder), "--no-gallery"], tmp_path)
    assert f"metric state file {path}{text}" in line and line.endswith("to write it again")


# -- checkpoints -----------------------------------------------------------------------------------

TINY = {"img_size": 32, "patch_size": 8, "embed_dim": 24, "depth": 2, "num_heads": 3}


def test_a_checkpoint_with_a_scalar_head_weight_is_refused_naming_the_tensor(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file({"head.weight": torch.tensor(1.0), "head.bias": torch.zeros(5)}, str(path))
    message = refusal(lambda: load_model("vit_tiny_patch16_224", checkpoint=path, **TINY), ModelLoadError)
    assert message.startswith(f"checkpoint {path}: tensor head.weight has shape [], but a classifier head's "
                              "weight is a [classes, features] matrix")
    model = load_model("vit_tiny_patch16_224", num_classes=5, **TINY)
    message = refusal(lambda: load_initial_weights(model, path, 5, reset_head=False), ModelLoadError)
    assert "tensor head.weight has shape []" in message
