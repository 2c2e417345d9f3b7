"""A data-parallel rank that raises stops its peers within seconds (mae_bench/distributed.py,
issue 18 item 2): the ranks agree on the failure at their next agreement, every rank fails
the cell, rank 0 records the failing rank's traceback, and the other cells run.

This module is also the plugin package of the test (installed with
``tests.fault_plugins.write_distribution``): an ``mlp`` encoder that raises on one rank."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.distributed as torch_dist
import torch.multiprocessing as mp
from mae_bench_plugins.mlp import MLPMAE, MLPParams
from torch import Tensor

from mae_bench import hookimpl
from mae_bench.distributed import Dist, PeerFailed
from mae_bench.errors import exception_line
from tests.conftest import tiny_suite_data, write_suite
from tests.fault_plugins import pythonpath, write_distribution

FAULT_TIME_FILE = "MAE_BENCH_TEST_FAULT_TIME_FILE"  # where the fault writes when it was raised


class RankFaultParams(MLPParams):
    """The ``mlp`` encoder's sizes, and the rank whose training forward pass number
    ``fail_at_step`` (1-based) raises."""

    fail_rank: int = 1
    fail_at_step: int = 6


class RankFaultEncoder(MLPMAE):
    """The ``mlp`` encoder, raising on one data-parallel rank in the middle of training."""

    name = "rank-fault"
    Params = RankFaultParams

    def __init__(self, params: RankFaultParams, *, image_size: int, in_chans: int) -> None:
        super().__init__(params, image_size=image_size, in_chans=in_chans)
        self.training_steps = 0

    def forward_encoder(self, imgs: Tensor, ids_keep: Tensor) -> Tensor:
        if self.training and imgs.device.type != "meta":  # not the FLOP count's passes
            self.training_steps += 1
            rank = int(os.environ.get("RANK", "0"))
            if rank == self.params.fail_rank and self.training_steps == self.params.fail_at_step:
                stamp = os.environ.get(FAULT_TIME_FILE)
                if stamp:
                    Path(stamp).write_text(str(time.time()), encoding="utf-8")
                raise RuntimeError(
                    f"injected fault on rank {rank} at training step {self.training_steps}"
                )
        return super().forward_encoder(imgs, ids_keep)


@hookimpl
def register_encoders(register):
    register(RankFaultEncoder)


def run_whole(command: list[str], env: dict[str, str], timeout: float):
    """Run ``command``; after ``timeout`` seconds kill it and every process it started
    (torchrun starts each worker in a session of its own) and fail the test."""
    proc = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        for pid in [*_descendants(proc.pid), proc.pid]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"still running after {timeout} s (a rank hangs): {err}")
    return subprocess.CompletedProcess(command, proc.returncode, out, err)


def _descendants(pid: int) -> list[int]:
    """The processes under ``pid`` (children first), from /proc."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


def _suite(tmp_path: Path, fail_rank: int) -> Path:
    data = tiny_suite_data(name="rankfail")
    data["dataset"].update(n_pretrain=128, n_train=64, n_test=32)
    data["pretrain"] = {"epochs": 2, "batch_size": 32, "lr": 1e-3}  # 4 steps per epoch
    mlp = {"patch_size": 4, "dim": 32, "hidden": 64}
    data["variants"] = [
        {"name": "broken", "encoder": {"name": "rank-fault", **mlp, "fail_rank": fail_rank}},
        {"name": "fine", "encoder": {"name": "mlp", **mlp}},
    ]
    data["eval"] = {
        "reconstruction": {"num_images": 16},
        "linear_probe": {"epochs": 1},
        "knn": {"enabled": False},
        "thresholds": {"start": 0.25, "stop": 0.75, "step": 0.5},
    }
    return write_suite(tmp_path, data)


@pytest.mark.slow
def test_a_failing_rank_fails_the_cell_on_every_rank_within_seconds(tmp_path):
    """Rank 1 raises in its 6th training step (epoch 2 of 2): rank 0, about to wait in the
    gradients' all-reduce, learns it at the step's agreement; both fail the cell at once
    (before: rank 1 went to the barrier and rank 0 waited in the all-reduce for 12 hours),
    rank 0 records rank 1's traceback, and the other variant's cell runs."""
    fail_rank = 1
    suite = _suite(tmp_path, fail_rank)
    plugins = write_distribution(
        tmp_path / "site", module=__name__, distribution="mae-bench-rank-fault"
    )
    fault_time = tmp_path / "fault-time"
    env = {
        **os.environ,
        "PYTHONPATH": pythonpath(plugins),
        "OMP_NUM_THREADS": "1",
        FAULT_TIME_FILE: str(fault_time),
    }
    env.pop("MAE_BENCH_PLUGINS", None)
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
        "-m", "mae_bench", "run", str(suite), "--out", str(tmp_path / "out"), "--device", "cpu",
    ]  # fmt: skip
    done = run_whole(command, env, timeout=240)
    ended = time.time()
    assert fault_time.exists(), done.stderr
    # from the fault to both processes' exit, with the other cell trained and evaluated
    # (its run takes a few seconds; a hang would last MAE_BENCH_DIST_TIMEOUT_H)
    assert ended - float(fault_time.read_text()) < 60, done.stderr
    assert done.returncode == 1, done.stderr  # a cell failed; the suite ran to its end
    root = tmp_path / "out" / "rankfail"
    failed = sorted((root / "failed").glob("*.log"))
    assert len(failed) == 1 and failed[0].stem.startswith("broken"), done.stderr
    log = failed[0].read_text()
    first = log.splitlines()[0]
    assert f"rank {fail_rank}" in first and "injected fault" in first, log
    assert "Traceback" in log and "forward_encoder" in log, log  # the failing rank's own
    stored = [json.loads(p.read_text()) for p in (root / "cells").glob("*/pretrain.json")]
    assert [r["variant"] for r in stored] == ["fine"], done.stderr
    assert "cell(s) failed" in done.stderr and "injected fault" in done.stderr


# ------------------------------------------------ the agreement protocol, in two processes
def _stage_rank(rank: int, store: str, where: str, fail_rank: int, out: str) -> None:
    """One gloo rank: a DDP model trained in a stage, where ``fail_rank`` raises at step 3:
    in its forward pass (before the step's agreement) or in its backward pass (after it,
    while the peer waits in the gradients' all-reduce). Writes what it raised and when."""
    torch.set_num_threads(1)
    torch_dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    world = Dist(rank, 2, rank)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    outcome: dict[str, object] = {"rank": rank}
    try:
        with world.stage(torch.device("cpu")):
            world.agree()
            net = world.wrap(model, torch.device("cpu"))
            for step in range(1, 6):
                x = torch.randn(8, 4, requires_grad=True)
                fails = rank == fail_rank and step == 3
                if fails:
                    outcome["fault_at"] = time.time()
                if fails and where == "forward":
                    raise RuntimeError(f"injected fault in the forward pass of rank {rank}")
                y = net(x)
                world.agree()  # before the step's collectives (the gradients' all-reduce)
                if fails and where == "backward":
                    y.register_hook(partial(_raise_in_backward, rank))
                y.square().mean().backward()
        outcome["raised"] = None
    except PeerFailed as exc:
        outcome.update(raised="PeerFailed", line=exception_line(exc), text=str(exc))
    except RuntimeError as exc:
        outcome.update(raised="RuntimeError", line=exception_line(exc), text=str(exc))
    outcome["at"] = time.time()
    Path(out, f"rank{rank}.json").write_text(json.dumps(outcome), encoding="utf-8")
    world.barrier()  # the default group still works: the next cell could run
    torch_dist.destroy_process_group()


def _raise_in_backward(rank: int, grad: Tensor) -> Tensor:
    raise RuntimeError(f"injected fault in the backward pass of rank {rank}")


@pytest.mark.slow
@pytest.mark.parametrize(
    ("where", "fail_rank", "within_s"),
    [("forward", 0, (0, 5)), ("backward", 1, (2, 20))],
    ids=["forward-rank0", "backward-rank1"],
)
def test_ranks_agree_on_a_failure(tmp_path, monkeypatch, where, fail_rank, within_s):
    """A rank that raises before the step's agreement is known to its peer at once; one that
    raises after it (in the backward pass, its peer already waiting in the all-reduce) when
    that all-reduce times out (the step timeout, here 2 s). Either way both ranks end the
    stage with the failing rank's reason (the peer raises PeerFailed naming it, the failing
    rank its own error) and the default group still works for the next cell."""
    monkeypatch.setenv("MAE_BENCH_DIST_STEP_TIMEOUT_S", "2")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    mp.spawn(
        _stage_rank,
        args=(str(tmp_path / "store"), where, fail_rank, str(tmp_path)),
        nprocs=2,
        join=True,
    )
    outcomes = {
        r: json.loads((tmp_path / f"rank{r}.json").read_text(encoding="utf-8")) for r in (0, 1)
    }
    failing, peer = outcomes[fail_rank], outcomes[1 - fail_rank]
    assert failing["raised"] == "RuntimeError", failing
    assert f"{where} pass of rank {fail_rank}" in failing["line"]
    assert peer["raised"] == "PeerFailed", peer
    assert peer["line"].startswith(f"PeerFailed: rank {fail_rank} failed: RuntimeError: inj")
    assert "in _raise_in_backward" in peer["text"] or where == "forward"  # its traceback
    low, high = within_s
    for outcome in outcomes.values():
        assert low <= outcome["at"] - failing["fault_at"] < high, outcomes
