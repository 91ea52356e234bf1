"""The model-free share of scoring (heatmaps, regions at every threshold, record rows, metric
state increments, mask encodings) in worker processes, while the main process explains the next
batch. Results are taken back in submission order, so every output is the one a single
process writes, row for row and count for count.

A scorer takes part through its `kernel` (a picklable function of one `MethodBatch` that does
not touch the scorer) and its `add` (which takes the kernel's result in the main process).
Scorers without a kernel (faithfulness: it needs the model) are fed in the main process."""

from __future__ import annotations

import multiprocessing
import os
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from typing import Any

import torch

from wsol_bench.errors import SettingError
from wsol_bench.run.batch import BatchJob
from wsol_bench.run.scorers.base import Scorer

Kernel = Callable[[Any], Any]
_WORKER_KERNELS: list[Kernel] = []


def _start_worker(kernels: list[Kernel]) -> None:
    """Worker initializer: the kernels, and one thread (the workers are the parallelism)."""
    global _WORKER_KERNELS
    _WORKER_KERNELS = kernels
    torch.set_num_threads(1)


def run_kernels(kernels: Sequence[Kernel], job: BatchJob) -> tuple[list[tuple[str, list[Any]]], list[float]]:
    """([(method, [result of each kernel])], [seconds of each kernel]) of one job: what a worker
    computes, and the one-process path."""
    seconds = [0.0] * len(kernels)
    results = []
    for mb in job.methods:
        parts = []
        for k, kernel in enumerate(kernels):
            start = time.perf_counter()
            parts.append(kernel(mb))
            seconds[k] += time.perf_counter() - start
        results.append((mb.method, parts))
    return results, seconds


def _run_in_worker(job: BatchJob) -> tuple[list[tuple[str, list[Any]]], list[float]]:
    return run_kernels(_WORKER_KERNELS, job)


class ScoringPool:
    """Feeds jobs to the kernels of `scorers`, in `workers` processes (0: in this process), and
    hands the results to the scorers' `add` in submission order. At most `2 * workers` jobs
    wait at a time, so memory stays bounded however fast the explanation runs."""

    def __init__(self, scorers: Sequence[Scorer], workers: int = 0) -> None:
        if workers < 0:
            raise SettingError(f"scoring_workers={workers} must be at least 0")
        self.scorers = [s for s in scorers if s.kernel is not None]
        self.kernels = [s.kernel for s in self.scorers]
        self.workers = workers if self.scorers else 0
        self._pending: deque[Future | tuple] = deque()
        self.kernel_seconds = dict.fromkeys((s.name for s in self.scorers), 0.0)  # per scorer, summed over workers
        self._executor: ProcessPoolExecutor | None = None
        if self.workers:
            # fork: the workers inherit the imported modules and start at once; they use no CUDA
            context = multiprocessing.get_context("fork" if os.name == "posix" else "spawn")
            self._executor = ProcessPoolExecutor(self.workers, mp_context=context, initializer=_start_worker,
                                                 initargs=(self.kernels,))

    def submit(self, job: BatchJob) -> None:
        """Score one job (now, or in a worker); results already finished are handed over."""
        if not self.kernels:
            return
        if self._executor is None:
            self._pending.append(run_kernels(self.kernels, job))
        else:
            self._pending.append(self._executor.submit(_run_in_worker, job))
        limit = 2 * self.workers
        while len(self._pending) > limit:
            self._add_oldest()

    def _add_oldest(self) -> None:
        done = self._pending.popleft()
        results, seconds = done.result() if isinstance(done, Future) else done
        for scorer, spent in zip(self.scorers, seconds):
            self.kernel_seconds[scorer.name] += spent
        for method, parts in results:
            for scorer, part in zip(self.scorers, parts):
                scorer.add(method, part)

    def drain(self) -> None:
        """Wait for every submitted job and hand its results over."""
        while self._pending:
            self._add_oldest()

    def close(self) -> None:
        """Stop the workers (also after an error: waiting jobs are cancelled)."""
        self._pending.clear()
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None

    def __enter__(self) -> ScoringPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
