"""Soak test: one long synthetic run measured end to end, and optionally killed and resumed.

One `wsol-bench` run of N synthetic images (the shipped model, --methods, the 100-threshold
sweep, the default workers: every core) in a child process, with a fresh map store, so every
map is explained. While it runs, the script counts the images scored so far from the rows of
records.csv in the run's staging folder (one row per image, method and threshold, written
per batch) and, as each checkpoint is passed, reads the child's peak resident memory so far
(VmHWM: the kernel's own high-water mark, exact, not sampled); the whole run's peak is the
kernel's too (ru_maxrss when the child is reaped). Worker processes (DataLoader, scoring
workers) are sampled every --interval seconds and reported apart. Then: the map store's size
on disk, the run's seconds per stage (run.json) and the wall time.

--kill-at SECONDS (or "random": a seeded moment between 10 % and 90 % of the first run's wall
time) starts the same run again into its own folder and store, SIGKILLs its process group at
that moment, reruns it (it resumes from the shards stored before the kill) and compares its
records.csv and table.csv byte for byte with the uninterrupted run's. --reference RUN_DIR
uses an uninterrupted run made before (same --images and --methods) instead of making one, so
the kill and resume can be measured apart from the long first run; rebuild its tables with the
current code first (`wsol-bench-report RUN_DIR`) when the code has changed since.

Usage: python scripts/soak.py [--images 50000] [--checkpoints 5000,20000,50000]
           [--methods rollout,agcam] [--kill-at SECONDS|random] [--seed 0] [--out DIR] [--fork]
           [--reference RUN_DIR]
           [-- extra wsol-bench overrides, e.g. store.shard_size=64]
Numbers only: nothing is asserted about time or memory; the script fails only when a run
fails or the resumed run differs from the uninterrupted one.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

try:  # optional: used where /proc is not available
    import psutil
except ImportError:  # pragma: no cover - depends on the environment
    psutil = None

from omegaconf import OmegaConf

from wsol_bench.cli.child import start_bench
from wsol_bench.run.folder import staging_folders

COMPARED = ("records.csv", "table.csv")  # what a resumed run must reproduce byte for byte


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of a live process in KiB ({} where /proc does not have it)."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return {}
    return {key: int(rest.split()[0]) for key, _, rest in (line.partition(":") for line in lines)
            if key in ("VmRSS", "VmHWM")}


def descendants(pid: int) -> list[int]:
    """Every live descendant of `pid` (its DataLoader and scoring workers)."""
    if psutil is not None:
        try:
            return [child.pid for child in psutil.Process(pid).children(recursive=True)]
        except psutil.Error:
            return []
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        for task in Path(f"/proc/{parent}/task").glob("*/children"):
            try:
                kids = [int(k) for k in task.read_text().split()]
            except OSError:
                continue
            found += kids
            todo += kids
    return found


def rss_kib(pid: int) -> int:
    """Resident memory of a live process in KiB (0 when it is gone)."""
    if psutil is not None:
        try:
            return psutil.Process(pid).memory_info().rss // 1024
        except psutil.Error:
            return 0
    return proc_status(pid).get("VmRSS", 0)


def peak_kib(pid: int, sampled: int) -> int:
    """The process's peak resident memory so far: the kernel's VmHWM where /proc has it, else
    the largest of the samples taken (`sampled`)."""
    return proc_status(pid).get("VmHWM", 0) or max(sampled, rss_kib(pid))


class RecordCounter:
    """Images scored so far by a run: the data rows of records.csv in its staging folder over
    the rows per image (methods x metric.thresholds of its resolved config), read as they grow."""

    def __init__(self, run_dir: Path, pid: int) -> None:
        self.run_dir, self.pid = run_dir, pid
        self.records: Path | None = None
        self.rows_per_image = 0
        self.offset = 0
        self.lines = 0
        self.inode: int | None = None  # the file counted: after publishing, that name holds another

    def _find(self) -> None:
        for stage in staging_folders(self.run_dir):  # the child's own: named by its process id
            if stage.name.endswith(f"-{self.pid}") and (stage / "config.yaml").is_file():
                cfg = OmegaConf.load(stage / "config.yaml")
                self.rows_per_image = len(cfg.method) * len(cfg.metric.thresholds)
                self.records = stage / "records.csv"

    def images(self) -> int:
        """Images whose rows are in records.csv now (0 before the file exists)."""
        if self.records is None:
            self._find()
        if self.records is None or not self.records.is_file():
            return 0
        try:
            with self.records.open("rb") as handle:
                inode = os.fstat(handle.fileno()).st_ino
                if self.inode not in (None, inode):  # published: the staging name holds the previous run
                    return self.lines_to_images()
                self.inode = inode
                handle.seek(self.offset)
                new = handle.read()
        except OSError:  # the staging folder was published (renamed) meanwhile
            return self.lines_to_images()
        complete = new[:new.rfind(b"\n") + 1]  # a half-written line is read next time
        self.offset += len(complete)
        self.lines += complete.count(b"\n")
        return self.lines_to_images()

    def lines_to_images(self) -> int:
        return max(0, self.lines - 1) // max(1, self.rows_per_image)  # the header is one line


@dataclass
class RunResult:
    """What one watched run gave: exit code, wall seconds, at each checkpoint reached (images ->
    (main process's peak so far, workers' sampled peak so far, in KiB; seconds since the start)),
    the main process's peak over the whole run, the workers' sampled peak, the images scored
    when it ended, and whether it was killed. A checkpoint holds (main process's resident memory
    then, its peak so far, workers' sampled peak so far, all in KiB; seconds since the start):
    the peak so far can only rise (a rarer transient is met as images go by), the resident
    memory then shows whether anything is kept per image."""

    code: int
    wall: float
    checkpoints: dict[int, tuple[int, int, int, float]] = field(default_factory=dict)
    peak: int = 0
    workers_peak: int = 0
    images: int = 0
    killed: bool = False


def watch_run(args: list[str], run_dir: Path, log: Path, checkpoints: list[int], *, fork: bool,
              interval: float, kill_at: float | None = None) -> RunResult:
    """Run wsol-bench and watch it to the end (or SIGKILL its process group `kill_at` seconds
    after the start): the peaks at each checkpoint it passes and over the whole run."""
    start = time.perf_counter()
    pid = start_bench(args, log, fork=fork, new_session=True)  # a kill reaches its workers too
    counter = RecordCounter(run_dir, pid)
    result = RunResult(code=-1, wall=0.0)
    sampled = 0
    while True:
        done, status, usage = os.wait4(pid, os.WNOHANG)
        if done:
            result.wall = time.perf_counter() - start
            result.code = os.waitstatus_to_exitcode(status)
            result.peak = usage.ru_maxrss  # KiB on Linux: the kernel's peak of the main process
            break
        sampled = max(sampled, rss_kib(pid))
        result.workers_peak = max(result.workers_peak, sum(rss_kib(p) for p in descendants(pid)))
        result.images = max(result.images, counter.images())
        for mark in checkpoints:
            if mark not in result.checkpoints and result.images >= mark:
                result.checkpoints[mark] = (rss_kib(pid), peak_kib(pid, sampled), result.workers_peak,
                                            time.perf_counter() - start)
        if kill_at is not None and time.perf_counter() - start >= kill_at:
            os.killpg(pid, signal.SIGKILL)
            result.killed = True
            kill_at = None  # reaped on the next turn
        time.sleep(interval)
    result.peak = result.peak or sampled
    return result


def folder_bytes(folder: Path) -> int:
    """Bytes of the regular files under `folder`."""
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def mib(kib: int) -> str:
    return f"{kib / 1024:,.0f} MiB"


def report_run(result: RunResult, run_dir: Path, images: int) -> None:
    """Print the checkpoints' peaks, the growth between them, the stores' sizes and the seconds
    per stage of a finished run."""
    print(f"wall {result.wall:.1f} s for {images:,} images; main process peak {mib(result.peak)}"
          + (f", workers' peak (sampled sum) {mib(result.workers_peak)}" if result.workers_peak else ""))
    print("  images     resident   peak so far   workers    at (s)")
    for mark, (now, peak, workers, seconds) in sorted(result.checkpoints.items()):
        print(f"  {mark:>6,}  {mib(now):>11}  {mib(peak):>12}  {mib(workers):>8}  {seconds:8.1f}")
    marks = sorted(result.checkpoints)
    if len(marks) >= 2:
        # A least-squares slope over every checkpoint: the resident memory moves by some MiB
        # between batches (the allocator's free lists), so two end points alone mislead.
        first, last = marks[0], marks[-1]
        for what, column in (("resident memory", 0), ("peak", 1)):
            kib = [result.checkpoints[mark][column] for mark in marks]
            growth = float(np.polyfit(marks, kib, 1)[0]) * 1024
            print(f"  growth of the {what} from {first:,} to {last:,} images (least-squares slope): "
                  f"{growth:,.0f} bytes per image")
    maps = json.loads((run_dir / "maps.json").read_text())
    total = 0
    for method, entry in maps.items():
        size = folder_bytes(Path(entry["folder"]))
        total += size
        print(f"  store {method}: {size / 2**20:,.2f} MiB ({size / images:,.0f} bytes per image)")
    print(f"  store total: {total / 2**20:,.2f} MiB; run folder: {folder_bytes(run_dir) / 2**20:,.2f} MiB")
    info = json.loads((run_dir / "run.json").read_text())
    print(f"  pass {info['pass_seconds']:.1f} s ({images / max(info['pass_seconds'], 1e-9):,.1f} images/s), "
          f"start-up and writing the outputs {result.wall - info['pass_seconds']:.1f} s; "
          f"workers {info['workers']}")
    for stage, seconds in info["seconds"].items():
        print(f"    {stage:<28} {seconds:10.1f} s")


def checked(result: RunResult, log: Path, what: str) -> RunResult:
    """`result`, or the end of the log and exit when the run failed (a kill is no failure)."""
    if result.code != 0 and not result.killed:
        sys.exit(f"{what} failed ({result.code}); see {log}:\n" + log.read_text()[-3000:])
    return result


def kill_and_resume(overrides: list[str], root: Path, reference: Path, kill_at: float, *, fork: bool,
                    interval: float) -> bool:
    """The run killed at `kill_at` seconds and run again: whether its records.csv and table.csv
    equal those of the uninterrupted run in `reference` (printed per file)."""
    run_dir, store = root / "resumed", root / "store_resumed"
    args = [*overrides, f"store.root={store}", f"hydra.run.dir={run_dir}"]
    killed = checked(watch_run(args, run_dir, root / "killed.log", [], fork=fork, interval=interval,
                               kill_at=kill_at), root / "killed.log", "the run to be killed")
    shards = len(list(store.glob("*/shard_*.pt"))) if store.is_dir() else 0
    if killed.killed:
        print(f"killed at {killed.wall:.1f} s (asked {kill_at:.1f} s) after {killed.images:,} images scored; "
              f"{shards} map shards stored")
    else:
        print(f"the run finished at {killed.wall:.1f} s, before the kill at {kill_at:.1f} s; it is rerun as it is")
    resumed = checked(watch_run(args, run_dir, root / "resumed.log", [], fork=fork, interval=interval),
                      root / "resumed.log", "the resumed run")
    info = json.loads((run_dir / "run.json").read_text())
    print(f"resumed in {resumed.wall:.1f} s; shards explained by the resumed run: {info['shards_explained']}")
    same = True
    for name in COMPARED:
        equal = (run_dir / name).read_bytes() == (reference / name).read_bytes()
        same &= equal
        print(f"  {name}: {'identical' if equal else 'DIFFERENT'} to the uninterrupted run's")
    return same


def reference_problem(run_dir: Path, images: int, methods: str) -> str | None:
    """Why `run_dir` cannot stand for the uninterrupted run of `images` images and `methods`
    (None when it can)."""
    missing = [name for name in ("config.yaml", "run.json", *COMPARED) if not (run_dir / name).is_file()]
    if missing:
        return f"not a finished run folder (no {', '.join(missing)})"
    config = OmegaConf.load(run_dir / "config.yaml")
    made = (int(config.dataset.params.num_images), ",".join(config.method.keys()))
    if made != (images, methods):
        return (f"made with {made[0]:,} images and methods {made[1]}, not {images:,} and {methods}; "
                f"give the same --images and --methods")
    return None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line; wsol-bench overrides follow `--`."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=50_000)
    parser.add_argument("--checkpoints", default="5000,20000,50000",
                        help="image counts at which the peak memory so far is read (those above --images "
                             "are left out; --images itself is always one)")
    parser.add_argument("--methods", default="rollout,agcam", help="comma-separated explainers")
    parser.add_argument("--kill-at", default=None,
                        help="seconds after its start at which a second run is killed, or 'random'")
    parser.add_argument("--seed", type=int, default=0, help="picks the moment of --kill-at random")
    parser.add_argument("--interval", type=float, default=0.1, help="seconds between samples")
    parser.add_argument("--out", default=None, help="an empty or new folder for the runs and stores "
                        "(default: a temporary folder, kept)")
    parser.add_argument("--fork", action="store_true",
                        help="fork each run from this process after importing wsol-bench once, instead of "
                             "starting a new Python (faster start-up; the runs are the same)")
    parser.add_argument("--reference", default=None,
                        help="an uninterrupted run folder of the same --images and --methods: skip the first "
                             "run and compare the killed and resumed run with this one (needs --kill-at)")
    parser.add_argument("overrides", nargs="*", help="extra wsol-bench overrides, after --")
    args = parser.parse_args(argv)
    if args.images < 1:
        parser.error(f"--images {args.images} must be at least 1")
    if args.kill_at not in (None, "random"):
        try:
            if float(args.kill_at) <= 0:
                raise ValueError
        except ValueError:
            parser.error(f"--kill-at {args.kill_at!r} must be a number of seconds > 0 or 'random'")
    if args.reference is not None:
        if args.kill_at is None:
            parser.error("--reference is only used with --kill-at")
        problem = reference_problem(Path(args.reference), args.images, args.methods)
        if problem:
            parser.error(f"--reference {args.reference}: {problem}")
    if args.out and Path(args.out).exists() and any(Path(args.out).iterdir()):
        parser.error(f"--out {args.out} is not empty; give a new or empty folder (its stores must start empty)")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the soak; 0 when every run finished (and the resumed run matched), else 1."""
    args = parse_args(argv)
    if args.fork:
        import wsol_bench.run.runner  # noqa: F401  (imported once here, inherited by every run)
    root = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="soak_"))
    root.mkdir(parents=True, exist_ok=True)
    marks = sorted({int(m) for m in args.checkpoints.split(",") if m and int(m) < args.images} | {args.images})
    overrides = [f"dataset.params.num_images={args.images}", f"method=[{args.methods}]", "sweep=grid",
                 "progress=false", *args.overrides]
    print(f"soak: {args.images:,} synthetic images, methods {args.methods}, sweep=grid; runs in {root}")
    if args.reference is not None:
        run_dir = Path(args.reference)
        wall = json.loads((run_dir / "run.json").read_text())["pass_seconds"]
        print(f"the uninterrupted run: {run_dir} (made before; its pass took {wall:.1f} s)")
    else:
        run_dir = root / "run"
        log = root / "run.log"
        result = checked(watch_run([*overrides, f"store.root={root / 'store'}", f"hydra.run.dir={run_dir}"],
                                   run_dir, log, marks, fork=args.fork, interval=args.interval), log, "the run")
        report_run(result, run_dir, args.images)
        wall = result.wall
    if args.kill_at is None:
        return 0
    if args.kill_at == "random":
        kill_at = random.Random(args.seed).uniform(0.1, 0.9) * wall
    else:
        kill_at = float(args.kill_at)
    return 0 if kill_and_resume(overrides, root, run_dir, kill_at, fork=args.fork, interval=args.interval) else 1


if __name__ == "__main__":
    sys.exit(main())
