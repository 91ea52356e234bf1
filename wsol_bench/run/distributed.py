"""The ranks of a data-parallel run: one process (rank 0 of 1) unless started by torchrun
(`torchrun --nproc-per-node=N -m wsol_bench ...`, or multi-node with the usual rendezvous
flags) or as one of several SLURM tasks of a job submitted through submitit. Every rank
explains and scores its own block of shards; rank 0 writes the run folder.

The work is split into contiguous blocks in rank order, so outputs concatenated in rank order
are exactly the one-process outputs (records.csv row for row)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from wsol_bench.errors import SettingError

# Every rank waits at the end of the pass for the slowest one; a large dataset's block can take
# hours, longer than torch.distributed's default wait of 30 minutes.
TIMEOUT = timedelta(hours=12)


@dataclass(frozen=True)
class Ranks:
    """This process's place in the run: its rank, the number of ranks and its GPU index on its node."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Whether this rank writes the run folder."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def block(self, count: int) -> range:
        """This rank's contiguous share of `count` items (shards): rank r takes
        [r*count//world, (r+1)*count//world), so the blocks in rank order are 0..count-1."""
        return range(self.rank * count // self.world, (self.rank + 1) * count // self.world)

    def barrier(self) -> None:
        """Wait for every rank (nothing in a one-process run)."""
        if self.distributed:
            dist.barrier()

    def gather(self, value: Any) -> list[Any]:
        """`value` of every rank, in rank order (picklable values; `[value]` in one process)."""
        if not self.distributed:
            return [value]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, value)
        return out

    def broadcast(self, value: Any) -> Any:
        """Rank 0's `value`, on every rank."""
        if not self.distributed:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]


ONE_PROCESS = Ranks()  # a run that is not data-parallel (Ranks is frozen: one shared value)


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        return default


def launched_world_size() -> int:
    """How many ranks the launcher started (torchrun's WORLD_SIZE; 1 when started plainly)."""
    return _env_int("WORLD_SIZE", 1)


def export_submitit_environment() -> bool:
    """In a job that submitit started with several tasks (SLURM's `tasks_per_node`/`nodes`, or
    its local executor) and no torchrun variables, set RANK, WORLD_SIZE, LOCAL_RANK,
    MASTER_ADDR and MASTER_PORT from the job's environment (submitit's own helper does it).
    Returns whether it did."""
    if "WORLD_SIZE" in os.environ or "SUBMITIT_EXECUTOR" not in os.environ:
        return False
    from submitit import JobEnvironment
    from submitit.helpers import TorchDistributedEnvironment

    if JobEnvironment().num_tasks < 2:
        return False
    TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    return True


def backend_for(device: str) -> str:
    """gloo for CPU tensors (the metric states, object collectives), NCCL for CUDA tensors."""
    return "cpu:gloo,cuda:nccl" if torch.device(device).type == "cuda" else "gloo"


def join(device: str = "cpu") -> Ranks:
    """The ranks of this process, joining the process group of a torchrun or multi-task SLURM
    launch on first call (gloo for CPU tensors, plus NCCL for CUDA ones when `device` is a GPU).
    With a CUDA device each rank takes the GPU of its local rank."""
    if not (dist.is_available() and dist.is_initialized()):
        export_submitit_environment()
        if launched_world_size() < 2:
            return ONE_PROCESS
        if not dist.is_available():
            raise SettingError("this torch build has no torch.distributed; run one process")
        dist.init_process_group(backend=backend_for(device), timeout=TIMEOUT)
    ranks = Ranks(dist.get_rank(), dist.get_world_size(), _env_int("LOCAL_RANK", 0))
    if ranks.distributed and torch.device(device).type == "cuda":
        if torch.device(device).index is not None:
            raise SettingError(f"device={device} with {ranks.world} ranks: each rank takes the GPU of its "
                               "local rank; give device=cuda")
        torch.cuda.set_device(ranks.local_rank)
    return ranks


def leave() -> None:
    """Leave the process group, if this process joined one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
