"""Data-parallel cells: the process group, this process's rank, and the few collectives the
runner needs. One process is a world of size 1 whose collectives do nothing.

Processes are started by ``torchrun`` (or a launcher, e.g. submitit's tasks per node), which
set ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``. NCCL on
CUDA, gloo on CPU. Only rank 0 claims cells, writes results and reports.
"""

from __future__ import annotations

import datetime as dt
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as torch_dist

from mae_bench.errors import UserError

# rank 0 evaluates alone while the other ranks wait: a long fine-tuning must not time out
WAIT_TIMEOUT = dt.timedelta(hours=float(os.environ.get("MAE_BENCH_DIST_TIMEOUT_H", "12")))


@dataclass(frozen=True)
class Dist:
    """This process's place in the world (rank 0 of 1 without torch.distributed)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """True on the process that claims cells, writes results and reports."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        """True when there is more than one process."""
        return self.world_size > 1

    def barrier(self) -> None:
        """Wait until every process gets here."""
        if self.active:
            torch_dist.barrier()

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj``, on every rank (a picklable object)."""
        if not self.active:
            return obj
        box = [obj if self.is_main else None]
        torch_dist.broadcast_object_list(box, src=0)
        return box[0]

    def mean(self, tensor: torch.Tensor) -> torch.Tensor:
        """The mean of ``tensor`` over all processes (a new tensor)."""
        if not self.active:
            return tensor
        out = tensor.detach().clone()
        torch_dist.all_reduce(out, op=torch_dist.ReduceOp.SUM)
        return out / self.world_size

    def any(self, flag: bool, device: torch.device) -> bool:
        """True on every rank if ``flag`` is true on any rank."""
        if not self.active:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=device)
        torch_dist.all_reduce(t, op=torch_dist.ReduceOp.MAX)
        return bool(t.item())

    def shard(self, batch_size: int) -> slice:
        """This rank's rows of a global batch (equal, contiguous parts)."""
        if batch_size % self.world_size:
            raise ValueError(
                f"the global batch of {batch_size} images does not split over "
                f"{self.world_size} processes: choose a batch size divisible by it"
            )
        part = batch_size // self.world_size
        return slice(self.rank * part, (self.rank + 1) * part)


SINGLE = Dist()


def env_world() -> Dist:
    """The world torchrun (or a launcher) describes in the environment; SINGLE without one."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError as exc:
        raise UserError(f"WORLD_SIZE/RANK/LOCAL_RANK: not integers ({exc})") from None
    if world <= 1:
        return SINGLE
    if not 0 <= rank < world:
        raise UserError(f"RANK={rank} is not within WORLD_SIZE={world}")
    return Dist(rank, world, local)


def cell_device(device: torch.device, world: Dist) -> torch.device:
    """The device of this rank: ``cuda:LOCAL_RANK`` on CUDA with several processes."""
    if world.active and device.type == "cuda":
        if device.index not in (None, 0):
            raise UserError(
                f"--device {device}: each of the {world.world_size} processes takes "
                "cuda:LOCAL_RANK; use --device cuda (or auto)"
            )
        if world.local_rank >= torch.cuda.device_count():
            raise UserError(
                f"{world.world_size} processes on CUDA: each takes cuda:LOCAL_RANK; local rank "
                f"{world.local_rank} has no device ({torch.cuda.device_count()} visible)"
            )
        return torch.device("cuda", world.local_rank)
    return device


def start(world: Dist, device: torch.device) -> None:
    """Join the process group of ``world`` (NCCL on CUDA, gloo elsewhere); no-op for one."""
    if not world.active or torch_dist.is_initialized():
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    options: dict[str, Any] = {"device_id": device} if device.type == "cuda" else {}
    torch_dist.init_process_group(
        backend, rank=world.rank, world_size=world.world_size, timeout=WAIT_TIMEOUT, **options
    )


def stop() -> None:
    """Leave the process group, if this process joined one."""
    if torch_dist.is_available() and torch_dist.is_initialized():
        torch_dist.destroy_process_group()
