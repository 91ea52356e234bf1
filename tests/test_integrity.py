"""Integrity: a cached or reported number is never stale, corrupt, partial or silently degenerate.
Each test reproduces one defect a careless or hostile user could meet, and checks the clear
error (one line, naming the setting or file) or the counted, reported skip that replaces it."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import forked_command, make_vit
from hydra import compose, initialize_config_module

from wsol_bench.cli.report import main as report_main
from wsol_bench.methods import Explainer
from wsol_bench.methods.registry import _REGISTRY
from wsol_bench.report.manifest import MANIFEST, incompleteness
from wsol_bench.run.folder import staging_folders
from wsol_bench.run.runner import run


def compose_cfg(tmp_path: Path, *overrides: str):
    with initialize_config_module(config_module="wsol_bench.conf", version_base="1.3"):
        return compose(config_name="config", overrides=[
            "method=[agcam,center]", "dataset.params.num_images=6", "batch_size=3", "store.shard_size=3",
            "gallery_images=0", "progress=false", f"store.root={tmp_path / 'cache'}", "run_name=test", *overrides])


# -- what a method returns ---------------------------------------------------------------------


class WrongGrid(Explainer):
    class_specific = False

    def explain(self, images, targets):
        logits = self.logits_only(images)
        return torch.rand(len(images), 3, 3), logits, self.resolve_targets(logits, targets)


class IntegerMaps(WrongGrid):
    def explain(self, images, targets):
        logits = self.logits_only(images)
        return torch.ones(len(images), *self.grid, dtype=torch.long), logits, self.resolve_targets(logits, targets)


class NanMaps(WrongGrid):
    def explain(self, images, targets):
        logits = self.logits_only(images)
        maps = torch.rand(len(images), *self.grid)
        maps[0] = float("nan")
        return maps, logits, self.resolve_targets(logits, targets)


def test_maps_of_the_wrong_grid_or_dtype_are_refused_naming_the_method():
    model = make_vit(0)  # a 4 x 4 grid
    images = torch.rand(2, 3, 32, 32)
    with pytest.raises(ValueError, match=r"returned maps torch.float32 \(2, 3, 3\), expected .* \(2, 4, 4\)"):
        WrongGrid(model)(images)
    with pytest.raises(ValueError, match="returned maps torch.int64"):
        IntegerMaps(model)(images)


def test_non_finite_maps_are_reported_and_kept_for_the_degenerate_count(caplog):
    out = NanMaps(make_vit(0))(torch.rand(3, 3, 32, 32))
    assert torch.isnan(out.maps[0]).all() and torch.isfinite(out.maps[1:]).all()
    assert "1 of 3 maps holds NaN or inf; it is scored as degenerate" in caplog.text


def test_non_finite_logits_are_an_error_naming_the_cause():
    """NaN weights would make every prediction class 0 (and label-0 images "correct")."""
    model = make_vit(0)
    with torch.no_grad():
        model.head.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"non-finite logits \(NaN or inf\) for 2 of 2 images.*preprocess.std"):
        _REGISTRY["center"](model)(torch.rand(2, 3, 32, 32))


def test_a_zero_std_is_refused_before_any_work(tmp_path, command):
    proc = command("wsol-bench", ["preprocess.std=[0,0,0]", "progress=false", f"store.root={tmp_path / 'c'}",
                  "hydra.run.dir=run"], tmp_path)
    assert proc.returncode == 2 and "preprocess.std=[0.0, 0.0, 0.0] holds a 0" in proc.stderr
    assert not (tmp_path / "c").exists() and "Traceback" not in proc.stderr


# -- settings ------------------------------------------------------------------------------------


@pytest.mark.parametrize("override, message", [
    ("metric.thresholds=[1.5]", "metric.thresholds=[1.5] holds [1.5]: thresholds are numbers in [0, 1]"),
    ("metric.thresholds=[-0.5]", "metric.thresholds=[-0.5] holds [-0.5]"),
    ("metric.thresholds=[0.5,nan]", "metric.thresholds=[0.5, nan] holds [nan]"),
    ("metric.thresholds=[]", "metric.thresholds is empty"),
    ("batch_size=0", "batch_size=0 must be at least 1"),
    ("batch_size=abc", "batch_size: Value 'abc' of type 'str' could not be converted to Integer"),
    ("seed=x", "seed: Value 'x' of type 'str' could not be converted to Integer"),
    ("metric.thresholds=x", "metric.thresholds"),
    ("dataset.params.num_images=many", "dataset.params.num_images"),
    ("device=tpu", "device='tpu' is not a device; valid: cpu, cuda, cuda:N"),
    ("preprocess.input_size=[100,100]", ("preprocess.input_size=[100, 100] does not fit wsol_synthetic_vit, "
                                         "which takes 224x224 images")),
    ("sweep=grid sweep.thresholds=[0.2,1.2]", "sweep.thresholds=[0.2, 1.2] holds [1.2]"),
    ("report.ci=1.5", "report.ci=1.5 must lie in (0, 1), e.g. 0.95; or null for no intervals"),
    ("report.resamples=1", "report.resamples=1 must be at least 2"),
    ("measure=[sparseness] +measure.sparseness.params.window=3",
     "measure 'sparseness' takes no parameter 'window'; valid: none"),
])
def test_bad_settings_are_one_line_errors_naming_the_setting(tmp_path, command, override, message):
    proc = command("wsol-bench", [*override.split(), "progress=false", f"store.root={tmp_path / 'c'}",
                                  "hydra.run.dir=run"], tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("wsol-bench: error: ") and message in lines[0], lines
    assert not (tmp_path / "c").exists()  # refused before any model pass


def test_cuda_without_cuda_is_named(tmp_path, command):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    proc = command("wsol-bench", ["device=cuda", "progress=false", "hydra.run.dir=run"], tmp_path)
    assert proc.returncode == 2 and "device=cuda: CUDA is not available on this machine; use device=cpu" in proc.stderr


def test_a_file_that_is_not_safetensors_is_named(tmp_path, command):
    fake = tmp_path / "weights.safetensors"
    fake.write_text("not a tensor file")
    proc = command("wsol-bench", [f"model.checkpoint={fake}", "progress=false",
                                  f"store.root={tmp_path / 'c'}", "hydra.run.dir=run"], tmp_path)
    assert proc.returncode == 2 and f"checkpoint {fake} is not a readable safetensors file" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_file_system_errors_are_one_line_naming_the_path(tmp_path, command):
    """A folder that cannot be written (here /sys, refused even to root) for the run or the cache."""
    for override, path in (("hydra.run.dir=/sys/wsol_bench_run", "/sys/wsol_bench_run"),
                           ("store.root=/sys/wsol_bench_cache", "/sys/wsol_bench_cache")):
        other = "hydra.run.dir=run" if "store" in override else "store.root=c"
        proc = command("wsol-bench", [override, "method=[center]", "dataset.params.num_images=2",
                                      "progress=false", other], tmp_path)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and f"cannot write {path}" in lines[0], proc.stderr


# -- degenerate maps -------------------------------------------------------------------------------


class ConstantMaps(WrongGrid):
    def explain(self, images, targets):
        logits = self.logits_only(images)
        return torch.ones(len(images), *self.grid), logits, self.resolve_targets(logits, targets)


@pytest.fixture
def registered(monkeypatch):
    """Register test explainers under names a config can select (without YAML: `+method.x={name:x}`)."""
    def add(name, cls):
        monkeypatch.setitem(_REGISTRY, name, cls)
        cls.name = name
    return add


def test_degenerate_maps_are_counted_and_an_all_degenerate_method_gets_no_numbers(tmp_path, registered, caplog):
    registered("const", ConstantMaps)
    registered("half_nan", NanMaps)
    cfg = compose_cfg(tmp_path, "method=[center]", "+method.const={name:const}",
                      "+method.half_nan={name:half_nan,params:{}}",
                      "faithfulness=abpc", "sweep=grid", "sweep.thresholds=[0.3,0.6]")
    tables = run(cfg, tmp_path / "run")
    box = pd.read_csv(tmp_path / "run" / "table_box.csv").set_index("method")
    assert box.loc["const", "n_degenerate"] == box.loc["const", "n_images"] > 0
    assert box.loc["const", ["Pixel Acc", "Precision", "ABPC", "MaxBoxAccV2", "PxAP"]].isna().all()
    assert box.loc["half_nan", "n_degenerate"] >= 1 and box.loc["center", "n_degenerate"] == 0
    assert not box.loc["half_nan", ["IoU", "ABPC"]].isna().any()
    faith = pd.read_csv(tmp_path / "run" / "faithfulness.csv")
    nan_rows = faith[faith["method"] == "half_nan"]
    assert nan_rows.loc[nan_rows["degenerate"] == 1, "abpc"].isna().all()  # no ABPC for a NaN map
    assert box.loc["half_nan", "n_images_abpc"] == (nan_rows["degenerate"] == 0).sum()
    markdown = (tmp_path / "run" / "table_box.md").read_text()
    assert "const: every map is degenerate" in markdown and "half_nan: " in markdown
    assert "const: every map is degenerate" in caplog.text
    assert tables.loc["const", "n_degenerate"].iloc[0] == box.loc["const", "n_images"]  # the correctly classified


# -- the map store ---------------------------------------------------------------------------------


def test_stale_maps_of_changed_images_are_never_scored(tmp_path):
    """A shard whose image ids differ from the dataset's images at its positions is refused."""
    cfg = compose_cfg(tmp_path, "method=[center]")
    run(cfg, tmp_path / "first")
    for shard in (tmp_path / "cache").rglob("shard_*.pt"):
        payload = torch.load(shard, weights_only=True)
        payload["image_ids"] = list(reversed(payload["image_ids"]))  # maps of "other" images
        from wsol_bench.run.store import payload_checksum
        payload["checksum"] = payload_checksum(payload)  # a consistent but stale shard
        torch.save(payload, shard)
    with pytest.raises(Exception, match="holds maps of other images"):
        run(cfg, tmp_path / "second")


def test_flipped_bytes_in_a_shard_are_recomputed_to_the_same_numbers(tmp_path, caplog):
    cfg = compose_cfg(tmp_path, "faithfulness=abpc")
    run(cfg, tmp_path / "first")
    shard = min((tmp_path / "cache").rglob("shard_000001.pt"))
    raw = bytearray(shard.read_bytes())
    middle = len(raw) // 2
    raw[middle:middle + 16] = bytes(b ^ 0x5A for b in raw[middle:middle + 16])
    shard.write_bytes(bytes(raw))
    run(cfg, tmp_path / "second")
    assert "shard_000001.pt is" in caplog.text and "recomputed" in caplog.text
    for name in ("records.csv", "faithfulness.csv"):
        pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "first" / name), pd.read_csv(tmp_path / "second" / name))


# -- the run folder --------------------------------------------------------------------------------


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_a_failed_rerun_leaves_the_previous_outputs_untouched(tmp_path, monkeypatch):
    out = tmp_path / "run"
    run(compose_cfg(tmp_path, "sweep=grid", "sweep.thresholds=[0.4]"), out)
    before = snapshot(out)
    assert incompleteness(out) is None and MANIFEST in before

    from wsol_bench.run.scorers.records import LocalizationRecords
    calls = []

    def crash_on_second_batch(self, method, part):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("simulated crash")
        return original(self, method, part)

    original = LocalizationRecords.add  # takes each batch's rows from the scoring pool
    monkeypatch.setattr(LocalizationRecords, "add", crash_on_second_batch)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(compose_cfg(tmp_path, "metric.thresholds=[0.3]"), out)
    assert snapshot(out) == before  # records, tables, states, run.json: all the previous run's
    assert not staging_folders(out)


def test_a_new_run_replaces_every_file_of_the_previous_one(tmp_path):
    out = tmp_path / "run"
    run(compose_cfg(tmp_path, "sweep=grid", "sweep.thresholds=[0.4]", "export_masks=true"), out)
    assert (out / "sweep.csv").is_file() and (out / "masks").is_dir()
    run(compose_cfg(tmp_path), out)
    assert not (out / "sweep.csv").exists() and not (out / "states" / "sweep.json").exists()
    assert not list((out / "masks").glob("*.json")) if (out / "masks").exists() else True
    assert incompleteness(out) is None


def _previous_run_with(out: Path, files) -> None:
    """A previous run.json in `out` whose file list is `files` (as a hostile or damaged one)."""
    import json

    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).write_text(json.dumps({"format": 1, "complete": True, "files": files, "inputs": {}}))


@pytest.mark.parametrize("listed", ["../victim.txt", "ABSOLUTE", ["config.yaml", 7]])
def test_a_previous_run_json_never_makes_a_run_touch_files_outside_its_folder(tmp_path, command, listed):
    """A run.json that lists a file outside the run folder (../ or an absolute path) or an entry
    that is not a file name is refused in one line before any work: the victim file and the
    run.json stay as they were."""
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    out = tmp_path / "run"
    files = [str(victim)] if listed == "ABSOLUTE" else [listed] if isinstance(listed, str) else listed
    _previous_run_with(out, files)
    before = (out / MANIFEST).read_text()
    result = command("wsol-bench", ["method=[center]", "dataset.params.num_images=2", "progress=false",
                                    f"store.root={tmp_path / 'c'}", f"hydra.run.dir={out}"], tmp_path)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and "run.json" in lines[0], result.stderr[-2000:]
    assert victim.read_text() == "keep me" and (out / MANIFEST).read_text() == before
    assert not (tmp_path / "c").exists()


def test_a_symlinked_subfolder_is_never_written_through(tmp_path):
    """A run folder whose states/ is a link into another run: the new run is refused naming the
    link, and the other run's states/sweep.json is untouched."""
    from wsol_bench.errors import InputFileError

    other = tmp_path / "other"
    run(compose_cfg(tmp_path, "sweep=grid", "sweep.thresholds=[0.4]"), other)
    kept = (other / "states" / "sweep.json").read_bytes()
    out = tmp_path / "run"
    out.mkdir()
    (out / "states").symlink_to(other / "states", target_is_directory=True)
    with pytest.raises(InputFileError, match="states is a symbolic link"):
        run(compose_cfg(tmp_path, "sweep=grid", "sweep.thresholds=[0.6]"), out)
    assert (other / "states" / "sweep.json").read_bytes() == kept and not (out / MANIFEST).exists()


def test_report_refuses_a_killed_runs_partial_records_unless_told(tmp_path, capsys):
    out = tmp_path / "run"
    run(compose_cfg(tmp_path), out)
    tables_before = (out / "table_box.md").read_text()
    (out / MANIFEST).unlink()  # as a kill before the end leaves it (records half written)
    text = (out / "records.csv").read_text()
    (out / "records.csv").write_text(text[: len(text) - 40])
    assert report_main([str(out), "--no-gallery"]) == 2
    err = capsys.readouterr().err
    assert "is not a complete run" in err and "--allow-incomplete" in err
    assert (out / "table_box.md").read_text() == tables_before  # nothing overwritten
    assert report_main([str(out), "--check"]) == 1
    assert report_main([str(out), "--no-gallery", "--allow-incomplete"]) == 0
    rebuilt = pd.read_csv(out / "table.csv")
    assert (rebuilt["n_total"] < 6).any()  # the half-written last row was dropped, not scored


def test_report_refuses_edited_inputs(tmp_path, capsys):
    out = tmp_path / "run"
    run(compose_cfg(tmp_path), out)
    records = pd.read_csv(out / "records.csv")
    records.loc[0, "box_iou"] = 1.0
    records.to_csv(out / "records.csv", index=False)
    assert report_main([str(out), "--no-gallery"]) == 2
    assert "records.csv changed after the run wrote it" in capsys.readouterr().err


# -- kill -9 at random moments ---------------------------------------------------------------------


@pytest.mark.slow  # runs started and SIGKILLed as processes, again and again: `pytest -m slow` (CI runs it)
def test_runs_killed_at_random_moments_finish_identical_to_an_uninterrupted_run(tmp_path, command):
    """Three kills (SIGKILL) of real runs at seeded points: while the first shards are explained
    and scored (ABPC), half way, and while the outputs are written; each rerun into the same
    folder resumes from the cache, and the final outputs and the faithfulness cache equal those
    of an uninterrupted run."""
    common = ["method=[rollout,center]", "dataset.params.num_images=8", "batch_size=2", "store.shard_size=2",
              "gallery_images=0", "progress=false", "faithfulness=abpc", "faithfulness.steps=5", "sweep=grid",
              "sweep.thresholds=[0.2,0.5,0.8]"]
    straight = command("wsol-bench", [*common, f"store.root={tmp_path / 'fresh'}", "hydra.run.dir=straight"],
                       tmp_path)
    assert straight.returncode == 0, straight.stderr[-2000:]
    cache, killed = tmp_path / "cache", tmp_path / "killed"

    def shards() -> int:  # map shards (4 shards x 2 methods x 2 target policies) and ABPC rows (x 2 methods)
        return len(list(cache.rglob("shard_*.*")))

    def writing() -> bool:  # the pass is over: the run writes its outputs into its staging folder
        return any((stage / "maps.json").exists() for stage in staging_folders(killed))

    rng = random.Random(7)
    first, middle = rng.randint(1, 6), rng.randint(10, 18)  # of the 24 shards
    # kill once these many shards are stored, and once the outputs are being written
    for reached in (lambda: shards() >= first, lambda: shards() >= middle, writing):
        child = forked_command("wsol-bench", [*common, f"store.root={cache}", "hydra.run.dir=killed"],
                               tmp_path)
        deadline = time.monotonic() + 300  # a hang guard: the whole run takes seconds
        while child.is_alive() and not reached() and time.monotonic() < deadline:
            time.sleep(0.005)
        with contextlib.suppress(ProcessLookupError):  # done (and reaped) before the kill: allowed below
            os.kill(child.pid, signal.SIGKILL)
        child.join(60)
        assert child.exitcode in (0, -signal.SIGKILL), child.exitcode  # killed, or done before the kill
    final = command("wsol-bench", [*common, f"store.root={cache}", "hydra.run.dir=killed"], tmp_path)
    assert final.returncode == 0, final.stderr[-2000:]
    for name in ("records.csv", "faithfulness.csv", "sweep.csv", "wsoleval.csv", "table_box.csv", "table.csv"):
        pd.testing.assert_frame_equal(pd.read_csv(killed / name), pd.read_csv(tmp_path / "straight" / name),
                                      obj=name)
    assert not staging_folders(killed)

    def faithfulness_cache(root: Path) -> dict[str, pd.DataFrame]:
        return {f"{p.parent.parent.name[:0]}{p.parent.name}/{p.name}": pd.read_csv(p)
                for p in sorted(root.rglob("faithfulness_*/shard_*.csv"))}

    cached, fresh = faithfulness_cache(cache), faithfulness_cache(tmp_path / "fresh")
    assert sorted(cached) == sorted(fresh) and cached
    for name in cached:
        pd.testing.assert_frame_equal(cached[name], fresh[name], obj=name)


# -- stale maps: the key identifies the data -------------------------------------------------------


def voc_tree(root: Path, ids: list[str]) -> None:
    """A VOC tree of single-class images with distinct content, `ids[:2]` in the val split."""
    from PIL import Image
    from test_voc import voc_dir, write_split, write_xml

    for seed, image_id in enumerate(ids):
        write_xml(root, image_id, [("cat" if seed % 2 else "dog", 2 + seed, 3, 24, 25)])
        path = voc_dir(root) / "JPEGImages" / f"{image_id}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np_rng(seed).integers(0, 255, (30, 40, 3), dtype="uint8")).save(path, quality=95)
    write_split(root, "Main", "val", ids[:2])


def np_rng(seed: int):
    import numpy as np
    return np.random.default_rng(seed)


def voc_cfg(tmp_path: Path, root: Path, cache: str, *overrides: str):
    with initialize_config_module(config_module="wsol_bench.conf", version_base="1.3"):
        return compose(config_name="config", overrides=[
            "dataset=voc", f"dataset.params.root={root}", "model.name=vit_tiny_patch16_224", "model.pretrained=false",
            "++model.kwargs={img_size:32,patch_size:8,embed_dim:24,depth:2,num_heads:3,num_classes:20}",
            "preprocess.input_size=[32,32]", "method=[agcam]", "metric.image_filter=all", "gallery_images=0",
            "progress=false", "run_name=test", f"store.root={tmp_path / cache}", *overrides])


def test_swapped_or_replaced_images_are_explained_again(tmp_path):
    """Swap two images' files, then replace one id of the split by another: each rerun on the warm
    cache gives exactly a fresh run's records, never the old images' maps."""
    from test_voc import voc_dir, write_split

    root, ids = tmp_path / "voc", ["2008_000001", "2008_000002", "2008_000004"]
    voc_tree(root, ids)
    first = run(voc_cfg(tmp_path, root, "cache"), tmp_path / "first")
    images = voc_dir(root) / "JPEGImages"
    a, b = images / f"{ids[0]}.jpg", images / f"{ids[1]}.jpg"
    data_a, data_b = a.read_bytes(), b.read_bytes()
    a.write_bytes(data_b)
    b.write_bytes(data_a)
    for step, name in ((0, "swapped"), (1, "replaced")):
        if step == 1:
            write_split(root, "Main", "val", [ids[0], ids[2]])
        warm = run(voc_cfg(tmp_path, root, "cache"), tmp_path / name)
        fresh = run(voc_cfg(tmp_path, root, f"fresh_{name}"), tmp_path / f"{name}_fresh")
        pd.testing.assert_frame_equal(pd.read_csv(tmp_path / name / "records.csv"),
                                      pd.read_csv(tmp_path / f"{name}_fresh" / "records.csv"))
        assert not warm.equals(first) and warm.equals(fresh)


def test_method_entries_added_on_the_command_line_are_checked(tmp_path, command):
    """A second configuration of a method can be added ad hoc; a malformed entry is named."""
    ok = command("wsol-bench", ["method=[center]",
                                "+method.agcam_mean={name:agcam,params:{head_fusion:mean}}",
                                "dataset.params.num_images=2", "progress=false",
                                f"store.root={tmp_path / 'c'}", "hydra.run.dir=run", "gallery_images=0"],
                 tmp_path)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert set(pd.read_csv(tmp_path / "run" / "records.csv")["method"]) == {"center", "agcam_mean"}
    for entry, message in (("+method.bad={nme:agcam}", "method.bad must be {name: <explainer>"),
                           ("+method.bad={name:agcam,parms:{}}", "unknown key method.bad.parms"),
                           ("+method.bad={name:agcam,params:{head_fusoin:mean}}",
                            "method 'agcam' takes no parameter 'head_fusoin'")):
        proc = command("wsol-bench", ["method=[center]", entry, "progress=false",
                                      f"store.root={tmp_path / 'd'}", "hydra.run.dir=bad"], tmp_path)
        assert proc.returncode == 2 and message in proc.stderr, (entry, proc.stderr[-1000:])


def test_a_cut_off_faithfulness_row_is_dropped_but_a_degenerate_one_is_kept(tmp_path, registered):
    """--allow-incomplete drops the half-written last row, never the rows of degenerate maps,
    whose scores are missing on purpose."""
    registered("half_nan", NanMaps)
    out = tmp_path / "run"
    run(compose_cfg(tmp_path, "method=[center]", "+method.half_nan={name:half_nan}", "faithfulness=abpc"), out)
    faith = pd.read_csv(out / "faithfulness.csv")
    assert (faith["degenerate"] == 1).sum() >= 1
    text = (out / "faithfulness.csv").read_text()
    (out / "faithfulness.csv").write_text(text[: len(text) - 30])  # the last row cut off
    (out / MANIFEST).unlink()
    from wsol_bench.report.run_folder import read_run
    partial = read_run(out, allow_incomplete=True).per_image_rows("faithfulness.csv")
    assert len(partial) == len(faith) - 1
    assert (partial["degenerate"] == 1).sum() == (faith["degenerate"] == 1).sum() - int(faith.iloc[-1]["degenerate"])
