"""Data-parallel runs: the split of shards over ranks, metric states summed across a gloo
process group, the scoring pool's worker processes, and `torchrun` with two CPU processes,
whose run folder must equal a one-process run's (made in this process)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hydra import compose, initialize_config_module

from wsol_bench.metrics.pxap import PxAP
from wsol_bench.run.distributed import Ranks
from wsol_bench.run.run_tables import check_run
from wsol_bench.run.runner import run as run_benchmark

# a small but complete run: every scorer (records, sweep, segmentation, masks, faithfulness), 3 shards of 3
# images (the last one of 1; batches of 2 and 1): shard 0 for rank 0, shards 1 and 2 for rank 1
RUN = ["dataset.params.num_images=7", "store.shard_size=3", "batch_size=2", "progress=false",
       "gallery_images=2", "method=[agcam,rollout,gradcam,random,center]", "faithfulness=abpc",
       "faithfulness.steps=5", "sweep=grid", "segmentation=chefer", "export_masks=true"]
SHARDS = 3
# the files whose bytes depend only on the numbers (not on timings, paths or the environment)
NUMBERS = ["records.csv", "faithfulness.csv", "table.csv", "table_box.csv", "table_mask.csv", "sweep.csv",
           "wsoleval.csv", "states/sweep.json", "skipped.csv", "segmentation.csv", "segmentation_records.csv",
           "states/segmentation.json", "compare.csv",
           # the bootstrap replicates of the dataset-level measures: the same intervals from 1 or 2 ranks
           "states/sweep_replicates.npz", "states/sweep_curve_replicates.npz", "states/segmentation_replicates.npz"]


@pytest.mark.parametrize("world", [1, 2, 3, 4, 7])
def test_rank_blocks_partition_the_shards_in_order(world):
    """The blocks of ranks 0..world-1, concatenated, are every shard once, in order."""
    for count in range(20):
        blocks = [Ranks(r, world).block(count) for r in range(world)]
        assert [i for b in blocks for i in b] == list(range(count))
        assert max(map(len, blocks)) - min(map(len, blocks)) <= 1


def _sync_worker(rank: int, world: int, init: str, parts: list, out: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        metric = PxAP(thresholds=[0.0, 0.5])
        heat, gt = parts[rank]
        metric.update(heat, gt)
        metric.sync_ranks()
        if rank == 0:
            torch.save({"state": {k: v.clone() for k, v in metric.metric_state.items()},
                        "value": metric.compute()}, out)
    finally:
        dist.destroy_process_group()


def test_sync_ranks_sums_the_states_of_every_rank(tmp_path):
    """Two gloo ranks, each updated with half the images: after sync_ranks rank 0 holds the
    states and the value of one metric updated with all of them."""
    g = torch.Generator().manual_seed(0)
    heat = torch.rand(6, 8, 8, generator=g)
    gt = torch.rand(6, 8, 8, generator=g) > 0.6
    parts = [(heat[:4], gt[:4]), (heat[4:], gt[4:])]
    out = tmp_path / "rank0.pt"
    # forked: the ranks start at once with this process's imports (spawned ones import torch first)
    mp.start_processes(_sync_worker, args=(2, f"file://{tmp_path / 'rendezvous'}", parts, str(out)), nprocs=2,
                       start_method="fork")
    whole = PxAP(thresholds=[0.0, 0.5])
    whole.update(heat, gt)
    got = torch.load(out)
    for name, value in whole.metric_state.items():
        assert torch.equal(got["state"][name], value), name
    torch.testing.assert_close(got["value"], whole.compute(), rtol=0, atol=0, equal_nan=True)
    assert not torch.equal(got["state"]["positive"], PxAP(thresholds=[0.0, 0.5]).metric_state["positive"])


def test_sync_ranks_is_a_no_op_in_one_process():
    metric = PxAP(thresholds=[0.0, 0.5])
    metric.update(torch.full((1, 2, 2), 0.7), torch.ones(1, 2, 2, dtype=torch.bool))
    before = {k: v.clone() for k, v in metric.metric_state.items()}
    metric.sync_ranks()
    assert all(torch.equal(before[k], v) for k, v in metric.metric_state.items())


def _torchrun(args: list[str], cwd: Path, *, nproc: int, timeout: int = 600) -> subprocess.CompletedProcess:
    """`wsol-bench args` under torchrun with `nproc` CPU processes."""
    env = {k: v for k, v in os.environ.items() if k not in ("HYDRA_FULL_ERROR", "WSOL_BENCH_DEBUG")}
    env["OMP_NUM_THREADS"] = "1"  # two ranks on two cores, as torchrun itself sets
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "wsol_bench"]
    return subprocess.run([*command, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env=env, check=False)


def _run_here(overrides: list[str], out: Path) -> Path:
    """The run in this process (one intra-op thread, as each rank has): its run folder `out`."""
    with initialize_config_module(config_module="wsol_bench.conf", version_base="1.3"):
        cfg = compose(config_name="config", overrides=[*overrides, "run_name=quickstart"])
    run_benchmark(cfg, out)
    return out


def _same_numbers(a: Path, b: Path) -> None:
    for name in NUMBERS:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    masks = sorted(p.relative_to(a) for p in (a / "masks").rglob("*") if p.is_file())
    assert masks and masks == sorted(p.relative_to(b) for p in (b / "masks").rglob("*") if p.is_file())
    for rel in masks:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> Path:
    """The reference: one process, scoring in the main process."""
    tmp = tmp_path_factory.mktemp("one")
    return _run_here([*RUN, "scoring_workers=0", f"store.root={tmp / 'cache'}"], tmp / "run")


@pytest.mark.slow  # torchrun starts two processes: `pytest -m slow` (CI runs it)
def test_torchrun_with_two_cpu_processes_gives_the_one_process_run(one_process, tmp_path):
    """torchrun --nproc-per-node=2 (gloo): each rank explains and scores its half of the shards
    into the shared store, rank 0 writes one run folder, in the folder both ranks named from
    rank 0's start time; records, faithfulness rows, sweep states, tables and masks are
    byte-identical to the one-process run."""
    proc = _torchrun([*RUN, f"store.root={tmp_path / 'cache'}"], tmp_path, nproc=2)
    assert proc.returncode == 0, proc.stderr[-4000:]
    runs = list((tmp_path / "results" / "runs" / "quickstart").iterdir())
    assert len(runs) == 1, runs  # one folder, not one per rank
    run = runs[0]
    assert check_run(run) == []
    _same_numbers(run, one_process)
    # the tables' bootstrap intervals too (a function of the image ids, not of the shards' ranks)
    assert {"box_iou ci_lo", "box_iou ci_hi", "ABPC ci_lo", "MaxBoxAccV2 ci_lo", "PxAP ci_hi",
            "Seg mIoU ci_lo"} <= set(pd.read_csv(run / "table.csv").columns)
    assert (run / "wsol-bench.rank1.log").is_file() and not (run / "ranks").exists()
    assert ", 2 ranks" in (run / "wsol-bench.log").read_text()
    shards = sorted(p.name for p in (tmp_path / "cache").rglob("shard_*.pt"))
    assert len(shards) == SHARDS * 5 * 2  # x 5 methods x 2 target policies (ABPC needs the label's maps)
    run_json = pd.read_json(run / "run.json", typ="series")
    assert run_json["ranks"] == 2


@pytest.mark.slow  # scoring worker processes (with the torchrun test's one-process run): `pytest -m slow` (CI runs it)
def test_scoring_workers_give_the_in_process_numbers(one_process, tmp_path):
    """The model-free scorers in two worker processes, reading the maps the reference stored:
    the same bytes as scoring in the main process."""
    cache = one_process.parent / "cache"
    run = _run_here([*RUN, "scoring_workers=2", f"store.root={cache}"], tmp_path / "run")
    _same_numbers(run, one_process)
    assert pd.read_json(tmp_path / "run" / "run.json", typ="series")["workers"]["scoring"] == 2


def test_torchrun_refuses_a_sweep(tmp_path):
    """-m under torchrun is refused in one line: a launch is one run."""
    proc = _torchrun(["-m", "method=[center]", "dataset.params.num_images=2"], tmp_path, nproc=2, timeout=300)
    assert proc.returncode != 0
    assert "a torchrun launch is one run" in proc.stderr
