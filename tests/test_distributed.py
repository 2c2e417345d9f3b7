"""Data parallelism (mae_bench/distributed.py): ranks from the environment, the process
group's backend and device, and two gloo processes under torchrun matching one process."""

import json
import os
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
    import torch.distributed as torch_dist

    calls = []
    monkeypatch.setattr(torch_dist, "is_initialized", lambda: False)
    monkeypatch.setattr(torch_dist, "init_process_group", lambda *a, **k: calls.append((a, k)))
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.append(("set", device)))
    distributed.start(Dist(0, 1, 0), torch.device("cpu"))
    assert calls == []  # one process: no group
    distributed.start(Dist(1, 2, 1), torch.device("cpu"))
    (args, kwargs), = calls
    assert args == ("gloo",) and kwargs["rank"] == 1 and kwargs["world_size"] == 2
    assert "device_id" not in kwargs and kwargs["timeout"] == distributed.WAIT_TIMEOUT
    calls.clear()
    gpu = torch.device("cuda", 1)
    distributed.start(Dist(1, 2, 1), gpu)
    assert calls[0] == ("set", gpu)
    args, kwargs = calls[1]
    assert args == ("nccl",) and kwargs["device_id"] == gpu


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
    # MSE alone: a batch statistic (uniformity) sees each rank's share
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
