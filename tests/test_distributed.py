"""Data parallelism (mae_bench/distributed.py): ranks from the environment, the process
group's backend and device, and two gloo processes under torchrun matching one process."""

import json
import os
import pickle
import subprocess
import sys

import pytest
import torch

from mae_bench import UserError, distributed
from mae_bench.distributed import SINGLE, Dist, cell_device, env_world
from tests.conftest import invoke, results_of, tiny_suite_data, write_suite


def test_rank_logic_from_the_environment(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert env_world() is SINGLE and SINGLE.is_main and not SINGLE.active
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert env_world() == Dist(rank=2, world_size=4, local_rank=0)
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(UserError, match="RANK=4 is not within WORLD_SIZE=4"):
        env_world()
    monkeypatch.setenv("RANK", "x")
    with pytest.raises(UserError, match="not integers"):
        env_world()

    assert Dist(1, 4, 1).shard(32) == slice(8, 16)
    with pytest.raises(ValueError, match="does not split over 4 processes"):
        Dist(0, 4, 0).shard(30)
    cpu = torch.device("cpu")
    assert cell_device(cpu, Dist(1, 2, 1)) == cpu
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert cell_device(torch.device("cuda"), Dist(3, 4, 1)) == torch.device("cuda", 1)
    with pytest.raises(UserError, match="local rank 2 has no device"):
        cell_device(torch.device("cuda"), Dist(2, 4, 2))


def test_process_group_backend_and_device(monkeypatch):
    import atexit

    import torch.distributed as torch_dist

    calls = []
    monkeypatch.setattr(torch_dist, "is_initialized", lambda: False)
    monkeypatch.setattr(torch_dist, "init_process_group", lambda *a, **k: calls.append((a, k)))
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.append(("set", device)))
    monkeypatch.setattr(atexit, "register", lambda function: calls.append(("atexit", function)))
    distributed.start(Dist(0, 1, 0), torch.device("cpu"))
    assert calls == []  # one process: no group
    distributed.start(Dist(1, 2, 1), torch.device("cpu"))
    (args, kwargs), at_exit = calls
    assert args == ("gloo",) and kwargs["rank"] == 1 and kwargs["world_size"] == 2
    assert "device_id" not in kwargs and kwargs["timeout"] == distributed.WAIT_TIMEOUT
    assert at_exit == ("atexit", distributed.stop)  # the group is left at exit
    calls.clear()
    gpu = torch.device("cuda", 1)
    distributed.start(Dist(1, 2, 1), gpu)
    assert calls[0] == ("set", gpu)
    args, kwargs = calls[1]
    assert args == ("nccl",) and kwargs["device_id"] == gpu


def test_step_timeout_from_the_environment(monkeypatch):
    """The data-parallel stages' step timeout: 600 s, or MAE_BENCH_DIST_STEP_TIMEOUT_S; a bad
    value is one message naming the variable, before a process group is joined."""
    import datetime as dt

    import torch.distributed as torch_dist

    monkeypatch.delenv("MAE_BENCH_DIST_STEP_TIMEOUT_S", raising=False)
    assert distributed.step_timeout() == dt.timedelta(seconds=600)
    monkeypatch.setenv("MAE_BENCH_DIST_STEP_TIMEOUT_S", "2.5")
    assert distributed.step_timeout() == dt.timedelta(seconds=2.5)
    joined = []
    monkeypatch.setattr(torch_dist, "is_initialized", lambda: False)
    monkeypatch.setattr(torch_dist, "init_process_group", lambda *a, **k: joined.append(a))
    for bad in ("0", "-1", "soon", "inf"):
        monkeypatch.setenv("MAE_BENCH_DIST_STEP_TIMEOUT_S", bad)
        with pytest.raises(UserError, match="MAE_BENCH_DIST_STEP_TIMEOUT_S: expected a number"):
            distributed.start(Dist(1, 2, 1), torch.device("cpu"))
    assert joined == []


def test_rows_of_micro_batches():
    """A rank's rows of a batch split into micro-batches: its i-th micro-batch is its share of
    one process's i-th (so the ranks' i-th micro-batches, gathered, are one process's)."""
    assert Dist(1, 2, 1).rows(8) == slice(4, 8)
    assert SINGLE.rows(8, 4) == slice(0, 8)
    assert Dist(0, 2, 0).rows(8, 2).tolist() == [0, 1, 4, 5]
    assert Dist(1, 2, 1).rows(8, 2).tolist() == [2, 3, 6, 7]
    assert Dist(2, 3, 2).rows(12, 2).tolist() == [4, 5, 10, 11]
    with pytest.raises(ValueError, match="accum_iter=4 equal micro-batches"):
        Dist(0, 2, 0).rows(12, 4)


def test_a_peer_failure_names_the_rank_its_reason_and_traceback():
    """What every rank that did not fail raises: the first line names the failing rank and
    its reason (the cell's failure line); the message holds each failing rank's traceback."""
    reports = [
        distributed.FailureReport(1, 10.0, "OutOfMemoryError: CUDA out of memory (hint: ...)",
                                  "Traceback (most recent call last):\n  in forward\n"),
        distributed.FailureReport(3, 10.2, "OutOfMemoryError: CUDA out of memory", "tb 3\n"),
    ]  # fmt: skip
    exc = distributed.PeerFailed(reports)
    first, *rest = str(exc).splitlines()
    assert first == ("rank 1 failed (and rank 3): OutOfMemoryError: CUDA out of memory (hint: ...)")
    assert "  in forward" in rest and "tb 3" in rest and exc.reports == reports
    assert str(pickle.loads(pickle.dumps(exc))) == str(exc)  # a launcher's job may pickle it


@pytest.mark.slow
def test_torchrun_two_gloo_processes_match_one(tmp_path):
    data = tiny_suite_data(name="ddp")
    data["dataset"].update(n_pretrain=256)
    data["pretrain"] = {
        "epochs": 3,
        "batch_size": 32,
        "lr": 1e-3,
        "augment": {"crop_scale": [0.5, 1.0], "hflip": True},
    }
    # MSE alone: the uniformity gather has its own test (tests/test_ddp_hygiene.py)
    data["variants"] = [{k: v for k, v in v.items() if k != "loss"} for v in data["variants"]]
    suite = write_suite(tmp_path, data)
    one = invoke("run", str(suite), "--out", str(tmp_path / "one"), "--device", "cpu")
    assert one.exit_code == 0, one.output
    two = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node=2",
            "-m",
            "mae_bench",
            "run",
            str(suite),
            "--out",
            str(tmp_path / "two"),
            "--device",
            "cpu",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert two.returncode == 0, two.stderr
    assert "x 2 processes" in two.stderr and two.stdout.count("## ddp") == 1  # rank 0 reports
    a, b = results_of(tmp_path / "one" / "ddp"), results_of(tmp_path / "two" / "ddp")
    assert a.keys() == b.keys() and len(a) == 2
    for cell in a:
        assert b[cell]["history"]["loss"] == pytest.approx(a[cell]["history"]["loss"], rel=1e-5)
        for name, value in a[cell]["metrics"].items():
            assert b[cell]["metrics"][name] == pytest.approx(value, rel=1e-3, abs=1e-3), name
        record = json.loads(
            (tmp_path / "two" / "ddp" / "cells" / cell / "pretrain.json").read_text()
        )
        assert record["provenance"]["world_size"] == 2
