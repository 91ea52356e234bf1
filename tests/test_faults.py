"""Interruptions, full disks and concurrent writers: a run folder holds the previous complete
run or the new one at every instant, signals end a run in one line, a full disk is one line
that keeps what was finished, and one folder or map shard has one writer at a time."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import forked_command

from wsol_bench.cli.errors import terminate_as_interrupt
from wsol_bench.errors import FolderInUseError
from wsol_bench.locks import FOLDER_LOCK, FolderLock
from wsol_bench.report.manifest import MANIFEST, incompleteness, read_manifest
from wsol_bench.run import folder as folder_module
from wsol_bench.run.folder import staged_run, staging_folders
from wsol_bench.run.store import MapStore

FAST = ["method=[center,rollout]", "dataset.params.num_images=8", "batch_size=2", "store.shard_size=2",
        "gallery_images=0", "progress=false"]
FOREIGN = {"notes.txt": "the user's own notes", ".hydra/config.yaml": "hydra: 1", "wsol-bench.log": "log\n"}
OLD_RUN = {"table.csv": "old table", "records.csv": "old records", "sweep.csv": "old sweep",
           "states/sweep.json": "{\"old\": 1}"}
NEW_RUN = {"table.csv": "new table", "records.csv": "new records", "gallery.png": "new gallery",
           "states/sweep.json": "{\"new\": 1}"}


def write_files(folder: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)


def folder_state(folder: Path) -> dict[str, str]:
    """Every file under `folder` (relative name -> text), run.json and the lock file (which a
    killed run leaves, unlocked) left out."""
    return {p.relative_to(folder).as_posix(): p.read_text() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name not in (MANIFEST, FOLDER_LOCK)}


def publish_run(out: Path, files: dict[str, str]) -> None:
    with staged_run(out) as stage:
        write_files(stage, files)


# -- publishing: the old run or the new one, at every instant ----------------------------------------

# the file-system calls the publisher makes; the child kills itself before call number k
_STEPS = [(os, "replace"), (os, "link"), (os, "symlink"), (os, "unlink"), (os, "rename"), (os, "mkdir"),
          (os, "rmdir"), (shutil, "copymode"), (shutil, "rmtree"), (folder_module, "exchange"),
          (folder_module, "write_json")]


def _publish_and_die_at_step(out: str, step: int, signum: int) -> None:
    """Child: publish NEW_RUN into `out`, sending itself `signum` before file-system call `step`."""
    calls = [0]

    def wrap(function):
        def counted(*args, **kwargs):
            calls[0] += 1
            if calls[0] == step:
                os.kill(os.getpid(), signum)
                time.sleep(1)  # a handled signal (SIGTERM) raises before the call goes on
            return function(*args, **kwargs)
        return counted

    with terminate_as_interrupt():
        # counted only from the first call of the publisher on: taking the lock and staging is not publishing
        original_publish = folder_module.publish

        def publish(*args, **kwargs):
            for owner, name in _STEPS:
                setattr(owner, name, wrap(getattr(owner, name)))
            return original_publish(*args, **kwargs)

        folder_module.publish = publish
        try:
            publish_run(Path(out), NEW_RUN)
        except KeyboardInterrupt:
            os._exit(143)
    os._exit(0)


@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_a_publisher_killed_at_any_step_leaves_the_complete_old_run_or_the_complete_new_one(tmp_path, signum):
    """The previous run (with the user's and Hydra's files beside it) is replaced by a new one
    with another set of files; the publisher is killed before each of its file-system calls in
    turn. After every kill the folder is exactly one complete run, and the next run removes the
    staging folder the kill left."""
    out = tmp_path / "run"
    out.mkdir()
    write_files(out, FOREIGN)
    publish_run(out, OLD_RUN)
    old_state = folder_state(out)
    assert old_state == {**FOREIGN, **OLD_RUN} and incompleteness(out) is None
    context = multiprocessing.get_context("fork")
    outcomes = []
    for step in range(1, 200):
        shutil.rmtree(out)
        out.mkdir()
        write_files(out, FOREIGN)
        publish_run(out, OLD_RUN)
        child = context.Process(target=_publish_and_die_at_step, args=(str(out), step, int(signum)))
        child.start()
        child.join(60)
        assert child.exitcode in (0, 143, -signal.SIGKILL), child.exitcode
        state = folder_state(out)
        assert state in ({**FOREIGN, **OLD_RUN}, {**FOREIGN, **NEW_RUN}), (step, state)
        assert incompleteness(out) is None, step
        assert sorted(read_manifest(out)["files"]) == sorted(OLD_RUN if state == {**FOREIGN, **OLD_RUN}
                                                             else NEW_RUN), step
        outcomes.append("new" if state == {**FOREIGN, **NEW_RUN} else "old")
        if child.exitcode == 0:  # the publisher made fewer calls than `step`: every step was tried
            break
    assert outcomes[0] == "old" and outcomes[-1] == "new" and len(outcomes) > 5, outcomes
    publish_run(out, OLD_RUN)  # the next run: complete, and no staging folder left
    assert folder_state(out) == {**FOREIGN, **OLD_RUN} and not staging_folders(out)
    assert not (out / FOLDER_LOCK).exists()


def test_a_run_folder_that_is_a_link_or_the_working_directory_is_published_in_place(tmp_path, monkeypatch):
    """A run folder named through a symbolic link is replaced where it lies (the link stays a
    link); one that is the working directory is published file by file (it must not move)."""
    real = tmp_path / "disk" / "run"
    real.mkdir(parents=True)
    link = tmp_path / "run"
    link.symlink_to(real)
    publish_run(link, OLD_RUN)
    publish_run(link, NEW_RUN)
    assert link.is_symlink() and folder_state(real) == NEW_RUN and incompleteness(real) is None
    monkeypatch.chdir(real)
    publish_run(Path("."), OLD_RUN)
    assert Path.cwd().exists() and folder_state(real) == OLD_RUN and incompleteness(real) is None
    assert not staging_folders(real)


# -- one writer per folder ------------------------------------------------------------------------


def _hold_lock(folder: str, ready, done) -> None:
    with FolderLock(folder):
        ready.set()
        done.wait(60)


def test_a_second_writer_is_refused_naming_the_first_and_a_killed_holder_frees_the_folder(tmp_path, command):
    """While a run writes a folder, a second run and a mode=summary run into it are refused in
    one line naming the holder, before any work; the holder's lock ends with its process."""
    out = tmp_path / "run"
    context = multiprocessing.get_context("fork")
    ready, done = context.Event(), context.Event()
    holder = context.Process(target=_hold_lock, args=(str(out), ready, done))
    holder.start()
    assert ready.wait(60)
    try:
        for extra in ([], ["mode=summary"]):
            result = command("wsol-bench", [*FAST, *extra, f"store.root={tmp_path / 'cache'}", f"hydra.run.dir={out}"],
                             tmp_path)
            assert result.returncode == 2, result.stderr[-2000:]
            line = result.stderr.strip().splitlines()[-1]
            assert f"is being written by process {holder.pid} on " in line and "hydra.run.dir" in line, line
            assert "Traceback" not in result.stderr
        assert not (tmp_path / "cache").exists() and not (out / MANIFEST).exists()
        with pytest.raises(FolderInUseError):
            FolderLock(out).acquire()
    finally:
        os.kill(holder.pid, signal.SIGKILL)  # no clean release: the operating system frees the lock
        holder.join(60)
    with FolderLock(out):
        pass
    assert not (out / FOLDER_LOCK).exists()


def _claim_and_store_later(root: str, ready, go) -> None:
    store = MapStore(root, {"method": "a"}, shard_size=2)
    assert store.claim(0, 4) is None
    ready.set()
    go.wait(60)
    import torch

    from wsol_bench.run.store import Shard
    store.save(Shard(index=0, maps=torch.ones(2, 2, 2), logits=torch.zeros(2, 3), targets=torch.zeros(2, dtype=torch.long),
                     positions=torch.arange(2), image_ids=["a", "b"], skipped=[]))
    os._exit(0)


def test_a_shard_another_process_is_computing_is_waited_for_and_read_not_computed_again(tmp_path):
    context = multiprocessing.get_context("fork")
    ready, go = context.Event(), context.Event()
    other = context.Process(target=_claim_and_store_later, args=(str(tmp_path), ready, go))
    other.start()
    assert ready.wait(60)
    store = MapStore(tmp_path, {"method": "a"}, shard_size=2)
    threading_result = {}

    def claim():
        threading_result["shard"] = store.claim(0, 4)

    import threading
    waiter = threading.Thread(target=claim)
    waiter.start()
    waiter.join(0.5)
    assert waiter.is_alive()  # waiting for the other process's shard
    go.set()
    waiter.join(60)
    other.join(60)
    assert threading_result["shard"].image_ids == ["a", "b"]  # read, not computed here
    assert store.claim(1, 4) is None and store.locks.held == {1}  # a shard nobody computes: ours
    store.release_claims()
    assert store.locks.held == set()


def test_two_runs_sharing_a_store_compute_each_shard_once(tmp_path):
    """Two runs started together into two folders, one map store: every shard is explained by
    one of them (the other waits and reads it), and both give the same records."""
    args = [*FAST, f"store.root={tmp_path / 'cache'}"]
    children = [forked_command("wsol-bench", [*args, f"hydra.run.dir={name}"], tmp_path) for name in ("a", "b")]
    for child in children:
        child.join(300)
        assert child.exitcode == 0
    explained = [json.loads((tmp_path / name / MANIFEST).read_text())["shards_explained"] for name in ("a", "b")]
    for key in explained[0]:
        assert explained[0][key] + explained[1][key] == 4, explained  # 8 images in shards of 2
    assert (tmp_path / "a" / "records.csv").read_text() == (tmp_path / "b" / "records.csv").read_text()


# -- signals ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"])
def test_an_interrupted_run_ends_in_one_line_keeps_its_shards_and_a_rerun_resumes(tmp_path, signum, code, command):
    # A run that ends before this process sees its second shard (a starved test process on a
    # busy machine) cannot be interrupted: it is started again, five times longer, in a new folder.
    for images in (40, 200, 1000):
        work = tmp_path / str(images)
        cache, out, printed = work / "cache", work / "run", work / "printed.txt"
        args = [*FAST, "method=[rollout]", f"dataset.params.num_images={images}", f"store.root={cache}",
                f"hydra.run.dir={out}"]
        work.mkdir()
        child = forked_command("wsol-bench", args, work, output=printed)
        deadline = time.monotonic() + 300  # a hang guard only: the run takes seconds
        while child.is_alive() and len(list(cache.rglob("shard_*.pt"))) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        try:
            os.kill(child.pid, signum)
        except ProcessLookupError:  # it ended (and was reaped) before the signal
            child.join(60)
            assert child.exitcode == 0, (child.exitcode, printed.read_text()[-2000:])
            continue
        child.join(60)
        if child.exitcode != 0:
            break
    assert child.exitcode == code, (child.exitcode, printed.read_text()[-2000:])
    text = printed.read_text()
    lines = [line for line in text.splitlines() if line.startswith("wsol-bench:")]
    assert len(lines) == 1 and f"interrupted ({signal.Signals(signum).name})" in lines[0], text[-2000:]
    assert "resumes" in lines[0] and "Traceback" not in text
    assert not staging_folders(out) and not (out / MANIFEST).exists() and not (out / FOLDER_LOCK).exists()
    kept = len(list(cache.rglob("shard_*.pt")))
    assert kept >= 2
    rerun = command("wsol-bench", args, work)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    explained = json.loads((out / MANIFEST).read_text())["shards_explained"]
    assert sum(explained.values()) == images // 2 - kept  # only what the interrupted run had not stored
    assert not staging_folders(out)


# -- full disks ------------------------------------------------------------------------------------

_IN_NAMESPACE = """
import json, subprocess, sys
sys.path.insert(0, sys.argv[1])
from conftest import command_in_process
root, args = sys.argv[2], json.loads(sys.argv[3])
results = {}
for case, extra in args.items():
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=" + extra["size"], "tmpfs", root + "/" + case], check=True)
    first = command_in_process("wsol-bench", extra["args"], root)
    subprocess.run(["mount", "-o", "remount,size=64m", root + "/" + case], check=True)
    second = command_in_process("wsol-bench", extra["args"], root)
    results[case] = {"first": [first.returncode, first.stderr], "second": [second.returncode, second.stderr]}
    if case == "store":
        results[case]["explained"] = json.load(open(root + "/run/run.json"))["shards_explained"]
print(json.dumps(results))
"""


def _can_mount_tmpfs() -> bool:
    if shutil.which("unshare") is None or not sys.platform.startswith("linux"):
        return False
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt"],
                           capture_output=True)
    return probe.returncode == 0


@pytest.mark.slow  # four runs as processes in their own namespace: `pytest -m slow` (CI runs it)
@pytest.mark.skipif(not _can_mount_tmpfs(), reason="no unprivileged mount namespace to make a small tmpfs")
def test_a_full_disk_is_one_line_naming_the_file_and_a_rerun_with_space_resumes(tmp_path):
    """A real small file system (tmpfs in a private mount namespace) under the map store, then
    under the run folder: the run ends with one line naming the file and the space, keeps the
    finished shards, and a rerun once there is space completes, explaining only what is missing."""
    cases = {"store": {"size": "28k", "args": [f"store.root={tmp_path / 'store' / 'cache'}",
                                               f"hydra.run.dir={tmp_path / 'run'}"]},
             "folder": {"size": "24k", "args": [f"store.root={tmp_path / 'cache'}",
                                                f"hydra.run.dir={tmp_path / 'folder' / 'run'}", "gallery_images=1"]}}
    for case, extra in cases.items():
        (tmp_path / case).mkdir()
        extra["args"] = [*FAST, "dataset.params.num_images=12", *extra["args"]]
    done = subprocess.run(["unshare", "-rm", sys.executable, "-c", _IN_NAMESPACE, str(Path(__file__).parent),
                           str(tmp_path), json.dumps(cases)], capture_output=True, text=True,
                          env={k: v for k, v in os.environ.items() if k not in ("WSOL_BENCH_DEBUG", "HYDRA_FULL_ERROR")})
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    for case, result in results.items():
        code, err = result["first"]
        assert code == 2, (case, err[-3000:])
        last = err.strip().splitlines()[-1]
        assert last.startswith("wsol-bench: error: cannot write ") and "the disk is full" in last, (case, last)
        assert str(tmp_path / case) in last and "Traceback" not in err, (case, err[-3000:])
        assert result["second"][0] == 0, (case, result["second"][1][-3000:])
    explained = results["store"]["explained"]  # the first run's finished shards were kept, not explained again
    assert 0 < sum(explained.values()) < 12, explained
