"""Data-parallel pretraining that costs the GPUs nothing it need not (issue 18, item 5): one
agreement per step on the host instead of two device all-reduces, no per-forward broadcast of
constant buffers, each rank reading only its share of the batch, a mid-epoch resume that
restores every rank's running sums, ``uniformity`` seeing the whole batch whatever the
number of processes, and the process group left at exit.

The single-process tests use a real process group of one gloo process, seen by the code as
rank r of 2 (a *fake world*: the collectives run, the shares are the real ones); the others
run two gloo processes."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.distributed as torch_dist
import torch.multiprocessing as mp
from torch import Tensor

from mae_bench import resume
from mae_bench.data import ImageFeeder
from mae_bench.distributed import SINGLE, Dist, changes_buffers
from mae_bench.plugins import load_registry
from mae_bench.resume import Checkpoint
from mae_bench.suite import resolve_suite
from mae_bench.train import pretrain
from tests.conftest import ROOT, tiny_suite_data

AUGMENT = {"crop_scale": [0.3, 1.0], "hflip": True}


@pytest.fixture
def one_process_group() -> Iterator[None]:
    """A real gloo process group of this one process (the fake world's collectives run)."""
    torch_dist.init_process_group("gloo", store=torch_dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        torch_dist.destroy_process_group()


def _suite(registry, loss: list | None = None, **pretrain_changes):
    data = tiny_suite_data()
    data["dataset"].update(n_pretrain=64)
    data["pretrain"] = {"epochs": 1, "batch_size": 16, "lr": 1e-3, **pretrain_changes}
    vit = data["variants"][1]
    vit["loss"] = loss or [{"name": "mse"}]
    data["variants"] = [vit]
    return resolve_suite(data, registry)


class ReadLog:
    """uint8 images whose reads (the indices asked for) are recorded."""

    def __init__(self, images: Tensor) -> None:
        self.images = images
        self.reads: list[Tensor] = []

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: Tensor) -> Tensor:
        self.reads.append(index.clone())
        return self.images[index]


class FedLog(ImageFeeder):
    """A feeder that records each batch it feeds (a step starts with it)."""

    def __call__(self, *args, **kwargs) -> Tensor:
        x = super().__call__(*args, **kwargs)
        self.__dict__.setdefault("fed", []).append(x.clone())
        return x


def _train(suite, world: Dist, images: Tensor | ReadLog, **options):
    """One epoch of the suite's ViT as ``world``'s rank; the feeder that recorded its batches."""
    variant = suite.variants[0]
    feeder = FedLog(16, 3, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3), torch.device("cpu"))
    torch.manual_seed(0)
    model = variant.build_model(16, 3)
    pretrain(
        model, images, feeder, variant.build_masking(), variant.build_losses(),
        suite.config.pretrain, seed=0, world=world, **options,
    )  # fmt: skip
    return feeder


# ------------------------------------------------------------------ (a) one agreement a step
@pytest.mark.parametrize(("accum_iter", "loss", "per_step"), [
    (1, [{"name": "mse"}], 1),
    (2, [{"name": "mse"}], 1),
    (2, [{"name": "mse"}, {"name": "uniformity", "weight": 0.1}], 2),
], ids=["mse", "mse-accum2", "uniformity-accum2"])  # fmt: skip
def test_one_host_agreement_per_step(
    registry, one_process_group, monkeypatch, accum_iter, loss, per_step
):
    """The collectives a data-parallel step makes besides DDP's gradients: one all-reduce of
    three flags on the host (failed, stop, save), on the stage's gloo group, before the step's
    last loss (and before each micro-batch's loss when a loss gathers the batch); the epoch's
    end adds one more agreement and one all-reduce of all its means. Before: two all-reduces
    a step (the stop and the save flags, each a device sync on CUDA), one per mean."""
    suite = _suite(registry, loss, accum_iter=accum_iter)
    calls: list[tuple[int, str, bool, bool]] = []  # (step, device, is a MAX, default group)
    fed: list[int] = []  # collectives made so far when each step's batch is fed
    real = torch_dist.all_reduce

    def counted(tensor, op=torch_dist.ReduceOp.SUM, group=None, async_op=False):
        flags = op == torch_dist.ReduceOp.MAX and tensor.shape == (3,)
        calls.append((len(fed), tensor.device.type, flags, group is None))
        return real(tensor, op=op, group=group, async_op=async_op)

    class StepFeeder(FedLog):
        def __call__(self, *args, **kwargs) -> Tensor:
            fed.append(len(calls))
            return super().__call__(*args, **kwargs)

    monkeypatch.setattr(torch_dist, "all_reduce", counted)
    variant = suite.variants[0]
    feeder = StepFeeder(16, 3, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3), torch.device("cpu"))
    images = suite.build_dataset().load().pretrain
    pretrain(
        variant.build_model(16, 3), images, feeder, variant.build_masking(),
        variant.build_losses(), suite.config.pretrain, seed=0, world=Dist(0, 2, 0),
    )  # fmt: skip
    steps = len(fed)
    assert steps == 4
    by_step = [[c for c in calls if c[0] == s] for s in range(steps + 1)]
    assert [len(c) for c in by_step[1:-1]] == [per_step] * (steps - 1), calls
    assert len(by_step[0]) == 1 and by_step[0][0][2]  # before the first step: ready to train
    # the last step, then the epoch's end (an agreement, then its means in one all-reduce)
    # and the stage's end (an agreement)
    assert len(by_step[-1]) == per_step + 3, by_step[-1]
    flags = [c for c in calls if c[2]]
    assert len(flags) == len(calls) - 1  # all but the means
    assert all(device == "cpu" and not default for _, device, _, default in flags), flags


# ------------------------------------------------------------------ (b) constant buffers
def test_constant_buffers_are_not_broadcast_each_forward(registry, one_process_group, monkeypatch):
    """The encoders' buffers are fixed sin-cos positions: DDP does not re-send them before
    every micro-batch (it did: ``broadcast_buffers`` defaulted to True); a model with batch
    norm running statistics still has them synced."""
    wrapped: list[torch.nn.parallel.DistributedDataParallel] = []
    ddp = torch.nn.parallel.DistributedDataParallel

    class Recorded(ddp):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            wrapped.append(self)

    monkeypatch.setattr(torch.nn.parallel, "DistributedDataParallel", Recorded)
    suite = _suite(registry)
    _train(suite, Dist(0, 2, 0), suite.build_dataset().load().pretrain)
    (net,) = wrapped
    assert [name for name, _ in net.module.named_buffers()]  # positions: buffers, constant
    assert not net.will_sync_module_buffers()
    for variant in resolve_suite(tiny_suite_data(), registry).variants:  # the mlp, the vit
        assert not changes_buffers(variant.build_model(16, 3)), variant.name
    with_norm = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))
    assert changes_buffers(with_norm)
    assert Dist(0, 2, 0).wrap(with_norm, torch.device("cpu")).will_sync_module_buffers()


# ------------------------------------------------------------------ (c) each rank its share
@pytest.mark.parametrize("accum_iter", [1, 2])
def test_each_rank_reads_only_its_share_and_the_shares_make_the_batch(
    registry, one_process_group, accum_iter
):
    """Rank r of 2 reads from the stored images only its rows of every batch (before, every
    rank gathered the whole global batch from the memory map); the two ranks' reads are
    disjoint and together the single-process batch, and the images they feed (augmented,
    the crops drawn for the whole batch) are the single process's rows, bit for bit. With
    micro-batches, a rank's i-th micro-batch is its share of the single process's i-th."""
    suite = _suite(registry, accum_iter=accum_iter, augment=AUGMENT)
    images = suite.build_dataset().load().pretrain
    single = ReadLog(images)
    fed_single = _train(suite, SINGLE, single).fed
    steps = len(fed_single)
    batch = suite.config.pretrain.batch_size
    micro, share = batch // accum_iter, batch // accum_iter // 2  # global, one rank's
    shares = []
    for rank in (0, 1):
        # its i-th micro-batch: its half of the single process's i-th
        rows = torch.cat(
            [torch.arange(i * micro + rank * share, i * micro + (rank + 1) * share)
             for i in range(accum_iter)]
        )  # fmt: skip
        log = ReadLog(images)
        fed = _train(suite, Dist(rank, 2, rank), log).fed
        assert len(log.reads) == steps
        for step in range(steps):
            assert torch.equal(log.reads[step], single.reads[step][rows])
            assert torch.equal(fed[step], fed_single[step][rows])
        shares.append(rows)
    assert sorted(torch.cat(shares).tolist()) == list(range(batch))  # disjoint, and all of it


# ------------------------------------------------------------------ two gloo processes
def _two_ranks(rank: int, store: str, folder: str) -> None:
    """One of two gloo ranks: (d) a run stopped mid-epoch by SIGTERM on rank 0 alone, then
    resumed, and the same run uninterrupted; (e) the tiny ViT with MSE + uniformity, one
    step an epoch, its first epoch's terms and gradients (the optimizer's first moment in
    the checkpoint after epoch 1), on two ranks and (rank 0) in one process. Writes its
    findings to ``folder/rank<r>.json``."""
    torch.set_num_threads(1)
    torch_dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    world = Dist(rank, 2, rank)
    registry = load_registry()
    found: dict[str, object] = {}

    class SignalledFeeder(ImageFeeder):
        def __call__(self, *args, **kwargs) -> Tensor:
            self.__dict__["calls"] = self.__dict__.get("calls", 0) + 1
            if rank == 0 and self.__dict__["calls"] == self.__dict__.get("signal_at"):
                os.kill(os.getpid(), signal.SIGTERM)
            return super().__call__(*args, **kwargs)

    def run(suite, world: Dist, checkpoint: Checkpoint | None, signal_at: int | None = None):
        variant = suite.variants[0]
        feeder = SignalledFeeder(16, 3, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3), torch.device("cpu"))
        feeder.__dict__["signal_at"] = signal_at
        torch.manual_seed(0)
        model = variant.build_model(16, 3)
        result = pretrain(
            model, suite.build_dataset().load().pretrain, feeder, variant.build_masking(),
            variant.build_losses(), suite.config.pretrain, seed=0, world=world,
            checkpoint=checkpoint,
        )  # fmt: skip
        return result.history

    def checkpoint(name: str, every: int, writer: bool = world.is_main) -> Checkpoint:
        return Checkpoint(Path(folder, name), "key", every, writer=writer)

    # (d): the MLP with MSE, 4 steps an epoch, 2 epochs; rank 0 gets SIGTERM feeding step 6
    data = tiny_suite_data()
    data["dataset"].update(n_pretrain=64)
    data["pretrain"] = {"epochs": 2, "batch_size": 16, "lr": 1e-3}
    data["variants"] = [data["variants"][0]]
    suite = resolve_suite(data, registry)
    with resume.handle_signals():
        found["uninterrupted"] = run(suite, world, None)
        try:
            run(suite, world, checkpoint("stopped.pt", 0), signal_at=6)
            found["stopped"] = None
        except resume.Terminated as exc:
            found["stopped"] = exc.detail
        world.barrier()  # rank 0 has written the checkpoint
        found["resumed"] = run(suite, world, checkpoint("stopped.pt", 0))
    # (e): the ViT (mean-pooled embedding), MSE + uniformity (weight 1), batch 32 = one step
    data = tiny_suite_data()
    data["dataset"].update(n_pretrain=32)
    data["pretrain"] = {"epochs": 2, "batch_size": 32, "lr": 1e-3, "checkpoint_every": 1}
    vit = data["variants"][1]
    vit.update(masking={"name": "random"}, loss=[{"name": "mse"}, {"name": "uniformity"}])
    data["variants"] = [vit]
    suite = resolve_suite(data, registry)
    runs = {"two": (world, checkpoint("two.pt", 1))}
    if rank == 0:
        runs["one"] = (SINGLE, checkpoint("one.pt", 1, writer=True))
    for name, (who, saved) in runs.items():
        found[f"{name}_epoch1"] = run(suite, who, saved)[0]
        if who is world:
            world.barrier()  # rank 0 has written the checkpoint
        moments = torch.load(saved.path, weights_only=True)["optimizer"]["state"]
        found[f"{name}_first_moments"] = [moments[k]["exp_avg"].tolist() for k in sorted(moments)]
    Path(folder, f"rank{rank}.json").write_text(json.dumps(found), encoding="utf-8")
    torch_dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> dict[int, dict]:
    folder = tmp_path_factory.mktemp("two_ranks")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_two_ranks, args=(str(folder / "store"), str(folder)), nprocs=2, join=True)
    return {r: json.loads((folder / f"rank{r}.json").read_text()) for r in (0, 1)}


@pytest.mark.slow
def test_a_mid_epoch_resume_restores_every_ranks_running_sums(two_ranks):
    """SIGTERM reaches rank 0 alone in the middle of epoch 2: both ranks stop at the same step
    after rank 0 saved; resumed, the run logs the same epoch means as an uninterrupted one
    (the checkpoint holds the ranks' mean of the running sums; before, every rank resumed
    with rank 0's, and epoch 2's loss was off)."""
    for rank in (0, 1):
        found = two_ranks[rank]
        assert found["stopped"] == "checkpoint saved in epoch 2", found["stopped"]
        uninterrupted, resumed = found["uninterrupted"], found["resumed"]
        assert len(resumed) == len(uninterrupted) == 2
        for a, b in zip(uninterrupted, resumed, strict=True):
            assert b.keys() == a.keys()
            for key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-6, abs=1e-9), (rank, key)


@pytest.mark.slow
def test_uniformity_sees_the_whole_batch_on_two_processes(two_ranks):
    """One step on 32 images, 16 per rank: the uniformity term, the loss and the gradients
    (AdamW's first moment after the step: 0.1 x gradient) are those of one process on the
    32 images (before: each rank's uniformity saw only its 16 images' pairs)."""
    one = two_ranks[0]
    for rank in (0, 1):
        two = two_ranks[rank]
        for key in ("uniformity", "mse", "loss"):
            assert two["two_epoch1"][key] == pytest.approx(one["one_epoch1"][key], abs=1e-6), key
        for a, b in zip(two["two_first_moments"], one["one_first_moments"], strict=True):
            a, b = torch.tensor(a), torch.tensor(b)
            assert (a - b).abs().max() <= 1e-5 * b.abs().max(), (a - b).abs().max()


# ------------------------------------------------------------------ (f) the group at exit
_PIPES = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}
_EXIT_CHECK = """
import atexit, sys, torch, torch.distributed as torch_dist
from mae_bench import distributed
atexit.register(lambda: print("initialized at exit:", torch_dist.is_initialized(), flush=True))
rank = int(sys.argv[1])
distributed.start(distributed.Dist(rank, 2, rank), torch.device("cpu"))
distributed.Dist(rank, 2, rank).barrier()
print("joined", flush=True)
"""


@pytest.mark.slow
def test_the_process_group_is_destroyed_at_exit(tmp_path):
    """Two processes join a gloo group and exit normally: the group is destroyed before the
    interpreter ends (NCCL warns otherwise, and may hang at exit)."""
    with socket.socket() as probe:  # a free port for the group's store
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {
        **os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
        "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT),
    }  # fmt: skip
    procs = []
    for rank in (0, 1):
        command = [sys.executable, "-c", _EXIT_CHECK, str(rank)]
        procs.append(subprocess.Popen(command, env=env, cwd=tmp_path, **_PIPES))
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        assert "joined" in out and "initialized at exit: False" in out, out + err
