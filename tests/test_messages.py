"""What the commands say, said once and said right: a refusal is one line on stderr (once per
sweep job, once per torchrun launch), a SLURM launcher without SLURM and an offline hub model
are refused at once, and the texts under the tables name the model's weights, the skipped
items and every count correctly."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.multiprocessing as mp
from omegaconf import OmegaConf
from test_errors import TINY_TRAIN
from test_imagenet import ITEMS, TENCH, Item, build_kaggle
from test_report import hand_run, mark_complete

from wsol_bench.cli.errors import says_refusal
from wsol_bench.config.checks import check_launcher
from wsol_bench.datasets.base import skipped_summary
from wsol_bench.errors import SettingError, agreeing, counted
from wsol_bench.models import loading
from wsol_bench.models.loading import ModelLoadError, load_model, weights_label
from wsol_bench.report.paper_numbers import PAPER_MODEL, published_numbers
from wsol_bench.run.run_tables import run_tables
from wsol_bench.run.scorers.faithfulness import coverage_notes
from wsol_bench.run.scorers.perturbation import unscored_notes
from wsol_bench.run.scorers.records import degenerate_notes

BAD_BATCH = "batch_size=0 must be at least 1"
HUB_MODEL = "deit_tiny_patch16_224.fb_in1k"  # a small ViT whose tag has both a hub repo and a download URL


# -- each refusal once, on stderr -------------------------------------------------------------------

def test_a_refused_sweep_job_is_said_once_on_stderr(command, tmp_path):
    """A job of a sweep (Hydra's own launcher, in this process) refused by a setting: its line
    is on stderr once, not also as a log line on stdout; the job's log file keeps it."""
    result = command("wsol-bench", ["-m", "batch_size=0", "method=[center]", "progress=false",
                                    f"hydra.sweep.dir={tmp_path / 'sweep'}"], tmp_path)
    assert result.returncode == 2, result.stderr[-3000:]
    assert BAD_BATCH not in result.stdout, result.stdout
    assert result.stderr.count(BAD_BATCH) == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == f"wsol-bench: error: {BAD_BATCH}"
    (log,) = (tmp_path / "sweep").glob("*/wsol-bench.log")
    assert f"[wsol_bench][ERROR] - {BAD_BATCH}" in log.read_text()


def test_a_refused_single_run_is_said_once_on_stderr(command, tmp_path):
    result = command("wsol-bench", ["batch_size=0", "hydra.run.dir=run"], tmp_path)
    assert result.returncode == 2 and result.stderr.strip() == f"wsol-bench: error: {BAD_BATCH}"
    assert BAD_BATCH not in result.stdout


def test_torchrun_ranks_say_a_refusal_once_and_exit_with_its_code(tmp_path):
    """torchrun with two CPU ranks, refused by a setting: rank 0 prints the line once, and both
    ranks exit with code 2 (not killed by torchrun's SIGTERM once the first has ended)."""
    env = {k: v for k, v in os.environ.items() if k not in ("HYDRA_FULL_ERROR", "WSOL_BENCH_DEBUG")}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           "-m", "wsol_bench", "batch_size=0", "hydra.run.dir=run"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300, env=env, check=False)
    assert proc.returncode != 0
    assert proc.stderr.count(f"wsol-bench: error: {BAD_BATCH}") == 1, proc.stderr[-3000:]
    assert BAD_BATCH not in proc.stdout
    # torchrun's own summary of the failed ranks (it prints one for any non-zero exit): both with code 2
    assert proc.stderr.count("exitcode  : 2 ") == 2, proc.stderr[-3000:]


def _refusal_worker(rank: int, lines: list[str], init: str, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=len(lines))
    try:
        Path(f"{out}.{rank}").write_text(json.dumps(says_refusal(lines[rank])))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize(("lines", "said"), [(["a", "a"], [True, False]), (["a", "b"], [True, True])])
def test_ranks_agree_on_who_says_a_refusal(tmp_path, lines, said):
    """Rank 0 says a refusal every rank shares; another rank says its own only when rank 0's
    line differs (a refusal of that rank alone)."""
    out = str(tmp_path / "said")
    mp.start_processes(_refusal_worker, args=(lines, f"file://{tmp_path / 'rendezvous'}", out),
                       nprocs=len(lines), start_method="fork")
    assert [json.loads(Path(f"{out}.{r}").read_text()) for r in range(len(lines))] == said


# -- a SLURM launcher without SLURM -------------------------------------------------------------------

def test_a_slurm_sweep_without_sbatch_is_one_line_before_submitit(command, monkeypatch, tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="the cluster extra is not installed")
    submitit = pytest.importorskip("submitit")

    def never(*args, **kwargs):
        raise AssertionError("submitit was called")

    monkeypatch.setattr(submitit.AutoExecutor, "__init__", never)
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))  # no sbatch on it
    result = command("wsol-bench", ["-m", "hydra/launcher=submitit_slurm", "method=[center]",
                                    f"hydra.sweep.dir={tmp_path / 'sweep'}"], tmp_path)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    for needle in ("hydra/launcher=submitit_slurm", "sbatch", "not found", "hydra/launcher=submitit_local",
                   "hydra/launcher=joblib", "SLURM login node"):
        assert needle in lines[0], needle


def test_the_launcher_check_needs_a_sweep_and_a_missing_program(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    check_launcher(["hydra/launcher=submitit_slurm"])  # a single run never starts the launcher
    check_launcher(["-m", "hydra/launcher=submitit_local"])
    with pytest.raises(SettingError, match="sbatch"):
        check_launcher(["--multirun", "+hydra/launcher=submitit_slurm"])
    sbatch = tmp_path / "sbatch"
    sbatch.write_text("#!/bin/sh\n")
    sbatch.chmod(0o755)
    check_launcher(["-m", "hydra/launcher=submitit_slurm"])  # on a SLURM machine


# -- an offline hub model fails fast ------------------------------------------------------------------

@pytest.fixture
def offline_machine(monkeypatch, tmp_path):
    """Empty weight caches, no proxy, and no network: a name lookup fails the test."""
    import huggingface_hub.constants

    def no_network(*args, **kwargs):
        lookups.append(args[:1])  # kept too: library code may swallow the error below
        raise AssertionError("the network was used")

    lookups: list = []

    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    loading.hub_unreachable.cache_clear()
    yield tmp_path
    loading.hub_unreachable.cache_clear()
    assert lookups == [], f"a name lookup was tried: {lookups}"


def test_hf_hub_offline_refuses_a_missing_pretrained_model_at_once(offline_machine, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError) as refused:
        load_model(HUB_MODEL, pretrained=True)
    message = str(refused.value)
    assert "could not be fetched (HF_HUB_OFFLINE is set)" in message, message
    assert "timm/deit_tiny_patch16_224.fb_in1k" in message and "TORCH_HOME/hub/checkpoints" in message
    # at once: no name lookup was tried (the fixture's getaddrinfo fails the test), so no retries


def test_an_unreachable_hub_is_detected_once_and_refused_at_once(offline_machine, monkeypatch):
    tries = []

    def unresolved(address, timeout=None):
        tries.append(address)
        raise socket.gaierror(-2, "Name or service not known")

    monkeypatch.setattr(socket, "create_connection", unresolved)
    for _ in range(2):
        with pytest.raises(ModelLoadError, match=r"could not be fetched \(offline: .*:443 cannot be reached "
                                                 r"\(Name or service not known\)\)\. Offline, copy"):
            load_model(HUB_MODEL, pretrained=True)
    assert len(tries) == 1  # checked once per process


def test_offline_a_local_copy_of_the_weights_is_loaded(offline_machine, monkeypatch):
    """Offline, the tag's weights come from the hub cache or timm's download folder."""
    import timm
    from safetensors.torch import save_file

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = timm.models.get_pretrained_cfg(HUB_MODEL)
    torch.manual_seed(1)
    saved = timm.create_model(HUB_MODEL, pretrained=False).state_dict()
    download = offline_machine / "torch" / "hub" / "checkpoints" / cfg.url.rsplit("/", 1)[-1]
    download.parent.mkdir(parents=True)
    torch.save(saved, download)
    model = load_model(HUB_MODEL, pretrained=True)
    assert torch.equal(model.state_dict()["head.weight"], saved["head.weight"])

    torch.manual_seed(2)
    hub = timm.create_model(HUB_MODEL, pretrained=False).state_dict()
    repo = offline_machine / "hf" / f"models--{cfg.hf_hub_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    (repo / "snapshots" / ("0" * 40)).mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in hub.items()}, str(repo / "snapshots" / ("0" * 40) / "model.safetensors"))
    model = load_model(HUB_MODEL, pretrained=True)  # the hub cache comes first, as timm's own order
    assert torch.equal(model.state_dict()["head.weight"], hub["head.weight"])


# -- the weights a table names --------------------------------------------------------------------------

def run_of_model(folder: Path, dataset: str, model: dict) -> Path:
    """A complete hand-made run folder (test_report.hand_run) whose config's model is `model`."""
    run = hand_run(folder, dataset, model["name"])
    config = OmegaConf.load(run / "config.yaml")
    config.model = model
    OmegaConf.save(config, run / "config.yaml")
    return mark_complete(run)


def test_random_weights_get_no_published_row(tmp_path):
    """A paper-model run with model.pretrained=false names its random weights and shows no
    published row, with a note saying why; a copy of the published file as checkpoint keeps it."""
    random = run_of_model(tmp_path / "random", "imagenet", {"name": PAPER_MODEL, "pretrained": False})
    box = run_tables(random)["box"]
    assert "agcam (published)" not in box["method"].tolist()
    assert f"model {PAPER_MODEL} with random weights (model.pretrained=false)" in box.attrs["caption"]
    (note,) = [n for n in box.attrs["notes"] if "published" in n]
    assert note.startswith("No published row") and "random weights" in note and "do not apply" in note
    other = {"name": PAPER_MODEL, "pretrained": False, "checkpoint": "/data/mine.safetensors"}
    mine = run_tables(run_of_model(tmp_path / "mine", "imagenet", other))["box"]
    assert "agcam (published)" not in mine["method"].tolist()
    assert published_numbers("imagenet", "val", PAPER_MODEL, pretrained=False,
                             checkpoint="/weights/jx_vit_base_p16_224-80ecf9dd.pth")


def test_a_trained_checkpoint_is_named_as_the_users_not_the_shipped_model(command, tmp_path):
    """wsol-bench-train records what it trained in the weights file; a run with that file names
    it as the user's checkpoint with its epochs, wherever the file was moved."""
    out = tmp_path / "trained"
    result = command("wsol-bench-train", [*TINY_TRAIN, f"out_dir={out}", f"cache_dir={tmp_path / 'cache'}"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    moved = tmp_path / "elsewhere.safetensors"
    (out / "model.safetensors").rename(moved)
    run = run_of_model(tmp_path / "run", "synthetic",
                       {"name": "wsol_synthetic_vit", "pretrained": False, "checkpoint": str(moved)})
    caption = run_tables(run)["box"].attrs["caption"]
    expected = (f"model wsol_synthetic_vit with your checkpoint {moved} (wsol-bench-train: 1 epoch on "
                "synthetic/train, val acc ")
    assert expected in caption and "not the shipped weights), target predicted." in caption, caption
    assert weights_label("wsol_synthetic_vit", pretrained=False, checkpoint=moved) in caption
    assert weights_label("wsol_synthetic_vit") == "wsol_synthetic_vit"  # the shipped weights: the name alone


# -- counts in agreement ----------------------------------------------------------------------------------

def test_counted_and_agreeing():
    assert [counted(n, "map") for n in (0, 1, 2, 49997)] == ["0 maps", "1 map", "2 maps", "49,997 maps"]
    assert counted(1, "box", "boxes") == "1 box" and counted(3.0, "box", "boxes") == "3 boxes"
    assert agreeing(1, "is", "are") == "is" and agreeing(2, "is", "are") == "are"


def test_one_degenerate_map_is_worded_in_the_singular():
    records = pd.DataFrame({"method": ["gradcam"] * 3 + ["rollout"] * 3, "threshold": 0.5,
                            "image_id": ["a", "b", "c"] * 2, "degenerate": [1, 0, 0, 1, 1, 0]})
    assert degenerate_notes(records, []) == [
        ("gradcam: 1 of 3 maps is degenerate (constant or NaN/inf); it counts as an empty prediction here "
         "(n_degenerate)."),
        ("rollout: 2 of 3 maps are degenerate (constant or NaN/inf); they count as empty predictions here "
         "(n_degenerate).")]
    rows = records[records["image_id"] != "c"].assign(degenerate=[1, 0, 0, 0])
    assert coverage_notes(rows, records) == [
        "faithfulness.csv covers 2 of 3 images for gradcam.", "faithfulness.csv covers 2 of 3 images for rollout.",
        "gradcam: ABPC averages 1 of 2 images; 1 ground-truth-class map is degenerate and has no curve."]
    assert unscored_notes(rows, records, "roads.csv", "ROAD")[-1] == \
        "gradcam: ROAD averages 1 of 2 images; 1 map is degenerate and has no score."


def test_skipped_items_are_counted_out_of_every_item_read(command, tmp_path):
    """An ImageNet tree whose annotation file lists 5 images of which 3 are on disk: the run
    says 2 of 5 items were skipped and 3 used (not "2 of 3")."""
    root = tmp_path / "imagenet"
    missing = [Item(f"ILSVRC2012_val_0000000{i}", TENCH, (20, 20), [[1, 1, 9, 9]]) for i in (4, 5)]
    build_kaggle(root, ITEMS + missing)
    for item in missing:
        (root / "ILSVRC/Data/CLS-LOC/val" / f"{item.image_id}.JPEG").unlink()
    result = command("wsol-bench", [
        "dataset=imagenet", f"dataset.params.root={root}", "model.name=vit_tiny_patch16_224",
        "model.pretrained=false", "++model.kwargs.depth=1", "method=[center]", "metric.image_filter=all",
        "progress=false", "gallery_images=0", "num_workers=0", "scoring_workers=0",
        f"store.root={tmp_path / 'cache'}", "hydra.run.dir=run"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "skipped 2 of 5 items (image file missing: 2), 3 used; see skipped.csv" in result.stdout, result.stdout
    assert skipped_summary(["image file missing"], 1) == \
        "skipped 1 of 1 item (image file missing: 1), 0 used; see skipped.csv"
    assert "with random weights (model.pretrained=false)" in (tmp_path / "run" / "table_box.md").read_text()


# -- a method parameter's hint ------------------------------------------------------------------------------

def test_an_unknown_method_parameter_lists_the_valid_ones(command, tmp_path):
    """`method.agcam.params.foo=1` is answered with AG-CAM's parameters, not with the advice to
    add the key with + (which the run would then refuse); a parameter the explainer takes but
    its YAML leaves out is still to be added with +."""
    result = command("wsol-bench", ["method=[agcam]", "method.agcam.params.foo=1", "hydra.run.dir=run"], tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == ("wsol-bench: error: method 'agcam' takes no parameter 'foo'; valid: "
                                     "head_fusion, layer_fusion")
    taken = command("wsol-bench", ["method=[rollout]", "method.rollout.params.start_layer=1", "hydra.run.dir=run"],
                    tmp_path)
    assert "add it with +method.rollout.params.start_layer=1" in taken.stderr
