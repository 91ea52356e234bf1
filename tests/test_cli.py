"""The `wsol-bench` command end to end: a small quickstart through the console script, its
outputs, and bad settings (those in this process, through the same entry point)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from wsol_bench.models import shipped_weights_path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = Path(sys.executable).parent / "wsol-bench"
# the method configs the package ships, as Hydra lists them
SHIPPED_METHODS = sorted(p.stem for p in (ROOT / "conf" / "method").glob("*.yaml"))


IMAGES = 10  # three batches of 4, the last one short


@pytest.fixture(scope="module")
def quickstart_run(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    """The installed console script itself, in a process of its own (the other tests of the
    command run it in this process)."""
    cwd = tmp_path_factory.mktemp("cli")
    args = ["method=[agcam,rollout,random,center]", f"dataset.params.num_images={IMAGES}", "batch_size=4",
            "metric.thresholds=[0.3,0.5]", "progress=false", "hydra.run.dir=run"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # one thread: the other test process has the other core
    proc = subprocess.run([str(SCRIPT), *args], cwd=cwd, capture_output=True, text=True, timeout=600,
                          check=False, env=env)
    return proc, cwd / "run"


def test_quickstart_writes_every_output(quickstart_run):
    """Records, table, maps, resolved config and environment land in the run folder."""
    proc, run = quickstart_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("records.csv", "table.csv", "config.yaml", "environment.json", "gallery.png", "maps.json",
                 "skipped.csv", "data.json"):
        assert (run / name).is_file(), name
    assert "Pixel Acc" in proc.stdout and "agcam" in proc.stdout and "rollout" in proc.stdout
    environment = (run / "environment.json").read_text()
    assert '"wsol_bench_code": "checkout"' in environment and str(ROOT) not in environment  # no machine path


def test_records_have_one_row_per_image_method_threshold(quickstart_run):
    """10 images x 4 methods x 2 thresholds rows, with every id, flag and metric column."""
    _, run = quickstart_run
    records = pd.read_csv(run / "records.csv")
    assert len(records) == IMAGES * 4 * 2
    assert records.groupby(["image_id", "method", "threshold"]).size().eq(1).all()
    for col in ("label", "prediction", "target", "target_source", "correct", "degenerate",
                "box_pixel_acc", "box_iou", "box_dice", "box_precision", "box_recall", "mask_iou"):
        assert col in records.columns, col
    assert (records["target"] == records["prediction"]).all()  # target policy: predicted
    assert records[["box_iou", "mask_iou"]].apply(lambda c: c.between(0, 1)).all().all()


def test_table_is_the_mean_of_correct_records(quickstart_run):
    """The table equals the records averaged over correctly classified images, in percent."""
    _, run = quickstart_run
    records = pd.read_csv(run / "records.csv")
    table = pd.read_csv(run / "table.csv")
    correct = records[records["correct"] == 1]
    for _, row in table.iterrows():
        sel = correct[(correct["method"] == row["method"]) & (correct["threshold"] == row["threshold"])]
        assert row["n_images"] == len(sel)
        for metric in ("box_iou", "box_dice", "mask_pixel_acc"):
            assert row[metric] == pytest.approx(100 * sel[metric].mean(), abs=1e-9)


def test_maps_are_cached_with_logits_and_targets(quickstart_run):
    """Each method's raw patch-grid maps are in the map store, in dataset order with its
    logits; maps.json says where."""
    import json

    import torch

    _, run = quickstart_run
    where = json.loads((run / "maps.json").read_text())
    assert sorted(where) == ["agcam", "center", "random", "rollout"]
    shards = sorted(Path(where["agcam"]["folder"]).glob("shard_*.pt"))
    payload = [torch.load(p, weights_only=True) for p in shards]
    maps = torch.cat([p["maps"] for p in payload])
    logits = torch.cat([p["logits"] for p in payload])
    assert maps.shape == (IMAGES, 14, 14) and logits.shape == (IMAGES, 6)
    records = pd.read_csv(run / "records.csv")
    agcam = records[(records["method"] == "agcam") & (records["threshold"] == 0.5)]
    assert list(agcam["image_id"]) == [i for p in payload for i in p["image_ids"]]
    assert list(agcam["prediction"]) == logits.argmax(1).tolist()


def test_unknown_names_list_the_valid_ones(tmp_path, command):
    """Unknown method (Hydra group), dataset or model names fail with the valid choices."""
    proc = command("wsol-bench", ["method=[agcam,nonexistent]"], tmp_path)
    assert proc.returncode == 2 and f"unknown method 'nonexistent'; valid: {', '.join(SHIPPED_METHODS)}" in proc.stderr
    proc = command("wsol-bench", ["dataset.name=imagenett", "progress=false"], tmp_path)
    assert proc.returncode == 2 and "valid: cub, imagenet, imagenet_segmentation, openimages, synthetic, synthetic_two_class, voc" in proc.stderr
    proc = command("wsol-bench", ["model.name=vit_nonexistent", "progress=false"], tmp_path)
    assert proc.returncode == 2 and "unknown model 'vit_nonexistent'" in proc.stderr
    proc = command("wsol-bench", ["model.checkpoint=missing/weights.safetensors", "progress=false"], tmp_path)
    assert proc.returncode == 2 and "missing/weights.safetensors" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = command("wsol-bench", ["progress=maybe"], tmp_path)
    assert proc.returncode == 2 and "progress='maybe' is not a valid setting" in proc.stderr
    proc = command("wsol-bench", ["sweep=grid", "sweep.boxes=contours", "progress=false",
                                  f"store.root={tmp_path / 'cache'}"], tmp_path)
    assert proc.returncode == 2 and "unknown sweep.boxes 'contours'; valid: opencv, components" in proc.stderr
    assert not (tmp_path / "cache").exists()  # refused before the model pass


def test_config_errors_are_one_line_naming_the_key(tmp_path, command):
    """The schemas refuse a typo'd key or a wrong type before any work: one line on stderr,
    exit code 2, no traceback; a key added with + is refused by the command the same way."""
    typo = ("wsol-bench: error: unknown key dataset.params.num_image; valid keys here: split, num_images, "
            "seed, image_size, version")
    cases = {"dataset.params.num_image=3": typo, "+dataset.params.num_image=3": typo,
             "batch_size=abc": "wsol-bench: error: batch_size: Value 'abc' of type 'str' could not be "
                               "converted to Integer"}
    for override, line in cases.items():
        proc = command("wsol-bench", [override, "progress=false", f"store.root={tmp_path / 'cache'}",
                                      "hydra.run.dir=run"], tmp_path)
        assert proc.returncode == 2 and proc.stderr.strip() == line, (override, proc.stderr[-3000:])
    assert not (tmp_path / "cache").exists()


def test_a_missing_mandatory_value_names_the_key(tmp_path, command):
    """A preset's `???` survives the schemas and still gets the friendly message."""
    proc = command("wsol-bench", ["experiment=paper_imagenet", "progress=false", "hydra.run.dir=run"],
                   tmp_path)
    assert proc.returncode == 2
    assert "wsol-bench: error: dataset.params.root is required by this preset" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_class_count_mismatch_names_the_numbers(tmp_path, command):
    """A 1000-class model on the 6-class synthetic dataset is refused before any work."""
    proc = command("wsol-bench", ["model.name=vit_tiny_patch16_224", "model.pretrained=false",
                                  "progress=false", f"store.root={tmp_path / 'cache'}"], tmp_path)
    assert proc.returncode == 2
    assert "1000 classes" in proc.stderr and "has 6" in proc.stderr
    assert not (tmp_path / "cache").exists()


def test_help_lists_the_shipped_method_configs(tmp_path, command):
    """--help names every method config of the package (the installed copy's own --help and
    runs are tested in test_packaging.py)."""
    proc = command("wsol-bench", ["--help"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert f"method: {', '.join(SHIPPED_METHODS)}" in proc.stdout


def test_shipped_weights_are_small():
    """The shipped model is a few MB of safetensors inside the package."""
    path = shipped_weights_path("wsol_synthetic_vit")
    assert path.is_file() and path.stat().st_size < 10 * 2**20


def test_multirun_sweeps_a_parameter(tmp_path, command):
    """`-m` runs one job per value, each with its own run folder and table."""
    # no hydra.sweep.dir: the default sweep folder
    proc = command("wsol-bench", ["-m", "method=[center]", "method.center.params.sigma=0.2,0.4",
                                  "dataset.params.num_images=8", "progress=false"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (sweep,) = (tmp_path / "results" / "multirun").iterdir()
    names = [f"{i}_quickstart_dataset.params.num_images=8,method.center.params.sigma={s},method=[center]"
             for i, s in ((0, 0.2), (1, 0.4))]  # the job's number, the preset, the job's settings
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == names
    tables = [pd.read_csv(sweep / name / "table.csv") for name in names]
    assert all(list(t["method"]) == ["center"] for t in tables)
    assert tables[0]["box_iou"].iloc[0] != tables[1]["box_iou"].iloc[0]


def test_summary_mode_counts_the_dataset_without_a_model(tmp_path, command):
    """mode=summary prints and writes the dataset's counts and its ground-truth coverage map
    (the synthetic items are loaded, so the coverage is mapped) and loads no model."""
    import json

    proc = command("wsol-bench", ["mode=summary", "dataset.params.num_images=12",
                                  "model.checkpoint=/does/not/exist", "hydra.run.dir=s"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((tmp_path / "s" / "summary.json").read_text())
    assert summary["images"] == 12 and "12 images" in proc.stdout
    assert len(summary["coverage"]["grid"]) == 32 and (tmp_path / "s" / "coverage.png").stat().st_size > 0
    assert "ground-truth coverage:" in proc.stdout
