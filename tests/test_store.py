"""The map store: keys change exactly when a map-determining setting changes, shards are
atomic, and a run killed half way resumes to the result of an uninterrupted run."""

from __future__ import annotations

import errno
import json
import os
import signal
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import forked_command
from hydra import compose, initialize_config_module

from wsol_bench.errors import DiskFullError
from wsol_bench.run.maps import build_transform, store_settings
from wsol_bench.run.store import InvalidShard, MapStore, Shard, settings_key


def _cfg(*overrides: str):
    with initialize_config_module(config_module="wsol_bench.conf", version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def _key(*overrides: str) -> str:
    cfg = _cfg(*overrides)
    return settings_key(store_settings(cfg, build_transform(cfg), "agcam", cfg.target))


def test_key_changes_with_every_setting_that_changes_maps():
    base = _key()
    for override in ("dataset.params.num_images=10", "dataset.params.seed=1", "dataset=synthetic_two_class",
                     "preprocess.input_size=[112,112]", "preprocess.mean=[0.4,0.4,0.4]",
                     "preprocess.interpolation=bicubic", "preprocess.resize=timm", "method.agcam.params.head_fusion=mean",
                     "target=label", "model=vit_base_orig"):
        assert _key(override) != base, override


def test_key_ignores_settings_that_do_not_change_maps():
    base = _key()
    for override in ("metric.thresholds=[0.2,0.7]", "metric.box_protocol=exact", "batch_size=3",
                     "num_workers=1", "progress=false", "gallery_images=0", "store.shard_size=7",
                     "metric.image_filter=all", "method=[agcam]"):
        assert _key(override) == base, override


def test_key_follows_checkpoint_content_not_its_path(tmp_path):
    a, b = tmp_path / "a.bin", tmp_path / "b.bin"
    a.write_bytes(b"weights-1")
    b.write_bytes(b"weights-1")
    ka = _key(f"model.checkpoint={a}")
    assert ka == _key(f"model.checkpoint={b}")
    b.write_bytes(b"weights-2")
    assert _key(f"model.checkpoint={b}") != ka


def test_shards_round_trip_and_report_what_is_missing(tmp_path):
    store = MapStore(tmp_path, {"x": 1}, shard_size=4)
    assert store.num_shards(10) == 3 and store.missing(10) == [0, 1, 2]
    assert list(store.shard_positions(2, 10)) == [8, 9]
    # positions 4..7: three usable items and one the dataset skipped
    shard = Shard(index=1, maps=torch.rand(3, 2, 2), logits=torch.rand(3, 3), targets=torch.tensor([0, 1, 2]),
                  positions=torch.tensor([4, 5, 7]), image_ids=list("abd"), skipped=[("c", "corrupt")],
                  target_source="given", class_specific=False)
    store.save(shard)
    assert store.missing(10) == [0, 2]
    back = store.load(1, 10)
    assert torch.equal(back.maps, shard.maps) and back.image_ids == list("abd")
    assert back.skipped == [("c", "corrupt")] and back.target_source == "given" and not back.class_specific
    assert back.rows_at([5, 7], ["b", "d"]).tolist() == [1, 2]
    with pytest.raises(InvalidShard, match="holds maps of other images"):
        back.rows_at([5], ["x"])
    assert not list(tmp_path.rglob("*.tmp"))
    with pytest.raises(InvalidShard, match="shard_000000.pt is missing"):
        store.load(0)


def _saved_store(tmp_path, key=None, grid=(2, 2)) -> tuple[MapStore, Shard]:
    store = MapStore(tmp_path, key or {"method": "a"}, shard_size=4, grid=grid)
    shard = Shard(index=0, maps=torch.rand(4, 2, 2), logits=torch.rand(4, 3), targets=torch.tensor([0, 1, 2, 0]),
                  positions=torch.arange(4), image_ids=list("abcd"), skipped=[])
    store.save(shard)
    return store, shard


def _edit(path: Path, change) -> None:
    """Rewrite a stored shard's payload with `change` applied, keeping its (now wrong) checksum."""
    payload = torch.load(path, weights_only=True)
    change(payload)
    torch.save(payload, path)


EDITS = {
    "negated": lambda p: p.update(maps=-p["maps"]),
    "nan": lambda p: p["maps"].__setitem__((0, 0, 0), float("nan")),
    "shuffled": lambda p: p.update(maps=p["maps"][[1, 0, 2, 3]]),
    "other ids": lambda p: p.update(image_ids=list("wxyz")),
    "no logits": lambda p: p.pop("logits"),
}


@pytest.mark.parametrize("edit", sorted(EDITS))
def test_an_edited_shard_is_reported_and_recomputed(tmp_path, edit, caplog):
    store, _ = _saved_store(tmp_path)
    _edit(store.shard_path(0), EDITS[edit])
    with pytest.raises(InvalidShard, match="shard_000000.pt is invalid"):
        store.load(0, 4)
    assert store.missing(4) == [0] and not store.shard_path(0).exists()
    assert "shard_000000.pt is invalid" in caplog.text and "recomputed" in caplog.text


@pytest.mark.parametrize("damage", ["truncated", "zero bytes", "flipped bytes", "not a torch file"])
def test_a_damaged_shard_file_is_reported_and_recomputed(tmp_path, damage, caplog):
    store, _ = _saved_store(tmp_path)
    path = store.shard_path(0)
    data = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "zero bytes":
        path.write_bytes(b"")
    elif damage == "flipped bytes":  # inside the maps' storage: the file still loads, the checksum fails
        raw = bytearray(data)
        start = raw.index(torch.load(path, weights_only=True)["maps"].numpy().tobytes()[:16])
        raw[start:start + 8] = bytes(b ^ 0xFF for b in raw[start:start + 8])
        path.write_bytes(bytes(raw))
    else:
        path.write_text("maps")
    assert store.missing(4) == [0] and not path.exists()
    assert "shard_000000.pt is" in caplog.text


def test_a_shard_of_another_store_or_grid_is_refused(tmp_path):
    """A shard copied from another method's (or target policy's) folder carries that store's key;
    a shard on another grid than the model's is refused too."""
    other, _ = _saved_store(tmp_path / "a", key={"method": "b", "target_policy": "label"})
    store = MapStore(tmp_path / "b", {"method": "a"}, shard_size=4, grid=(2, 2))
    store.folder.mkdir(parents=True)
    store.shard_path(0).write_bytes(other.shard_path(0).read_bytes())
    with pytest.raises(InvalidShard, match="belongs to the store"):
        store.load(0, 4)
    wrong_grid = MapStore(tmp_path / "a", {"method": "b", "target_policy": "label"}, shard_size=4, grid=(3, 3))
    with pytest.raises(InvalidShard, match=r"\(2, 2\) grid, expected \(3, 3\)"):
        wrong_grid.load(0, 4)
    with pytest.raises(InvalidShard, match="not the 3 items of shard 0 of a 3-item dataset"):
        other.load(0, 3)  # the dataset shrank: shard 0 now covers 3 items, the stored one 4


def test_a_killed_run_resumes_to_the_uninterrupted_result(tmp_path, command):
    """SIGKILL a real run after some shards, rerun it: only the missing shards are explained
    and records equal an uninterrupted run's."""
    common = ["method=[rollout,center]", "dataset.params.num_images=20", "batch_size=4", "store.shard_size=4",
              "gallery_images=0", "progress=false"]
    cache = tmp_path / "cache"
    child = forked_command("wsol-bench", [*common, f"store.root={cache}", "hydra.run.dir=killed"], tmp_path)
    deadline = time.monotonic() + 300  # a hang guard: the whole run takes seconds
    while len(list(cache.rglob("shard_*.pt"))) < 4 and child.is_alive() and time.monotonic() < deadline:
        time.sleep(0.005)
    os.kill(child.pid, signal.SIGKILL)
    child.join(60)
    done = len(list(cache.rglob("shard_*.pt")))
    assert child.exitcode == -signal.SIGKILL and 0 < done < 10, f"kill landed after {done} of 10 shards"
    resumed = command("wsol-bench", [*common, f"store.root={cache}", "hydra.run.dir=resumed"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    straight = command("wsol-bench", [*common, f"store.root={tmp_path / 'fresh'}", "hydra.run.dir=straight"],
                       tmp_path)
    assert straight.returncode == 0, straight.stderr[-3000:]
    a = pd.read_csv(tmp_path / "resumed" / "records.csv")
    b = pd.read_csv(tmp_path / "straight" / "records.csv")
    pd.testing.assert_frame_equal(a, b)
    assert len(list(cache.glob("*/shard_*.pt"))) == 10  # 5 shards x 2 methods, nothing twice
    maps_a = torch.cat([torch.load(p, weights_only=True)["maps"] for p in sorted(cache.glob("*/shard_*.pt"))])
    maps_b = torch.cat([torch.load(p, weights_only=True)["maps"]
                        for p in sorted((tmp_path / "fresh").glob("*/shard_*.pt"))])
    assert torch.equal(maps_a, maps_b)


def test_the_key_follows_the_package_version_and_the_explainers_source(tmp_path, monkeypatch):
    """Editing an explainer's module changes its source digest and so the map-store key."""
    import importlib
    import sys

    from wsol_bench.methods import Explainer
    from wsol_bench.methods.registry import source_digest

    module = tmp_path / "edited_method.py"
    body = ("from wsol_bench.methods import Explainer\n\n"
            "class Edited(Explainer):\n    def explain(self, images, targets):\n        return {}\n")
    module.write_text(body)
    monkeypatch.syspath_prepend(str(tmp_path))
    first = source_digest(importlib.import_module("edited_method").Edited)
    module.write_text(body.replace("return {}", "return {'changed': 1}"))
    second = source_digest(importlib.reload(sys.modules["edited_method"]).Edited)
    assert first != second and issubclass(sys.modules["edited_method"].Edited, Explainer)

    cfg = _cfg()
    settings = store_settings(cfg, build_transform(cfg), "agcam", cfg.target)
    assert set(settings["code"]) == {"wsol_bench", "method"} and settings["code"]["wsol_bench"]
    import wsol_bench.run.maps as maps
    monkeypatch.setattr(maps, "package_version", lambda: "9.9.9")
    assert settings_key(store_settings(cfg, build_transform(cfg), "agcam", cfg.target)) != settings_key(settings)


def test_a_full_disk_leaves_no_temporary_file_and_names_the_shard_and_its_size(tmp_path, monkeypatch):
    store = MapStore(tmp_path, {"method": "a"}, shard_size=4)
    shard = Shard(index=0, maps=torch.rand(4, 2, 2), logits=torch.rand(4, 3), targets=torch.zeros(4, dtype=torch.long),
                  positions=torch.arange(4), image_ids=list("abcd"), skipped=[])
    real_write = Path.write_bytes

    def full_disk(path, data):  # the disk fills up half way through the write
        real_write(path, data[:len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", full_disk)
    with pytest.raises(DiskFullError, match=r"cannot write .*shard_000000\.pt: the disk is full .* needs about") as info:
        store.save(shard)
    assert isinstance(info.value, OSError) and info.value.errno == errno.ENOSPC
    assert "\n" not in str(info.value)
    assert not store.shard_path(0).exists()
    assert [p.name for p in store.folder.iterdir()] == ["settings.json"]  # no .tmp left behind
    monkeypatch.setattr(Path, "write_bytes", real_write)
    store.save(shard)  # space again: the same store takes the shard
    assert store.load(0, 4).image_ids == list("abcd")


def test_rescoring_with_an_all_skipped_shard_builds_no_model(tmp_path, monkeypatch, caplog):
    """A shard whose images are all unreadable is stored with the store's map shape, for a grid
    method (agcam) and a pixel method (saliency): a re-scoring run over every stored map never
    loads the model (loading raises here), warns of no invalid shard and gives the same records."""
    from test_integrity import voc_cfg, voc_tree
    from test_voc import voc_dir, write_split

    import wsol_bench.run.maps as maps
    from wsol_bench.run.runner import run

    root, ids = tmp_path / "voc", ["2008_000001", "2008_000002", "2008_000004"]
    voc_tree(root, ids)
    write_split(root, "Main", "val", ids)
    for image_id in ids[:2]:  # shard 0 (two images a shard) has nothing to explain
        (voc_dir(root) / "JPEGImages" / f"{image_id}.jpg").write_bytes(b"not a jpeg")
    overrides = ["method=[agcam,saliency]", "store.shard_size=2"]
    cfg = voc_cfg(tmp_path, root, "cache", *overrides)
    run(cfg, tmp_path / "first")
    where = json.loads((tmp_path / "first" / "maps.json").read_text())
    assert {m: len(list(Path(e["folder"]).glob("shard_*.pt"))) for m, e in where.items()} == {"agcam": 2, "saliency": 2}

    def no_model(*args, **kwargs):
        raise AssertionError("a re-scoring run loaded the model")

    monkeypatch.setattr(maps, "load_model", no_model)
    caplog.clear()
    run(voc_cfg(tmp_path, root, "cache", *overrides), tmp_path / "again")
    assert "recomputed" not in caplog.text and "expected" not in caplog.text
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "first" / "records.csv"),
                                  pd.read_csv(tmp_path / "again" / "records.csv"))
    assert len(pd.read_csv(tmp_path / "again" / "skipped.csv")) == 2
