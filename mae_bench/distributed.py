"""Data-parallel cells: the process groups, this process's rank, and the few collectives the
runner needs. One process is a world of size 1 whose collectives do nothing.

Processes are started by ``torchrun`` (or a launcher, e.g. submitit's tasks per node), which
set ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``. NCCL on
CUDA, gloo on CPU. Only rank 0 claims cells, writes results and reports.

Three kinds of waits, three groups:

- the default group (timeout ``MAE_BENCH_DIST_TIMEOUT_H``, 12 hours): the waits between
  cells, while rank 0 claims, evaluates and stores a cell alone (:meth:`Dist.barrier`,
  :meth:`Dist.broadcast`);
- per data-parallel stage (a cell's pretraining, :meth:`Dist.stage`), two fresh groups with
  the short step timeout ``MAE_BENCH_DIST_STEP_TIMEOUT_S`` (600 s): the *training* group
  (NCCL on CUDA: DDP's gradients, batch statistics, the epoch's means) and the *agreeing*
  group (gloo: a few flags on the host, never a device sync).

Ranks agree before they enter the training group's collectives (:meth:`Dist.agree`: one
all-reduce of three flags: failed, stop signal, save request), so a rank that raises
(out of memory on one GPU, a plugin's error) tells the others at their next agreement,
within the step, instead of leaving them in an all-reduce it will never join: every rank
then fails the stage (:class:`PeerFailed` carries the failing rank's reason and traceback).
A rank that fails while a peer already waits in a training collective is found when that
collective times out (the step timeout); the stage's groups are then dropped and the next
cell gets fresh ones.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime as dt
import inspect
import os
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as torch_dist
from torch import Tensor
from torch.distributed import _functional_collectives as funcol

from mae_bench.errors import UserError, env_seconds, exception_line
from mae_bench.resume import STOPS

# rank 0 evaluates alone while the other ranks wait: a long fine-tuning must not time out
WAIT_TIMEOUT = dt.timedelta(hours=float(os.environ.get("MAE_BENCH_DIST_TIMEOUT_H", "12")))
STEP_TIMEOUT_ENV = "MAE_BENCH_DIST_STEP_TIMEOUT_S"
DEFAULT_STEP_TIMEOUT_S = 600.0
SIMULTANEOUS_S = 1.0  # failures this close in time are reported as one (e.g. OOM on two GPUs)


def step_timeout() -> dt.timedelta:
    """The training group's timeout, from ``MAE_BENCH_DIST_STEP_TIMEOUT_S`` (seconds);
    UserError naming the variable if it is not a positive number."""
    return dt.timedelta(seconds=env_seconds(STEP_TIMEOUT_ENV, DEFAULT_STEP_TIMEOUT_S))


@dataclass(frozen=True)
class FailureReport:
    """One rank's failure in a data-parallel stage: why, when, and its traceback."""

    rank: int
    at: float  # time.time() when it was caught
    line: str  # one line: the exception's type and message (and a hint)
    trace: str


class PeerFailed(RuntimeError):
    """Another rank failed in a stage every rank runs together: raised on every rank that did
    not fail itself (or whose own error came after the first one, e.g. a collective that
    timed out waiting for it). Its first line names the rank and its reason; the rest of the
    message holds each failing rank's traceback."""

    def __init__(self, reports: list[FailureReport]) -> None:
        self.reports = reports
        first = reports[0]
        more = [str(r.rank) for r in reports[1:]]
        others = f" (and rank{'s' if len(more) > 1 else ''} {', '.join(more)})" if more else ""
        traces = "\n".join(f"--- rank {r.rank}: {r.line}\n{r.trace}" for r in reports)
        super().__init__(f"rank {first.rank} failed{others}: {first.line}\n\n{traces}")

    def __reduce__(self) -> tuple[type[PeerFailed], tuple[list[FailureReport]]]:
        return PeerFailed, (self.reports,)  # picklable, e.g. by a launcher's job


@dataclass
class _Stage:
    """The groups of one data-parallel stage."""

    training: Any  # ProcessGroup: DDP's gradients, batch statistics, means
    agreeing: Any  # ProcessGroup (gloo): the flags and failure reports
    nccl: bool
    sharing: bool = False  # losses that are batch statistics gather the step's whole batch


_stage: _Stage | None = None


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

    # ------------------------------------------------ between cells: the long waits
    def barrier(self) -> None:
        """Wait until every process gets here (default group: the long timeout)."""
        if self.active:
            torch_dist.barrier()

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj``, on every rank (a picklable object; default group)."""
        if not self.active:
            return obj
        box = [obj if self.is_main else None]
        torch_dist.broadcast_object_list(box, src=0)
        return box[0]

    # ------------------------------------------------ within a stage: the training group
    def mean(self, tensor: Tensor) -> Tensor:
        """The mean of ``tensor`` over all processes (a new tensor)."""
        return self.means({"x": tensor})["x"]

    def means(self, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
        """Each tensor's mean over all processes, in one all-reduce (scalars of one device;
        an empty dict makes no collective)."""
        if not self.active or not tensors:
            return dict(tensors)
        packed = torch.stack([t.detach().float().reshape(()) for t in tensors.values()])
        torch_dist.all_reduce(packed, op=torch_dist.ReduceOp.SUM, group=_training_group())
        return dict(zip(tensors, (packed / self.world_size).unbind(), strict=True))

    def wrap(self, model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
        """``model`` for a training step: its DistributedDataParallel wrapper on the stage's
        training group in a data-parallel world (itself in one process). Buffers are
        broadcast from rank 0 before each forward pass only if some change in training (the
        running statistics of batch norms): the encoders' fixed positions never do."""
        if not self.active:
            return model
        return torch.nn.parallel.DistributedDataParallel(
            model,
            device_ids=[device] if device.type == "cuda" else None,
            process_group=_training_group(),
            **{_SYNC_BUFFERS: changes_buffers(model)},
        )

    def shard(self, batch_size: int) -> slice:
        """This rank's rows of a global batch (equal, contiguous parts)."""
        if batch_size % self.world_size:
            raise ValueError(
                f"the global batch of {batch_size} images does not split over "
                f"{self.world_size} processes: choose a batch size divisible by it"
            )
        part = batch_size // self.world_size
        return slice(self.rank * part, (self.rank + 1) * part)

    def rows(self, batch_size: int, micro_batches: int = 1) -> slice | Tensor:
        """This rank's rows of a global batch split into ``micro_batches`` accumulated parts,
        micro-batch by micro-batch: its i-th micro-batch is its share of the global i-th one,
        so the ranks' i-th micro-batches together are the rows one process would take (a
        contiguous slice with one micro-batch, else an index tensor). ValueError if the
        batch does not split into equal parts."""
        part = self.shard(batch_size)
        if micro_batches == 1 or not self.active:
            return part
        if batch_size % (self.world_size * micro_batches):
            raise ValueError(
                f"a batch of {batch_size} images on {self.world_size} processes does not "
                f"split into accum_iter={micro_batches} equal micro-batches"
            )
        grid = torch.arange(batch_size).view(micro_batches, self.world_size, -1)
        return grid[:, self.rank].reshape(-1)

    # ------------------------------------------------ within a stage: agreeing on the host
    def agree(self, stop: int | None = None, save: bool = False) -> tuple[int | None, bool]:
        """What every rank asks at this point: a stop signal (its number; the highest if
        several) and a checkpoint; one all-reduce of three flags on the host, on the stage's
        agreeing group. Raises :class:`PeerFailed` if a rank failed (it called
        :meth:`stage`'s failure path instead of getting here)."""
        if not self.active:
            return stop, save
        flags = torch.tensor([0.0, float(stop or 0), float(save)])
        torch_dist.all_reduce(flags, op=torch_dist.ReduceOp.MAX, group=_agreeing_group())
        if flags[0] > 0:
            raise PeerFailed(self._exchange_reports(None))
        return (int(flags[1]) or None), bool(flags[2])

    def _exchange_reports(self, mine: FailureReport | None) -> list[FailureReport]:
        """Every failing rank's report (in the order they failed), on every rank."""
        box: list[FailureReport | None] = [None] * self.world_size
        torch_dist.all_gather_object(box, mine, group=_agreeing_group())
        return sorted((r for r in box if r is not None), key=lambda r: (r.at, r.rank))

    def _fail(
        self, exc: BaseException, describe: Callable[[BaseException], str]
    ) -> PeerFailed | None:
        """Tell the other ranks that this one failed (they learn it at their next agreement)
        and exchange reports; a :class:`PeerFailed` to raise instead of ``exc`` when another
        rank failed first (``exc`` then followed from it), else None."""
        mine = FailureReport(
            self.rank, time.time(), describe(exc), "".join(traceback.format_exception(exc))
        )
        try:
            flags = torch.tensor([1.0, 0.0, 0.0])
            torch_dist.all_reduce(flags, op=torch_dist.ReduceOp.MAX, group=_agreeing_group())
            reports = self._exchange_reports(mine)
        except Exception as err:  # the agreeing group failed too (a peer is gone)
            print(f"rank {self.rank}: could not tell the other ranks ({exception_line(err)})",
                  file=sys.stderr)  # fmt: skip
            return None
        first = [r for r in reports if r.at - reports[0].at <= SIMULTANEOUS_S]
        if any(r.rank == self.rank for r in first):
            return None
        return PeerFailed(first)

    @contextlib.contextmanager
    def stage(
        self, device: torch.device, describe: Callable[[BaseException], str] = exception_line
    ) -> Iterator[None]:
        """A stage every rank runs together (a cell's data-parallel pretraining), on two
        fresh groups with the step timeout (see the module's docstring), destroyed at its
        end; nested, it is the enclosing one. At its end every rank agrees that all got
        there; a rank that raises (anything but a stop signal) tells the others, which
        raise :class:`PeerFailed` at their next agreement; it raises its own exception
        (``describe`` gives the line the others report). No-op in one process."""
        global _stage
        if not self.active or _stage is not None:
            yield
            return
        timeout = step_timeout()
        nccl = device.type == "cuda"
        training = torch_dist.new_group(backend="nccl" if nccl else "gloo", timeout=timeout)
        # the agreeing group outlasts a training collective that times out waiting for a
        # failed rank, so the rank that waited still meets that rank's failure report there
        agreeing = torch_dist.new_group(backend="gloo", timeout=2 * timeout)
        _stage = _Stage(training, agreeing, nccl)
        failed = False
        try:
            yield
            self.agree()  # the stage's end: every rank got here
        except PeerFailed:
            failed = True
            raise
        except STOPS:  # a stop signal every rank acts on (agreed), or Ctrl-C: not a failure
            raise
        except BaseException as exc:
            failed = True
            instead = self._fail(exc, describe)
            if instead is not None:
                raise instead from exc
            raise
        finally:
            stage, _stage = _stage, None
            _close(stage, aborted=failed)

    @contextlib.contextmanager
    def shared_batch(self) -> Iterator[None]:
        """Within it (a data-parallel training loop), loss terms that are statistics of the
        batch see the step's whole batch: :func:`gather_batch` gathers it over the ranks."""
        if not self.active or _stage is None:
            yield
            return
        _stage.sharing = True
        try:
            yield
        finally:
            if _stage is not None:
                _stage.sharing = False


# DDP's option to broadcast buffers before each forward pass (still synced once at the
# start): forward_sync_buffers in newer torch, broadcast_buffers (deprecated there) before
_SYNC_BUFFERS = (
    "forward_sync_buffers"
    if "forward_sync_buffers"
    in inspect.signature(torch.nn.parallel.DistributedDataParallel.__init__).parameters
    else "broadcast_buffers"
)


def changes_buffers(model: torch.nn.Module) -> bool:
    """Whether training changes some of ``model``'s buffers: the running statistics of batch
    and instance norms (other buffers, e.g. fixed sin-cos positions, are constants)."""
    return any(
        isinstance(m, torch.nn.modules.batchnorm._NormBase) and m.track_running_stats
        for m in model.modules()
    )


def gather_batch(rows: Tensor) -> Tensor:
    """``rows`` (this rank's part of a batch, first dimension) with every other rank's, in
    rank order, during a data-parallel training step (:meth:`Dist.shared_batch`); gradients
    flow back to each rank's own rows. Outside one (one process, evaluation, FLOP counts),
    ``rows`` itself. For losses that are statistics of the whole batch: with the DDP
    average of gradients, the loss and its gradient are those of one process."""
    if _stage is None or not _stage.sharing:
        return rows
    return funcol.all_gather_single_autograd(rows.contiguous(), 0, _stage.training)


def _training_group() -> Any:
    return _stage.training if _stage is not None else None  # None: the default group


def _agreeing_group() -> Any:
    return _stage.agreeing if _stage is not None else None


def _close(stage: _Stage | None, *, aborted: bool) -> None:
    """Destroy a stage's groups; after a failure, NCCL's is aborted first (a peer's
    collective may still wait on the device)."""
    if stage is None:
        return
    for group in (stage.training, stage.agreeing):
        try:
            if aborted and stage.nccl and group is stage.training:
                group.abort()
            torch_dist.destroy_process_group(group)
        except Exception as err:  # already gone with its peer
            print(f"warning: could not close a process group ({exception_line(err)})",
                  file=sys.stderr)  # fmt: skip


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
    """Join the process group of ``world`` (NCCL on CUDA, gloo elsewhere), left again when
    the process exits (:func:`stop`); no-op for one process."""
    if not world.active or torch_dist.is_initialized():
        return
    step_timeout()  # a bad MAE_BENCH_DIST_STEP_TIMEOUT_S is one message, before any work
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    options: dict[str, Any] = {"device_id": device} if device.type == "cuda" else {}
    torch_dist.init_process_group(
        backend, rank=world.rank, world_size=world.world_size, timeout=WAIT_TIMEOUT, **options
    )
    atexit.register(stop)


def stop() -> None:
    """Leave the process group, if this process joined one (a stage's groups too)."""
    global _stage
    stage, _stage = _stage, None
    if torch_dist.is_available() and torch_dist.is_initialized():
        _close(stage, aborted=True)
        torch_dist.destroy_process_group()
