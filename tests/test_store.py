"""The map store: keys change exactly when a map-determining setting changes, shards are
atomic, and a run killed half way resumes to the result of an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from hydra import compose, initialize_config_module

from wsol_bench.run.maps import build_transform, store_settings
from wsol_bench.run.store import MapStore, Shard, settings_key

SCRIPT = Path(sys.executable).parent / "wsol-bench"


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
    shard = Shard(index=1, maps=torch.rand(4, 2, 2), logits=torch.rand(4, 3), targets=torch.tensor([0, 1, 2, 0]),
                  positions=torch.arange(4, 8), image_ids=list("abcd"), skipped=[("e", "corrupt")],
                  target_source="given", class_specific=False)
    store.save(shard)
    assert store.missing(10) == [0, 2]
    back = store.load(1)
    assert torch.equal(back.maps, shard.maps) and back.image_ids == list("abcd")
    assert back.skipped == [("e", "corrupt")] and back.target_source == "given" and not back.class_specific
    assert not list(tmp_path.rglob("*.tmp"))
    with pytest.raises(FileNotFoundError, match="shard_000000"):
        store.load(0)


def _bench(args: list[str], cwd: Path, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([str(SCRIPT), *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kwargs)


def test_a_killed_run_resumes_to_the_uninterrupted_result(tmp_path):
    """SIGKILL a real run after some shards, rerun it: only the missing shards are explained
    and records equal an uninterrupted run's."""
    common = ["method=[agcam,center]", "dataset.params.num_images=40", "batch_size=4", "store.shard_size=4",
              "gallery_images=0", "progress=false"]
    cache = tmp_path / "cache"
    proc = _bench([*common, f"store.root={cache}", "hydra.run.dir=killed"], tmp_path)
    deadline = time.time() + 300
    while len(list(cache.rglob("shard_*.pt"))) < 6 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(list(cache.rglob("shard_*.pt")))
    assert 0 < done < 20, f"kill landed after {done} of 20 shards"
    resumed = _bench([*common, f"store.root={cache}", "hydra.run.dir=resumed"], tmp_path)
    out, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err[-3000:]
    straight = _bench([*common, f"store.root={tmp_path / 'fresh'}", "hydra.run.dir=straight"], tmp_path)
    _, err = straight.communicate(timeout=600)
    assert straight.returncode == 0, err[-3000:]
    a = pd.read_csv(tmp_path / "resumed" / "records.csv")
    b = pd.read_csv(tmp_path / "straight" / "records.csv")
    pd.testing.assert_frame_equal(a, b)
    assert len(list(cache.glob("*/shard_*.pt"))) == 20  # 10 shards x 2 methods, nothing twice
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
