"""Scale-out: checkpoints and exact resume, leases, run-cell, status, launchers, DDP."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from mae_bench.plan import suite_cells
from tests.conftest import ROOT, cell_record, invoke, run_cli, tiny_suite_data

MAE_BENCH = str(Path(sys.executable).parent / "mae-bench")
TIMING_KEYS = {"pretrain_s", "imgs_per_s", "peak_mem_mb"}


def slow_suite(tmp_path: Path, name: str = "slow", **pretrain) -> Path:
    """One ViT cell whose pretraining takes a few seconds (long enough to kill it)."""
    data = tiny_suite_data(name=name)
    data["dataset"].update(n_pretrain=512)
    data["pretrain"] = {"epochs": 10, "batch_size": 32, "lr": 1e-3, **pretrain}
    data["variants"] = [v for v in data["variants"] if v["name"] == "vit"]
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def results_of(root: Path) -> dict[str, dict]:
    """Per cell: every stored metric except timings, and the pretraining history."""
    out = {}
    for cell in sorted((root / "cells").iterdir()):
        if cell.name.startswith("."):
            continue
        record = cell_record(cell)
        metrics = {k: v for k, v in record["metrics"].items() if k not in TIMING_KEYS}
        history = pd.read_csv(cell / "history.csv").to_dict("list")
        out[cell.name] = {"metrics": metrics, "history": history}
    return out


def wait_for_epoch(
    root: Path, epoch: int, proc: subprocess.Popen | None = None, timeout: float = 120
) -> dict:
    """Wait until a run's lease says it finished ``epoch`` (its checkpoint is saved); the
    lease. ``proc``: the run, which must not end first."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc is None or proc.poll() is None, proc.communicate()
        for lease in (root / "leases").glob("*.json"):
            try:
                held = json.loads(lease.read_text())
                if held["epoch"] >= epoch:
                    return held
            except (OSError, ValueError, KeyError):
                pass
        time.sleep(0.02)
    raise AssertionError(f"no epoch {epoch} within {timeout} s")


@pytest.mark.slow
def test_kill_9_resumes_from_checkpoint_with_identical_metrics(tmp_path):
    suite = slow_suite(tmp_path, checkpoint_every=1)
    straight = run_cli("run", str(suite), "--out", str(tmp_path / "a"))
    assert straight.returncode == 0, straight.stderr
    root = tmp_path / "b" / "slow"
    proc = subprocess.Popen(
        [MAE_BENCH, "run", str(suite), "--out", str(tmp_path / "b")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for_epoch(root, 3, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    (checkpoint,) = (root / "checkpoints").glob("*.pt")
    saved = torch.load(checkpoint, weights_only=True)["epoch"]
    assert 3 <= saved < 10
    assert not (root / "cells").exists() or not any((root / "cells").glob("vit-*"))

    status = invoke("status", str(root))
    assert status.exit_code == 0 and "will resume from its checkpoint" in status.stdout
    again = run_cli("run", str(suite), "--out", str(tmp_path / "b"))
    assert again.returncode == 0, again.stderr
    assert f"from epoch {saved}" in again.stderr and "resumed vit-seed0-" in again.stderr
    assert results_of(root) == results_of(tmp_path / "a" / "slow")  # exactly, on CPU
    assert not list((root / "checkpoints").glob("*.pt"))  # removed once the cell is stored


def pretrain_first_variant(suite, variant=None, *, init_seed=0, **options):
    """Pretrain the suite's first variant (or ``variant``) in this process: (model, result)."""
    from mae_bench.data import ImageFeeder
    from mae_bench.train import pretrain

    data = suite.build_dataset().load()
    feeder = ImageFeeder.fit(data.pretrain, image_size=16, channels=3, device=torch.device("cpu"))
    variant = variant or suite.variants[0]
    torch.manual_seed(init_seed)
    model = variant.build_model(16, 3)
    result = pretrain(
        model,
        data.pretrain,
        feeder,
        variant.build_masking(),
        variant.build_losses(),
        suite.config.pretrain,
        seed=0,
        **options,
    )
    return model, result


def test_sigterm_mid_epoch_saves_a_checkpoint_and_resumes_exactly(tmp_path, registry, monkeypatch):
    from mae_bench import resume
    from mae_bench.suite import resolve_suite

    suite = resolve_suite(yaml.safe_load(slow_suite(tmp_path, epochs=3).read_text()), registry)

    def run(checkpoint=None, init_seed=0, on_resume=None):
        return pretrain_first_variant(
            suite, init_seed=init_seed, checkpoint=checkpoint, on_resume=on_resume
        )

    model_a, straight = run()
    checkpoint = resume.Checkpoint(tmp_path / "c.pt", "key", every=0)  # only on signals
    calls = {"n": 0}
    real = resume.requested

    def stop_at_step_20():  # the 20th step of 48: in the middle of epoch 2
        calls["n"] += 1
        return (signal.SIGTERM, False) if calls["n"] == 20 else real()

    monkeypatch.setattr(resume, "requested", stop_at_step_20)
    with pytest.raises(resume.Terminated, match="checkpoint saved in epoch 2"):
        run(checkpoint)
    monkeypatch.setattr(resume, "requested", real)
    assert torch.load(checkpoint.path, weights_only=True)["batch"] == 4
    resumed: list[int] = []
    # another init and global seed: the checkpoint restores the weights and every generator
    model_b, again = run(checkpoint, init_seed=123, on_resume=resumed.append)
    assert resumed == [1]  # one epoch done, then 4 batches of the second
    assert again.history == straight.history
    for a, b in zip(model_a.state_dict().values(), model_b.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    # a stale checkpoint (other settings) is not resumed from
    with pytest.warns(UserWarning, match="written for other settings"):
        assert resume.Checkpoint(checkpoint.path, "other").load() is None


def test_accumulated_micro_batches_and_blr_match_one_batch(tmp_path, registry):
    from mae_bench.suite import resolve_suite

    histories, cell_ids = [], []
    for accum in (1, 4):
        raw = yaml.safe_load(slow_suite(tmp_path, epochs=2, accum_iter=accum).read_text())
        raw["pretrain"].pop("lr")
        raw["pretrain"]["blr"] = 8e-3  # lr = 8e-3 * 32 / 256 = 1e-3
        suite = resolve_suite(raw, registry)
        assert suite.config.pretrain.lr == pytest.approx(1e-3)
        _, result = pretrain_first_variant(suite, replace_losses(suite.variants[0]))
        histories.append(result.history)
        cell_ids.append(suite_cells(suite)[0].cell_id)
    ones, fours = histories
    for a, b in zip(ones, fours, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
    # accum_iter changes how a cell runs, not what it computes: the same cell
    assert cell_ids[0] == cell_ids[1] and cell_ids[0].startswith("vit-seed0-")


def replace_losses(variant):
    """The variant with MSE alone (uniformity is a batch statistic: micro-batches change it)."""
    import dataclasses

    return dataclasses.replace(variant, losses=variant.losses[:1])


def test_leases_one_holder_and_expiry(tmp_path, monkeypatch):
    from mae_bench import leases as leases_module
    from mae_bench.leases import Leases

    leases = Leases(tmp_path)
    first = leases.claim("cell-a")
    assert first is not None and leases.claim("cell-a") is None  # held: a second claim fails
    first.update(stage="pretraining", epoch=3, epochs=10)
    held = leases.read("cell-a")
    assert (held.stage, held.epoch, held.pid) == ("pretraining", 3, os.getpid())
    first.release()
    assert leases.read("cell-a") is None and not leases.path("cell-a").exists()

    # a holder of this host that is gone (kill -9) loses its lease at once
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    ).stdout.strip()
    stale = leases.claim("cell-b")
    stale._stop.set()
    data = json.loads(leases.path("cell-b").read_text())
    leases.path("cell-b").write_text(json.dumps({**data, "pid": int(dead)}))
    taken = leases.claim("cell-b")
    assert taken is not None and taken.info.token != data["token"]
    assert not stale.held()  # the old holder can tell its lease was taken over
    taken.release()

    # another host's lease expires when its heartbeat is older than the time to live
    other = leases.claim("cell-c")
    other._stop.set()
    data = json.loads(leases.path("cell-c").read_text())
    leases.path("cell-c").write_text(json.dumps({**data, "host": "elsewhere"}))
    assert leases.claim("cell-c") is None  # fresh heartbeat: alive
    old = time.time() - leases_module.TTL_S - 1
    os.utime(leases.path("cell-c"), (old, old))
    assert leases.read("cell-c") is None
    assert leases.claim("cell-c") is not None


def test_two_runs_on_one_folder_compute_each_cell_once(tmp_path):
    data = tiny_suite_data(name="shared", seeds=[0, 1, 2])
    suite = tmp_path / "shared.yaml"
    suite.write_text(yaml.safe_dump(data))
    out = str(tmp_path / "out")
    procs = [
        subprocess.Popen(
            [MAE_BENCH, "run", str(suite), "--out", out],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    logs = [proc.communicate(timeout=300) for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], logs
    done = [line for _, err in logs for line in err.splitlines() if line.startswith("done ")]
    names = sorted(line.split(":")[0] for line in done)
    expected = sorted(f"done {v} seed {s}" for v in ("mlp", "vit") for s in (0, 1, 2))
    assert names == expected  # every cell once, by one of the two processes
    root = tmp_path / "out" / "shared"
    board = pd.read_csv(root / "runs.csv")
    assert len(board) == 6  # the process that ended last wrote every cell
    status = invoke("status", str(root))
    assert status.stdout.count("done ") == 6 and "6 done" in status.stderr


def test_run_cell_runs_named_cells_and_status_reports_each_state(tmp_path, tiny_suite_file):
    from mae_bench.leases import Leases

    out = tmp_path / "out"
    first = invoke("run", str(tiny_suite_file), "--out", str(out), "--set", "seeds=[0, 1]")
    assert first.exit_code == 0, first.stderr
    root = out / "tiny"
    record = json.loads((root / "suite.json").read_text())
    ids = [c["cell_id"] for c in record["cells"]]
    import shutil

    for cell_id in ids[1:]:
        shutil.rmtree(root / "cells" / cell_id)
    (root / "failed").mkdir(exist_ok=True)
    (root / "failed" / f"{ids[1]}.log").write_text("ValueError: boom\n\ntraceback")
    lease = Leases(root).claim(ids[2])
    lease.update(stage="pretraining", epoch=1, epochs=2)
    rows = {line.split()[1]: line for line in invoke("status", str(root)).stdout.splitlines()}
    assert rows[ids[0]].startswith("done")
    assert rows[ids[1]].startswith("failed") and "ValueError: boom" in rows[ids[1]]
    assert str(root / "failed" / f"{ids[1]}.log") in rows[ids[1]]
    assert rows[ids[2]].startswith("running") and f"pid {os.getpid()}" in rows[ids[2]]
    assert "pretraining epoch 1/2" in rows[ids[2]]
    assert rows[ids[3]].startswith("pending")
    as_json = [
        json.loads(line) for line in invoke("status", str(root), "--json").stdout.splitlines()
    ]
    assert [r["state"] for r in as_json] == ["done", "failed", "running", "pending"]

    result = invoke("run-cell", str(root), ids[1], ids[2])  # ids[2] is held: left alone
    assert result.exit_code == 0, result.stderr
    assert (root / "cells" / ids[1] / "pretrain.json").is_file()
    assert not (root / "cells" / ids[2]).exists() and "running in other processes" in result.stderr
    lease.release()
    assert invoke("run-cell", str(root)).exit_code == 0  # any pending cell
    assert all((root / "cells" / i / "pretrain.json").is_file() for i in ids)
    assert len(pd.read_csv(root / "runs.csv")) == 4
    bad = invoke("run-cell", str(root), "nope-seed0-123")
    assert bad.exit_code == 2 and "no cell nope-seed0-123" in bad.stderr


def test_launcher_options_are_validated(tmp_path, tiny_suite_file):
    out = str(tmp_path / "out")
    typo = invoke(
        "run",
        str(tiny_suite_file),
        "--out",
        out,
        "--launcher",
        "local",
        "--launcher-opt",
        "wrokers=2",
    )
    assert typo.exit_code == 2 and "--launcher-opt wrokers: unknown key" in typo.stderr
    unknown = invoke("run", str(tiny_suite_file), "--out", out, "--launcher", "ray")
    assert unknown.exit_code == 2 and "--launcher" in unknown.stderr and "local" in unknown.stderr
    bad = tmp_path / "opts.yaml"
    bad.write_text("- not a mapping\n")
    listed = invoke("run", str(tiny_suite_file), "--out", out, "--launcher", "submitit",
                    "--launcher-config", str(bad))  # fmt: skip
    assert listed.exit_code == 2 and "the launcher options must be a YAML mapping" in listed.stderr
    workers = invoke("run", str(tiny_suite_file), "--out", out, "--workers", "2")
    assert workers.exit_code == 2 and "only the local launcher" in workers.stderr
    assert not (tmp_path / "out").exists()


def test_device_slices_give_each_worker_its_gpus(monkeypatch):
    from mae_bench_plugins.launchers import device_slices

    from mae_bench import UserError

    assert device_slices("cpu", 2, 1) is None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")
    assert device_slices("auto", 2, 2) == ["4,5", "6,7"]
    assert device_slices("cuda", 4, 1) == ["4", "5", "6", "7"]
    with pytest.raises(UserError, match="need 6 GPUs; 4 are visible"):
        device_slices("auto", 3, 2)


@pytest.mark.slow
def test_local_workers_match_inline(tmp_path):
    data = tiny_suite_data(name="pool", seeds=[0, 1])
    suite = tmp_path / "pool.yaml"
    suite.write_text(yaml.safe_dump(data))
    inline = run_cli("run", str(suite), "--out", str(tmp_path / "a"))
    local = run_cli(
        "run",
        str(suite),
        "--out",
        str(tmp_path / "b"),
        "--launcher",
        "local",
        "--workers",
        "2",
        "--device",
        "cpu",
    )
    assert inline.returncode == 0 and local.returncode == 0, local.stderr
    logs = sorted((tmp_path / "b" / "pool" / "logs").glob("worker-*.log"))
    assert len(logs) == 2
    a, b = results_of(tmp_path / "a" / "pool"), results_of(tmp_path / "b" / "pool")
    assert a.keys() == b.keys() and len(a) == 4
    for cell in a:  # one thread per worker vs two: float sums differ in the last bits
        assert b[cell]["history"]["loss"] == pytest.approx(a[cell]["history"]["loss"], rel=1e-4)


def test_submitit_debug_executor_runs_the_suite_with_the_example_options(
    tmp_path, tiny_suite_file
):
    result = run_cli(
        "run",
        str(tiny_suite_file),
        "--out",
        str(tmp_path / "out"),
        "--launcher",
        "submitit",
        "--launcher-config",
        str(ROOT / "examples" / "slurm.yaml"),
        "--launcher-opt",
        "cluster=debug",  # the example's SLURM options, run in this process
    )
    assert result.returncode == 0, result.stderr
    assert len(pd.read_csv(tmp_path / "out" / "tiny" / "runs.csv")) == 2


@pytest.mark.slow
def test_submitit_preempted_task_is_requeued_and_resumes_exactly(tmp_path, registry):
    """A SLURM-style preemption signal (submitit's SIGUSR2) to the task running a cell: the
    cell saves a checkpoint, submitit requeues the task, and it resumes to the same result."""
    from mae_bench_plugins.launchers import CellTask

    from mae_bench import LaunchRequest
    from mae_bench.runner import resolve_launcher, run_suite
    from mae_bench.suite import load_suite

    suite_file = slow_suite(tmp_path, checkpoint_every=1)
    straight = run_cli("run", str(suite_file), "--out", str(tmp_path / "a"))
    assert straight.returncode == 0, straight.stderr

    class Prepare:  # writes the results folder's suite.json, runs nothing
        in_process = False

        def launch(self, request, console):
            pass

        def summary(self):
            return "nothing"

    suite = load_suite(suite_file, registry)
    run_suite(suite, tmp_path / "b", "cpu", launcher=Prepare())
    root = tmp_path / "b" / "slow"
    (cell,) = [c.cell_id for c in suite_cells(suite)]
    launcher = resolve_launcher(registry, "submitit", {"cluster": "local", "timeout_min": 10})
    job = launcher.executor(root / "submitit" / "%j").submit(
        CellTask(), LaunchRequest(root, (cell,), "cpu"), cell
    )
    held = wait_for_epoch(root, 2)
    os.kill(held["pid"], signal.SIGUSR2)  # what SLURM sends ahead of a preemption
    assert job.result() is True
    log = Path(job.paths.stdout).read_text() + Path(job.paths.stderr).read_text()
    assert "checkpoint saved in epoch" in log or "checkpoint saved after epoch" in log
    assert "Requeued job" in log and f"resumed {cell} from epoch" in log
    assert results_of(root) == results_of(tmp_path / "a" / "slow")


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
    data["variants"] = [replace_losses_data(v) for v in data["variants"]]
    suite = tmp_path / "ddp.yaml"
    suite.write_text(yaml.safe_dump(data))
    one = run_cli("run", str(suite), "--out", str(tmp_path / "one"))
    assert one.returncode == 0, one.stderr
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


def replace_losses_data(variant: dict) -> dict:
    """A suite variant with MSE alone (batch-statistic losses see each rank's share)."""
    return {k: v for k, v in variant.items() if k != "loss"}


def test_finetuning_resumes_exactly_from_its_checkpoint(tmp_path, registry, monkeypatch):
    from mae_bench_plugins.finetune import FinetuneParams, finetune

    from mae_bench import resume
    from mae_bench.data import ImageFeeder
    from mae_bench.suite import resolve_suite

    suite = resolve_suite(tiny_suite_data(), registry)
    data = suite.build_dataset().load()
    cpu = torch.device("cpu")
    feeder = ImageFeeder.fit(data.pretrain, image_size=16, channels=3, device=cpu)
    torch.manual_seed(0)
    model = suite.variants[1].build_model(16, 3)
    cfg = FinetuneParams(epochs=4, batch_size=32, mixup=0.8, cutmix=1.0, randaugment=True,
                         drop_path=0.1, val_fraction=0.25)  # fmt: skip
    np_before = np.random.get_state()[1].copy()
    straight = finetune(model, data, feeder, cfg, seed=3)
    assert (np.random.get_state()[1] == np_before).all()  # numpy's global state untouched

    checkpoint = resume.Checkpoint(tmp_path / "ft.pt", "key", every=0)
    calls = {"n": 0}
    real = resume.requested

    def stop_after_epoch_2():
        calls["n"] += 1
        return (signal.SIGTERM, False) if calls["n"] == 2 else real()

    monkeypatch.setattr(resume, "requested", stop_after_epoch_2)
    with pytest.raises(resume.Terminated, match="after epoch 2"):
        finetune(model, data, feeder, cfg, seed=3, checkpoint=checkpoint)
    monkeypatch.setattr(resume, "requested", real)
    torch.manual_seed(99)
    np.random.seed(99)
    again = finetune(model, data, feeder, cfg, seed=3, checkpoint=checkpoint)
    assert again[0] == straight[0] and again[1] == straight[1]
    assert torch.equal(again[2], straight[2])


def test_checkpoint_policy(tmp_path):
    from mae_bench.resume import Checkpoint

    every3 = Checkpoint(tmp_path / "a.pt", "k", every=3)
    assert [every3.due(e, epoch_end=True) for e in (1, 2, 3, 6)] == [False, False, True, True]
    assert not Checkpoint(tmp_path / "b.pt", "k", every=0).due(1, epoch_end=True)
    auto = Checkpoint(tmp_path / "checkpoints" / "c.pt", "k", every="auto")
    assert auto.due(1, epoch_end=True)  # nothing measured yet: save
    auto._last_save_s = 1.0  # a save took 1 s: at most one per 20 s of training
    auto._last_save_at = time.perf_counter() - 10
    assert not auto.due(2, epoch_end=True)
    auto._last_save_at = time.perf_counter() - 25
    assert auto.due(3, epoch_end=True)
    auto.save({"x": torch.ones(2)})
    assert torch.load(auto.path, weights_only=True)["key"] == "k"
    auto.remove()
    assert not (tmp_path / "checkpoints").exists()  # the emptied folder goes too


def test_rank_logic_from_the_environment(monkeypatch):
    from mae_bench import UserError
    from mae_bench.distributed import SINGLE, Dist, cell_device, env_world

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

    from mae_bench import distributed
    from mae_bench.distributed import Dist

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


def test_local_launcher_gives_workers_gpu_slices_and_torchrun(tmp_path, monkeypatch):
    from mae_bench_plugins import launchers
    from mae_bench_plugins.launchers import LocalLauncher, LocalParams

    from mae_bench import LaunchRequest

    started = []

    class FakeProcess:
        returncode = 0

        def __init__(self, command, env, **kwargs):
            started.append((command, env))

        def poll(self):
            return 0

    monkeypatch.setattr(launchers.subprocess, "Popen", FakeProcess)
    monkeypatch.setattr(LaunchRequest, "finished", lambda self: 0)  # no results folder here
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")
    request = LaunchRequest(tmp_path, ("a-seed0-1", "b-seed0-2"), "auto")
    from rich.console import Console

    LocalLauncher(LocalParams(workers=2, procs_per_cell=2, threads=3)).launch(request, Console())
    assert [env["CUDA_VISIBLE_DEVICES"] for _, env in started] == ["0,1", "2,3"]
    assert all(env["OMP_NUM_THREADS"] == "3" for _, env in started)
    command = started[0][0]
    assert command[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    assert command[5:9] == ["-m", "mae_bench", "run-cell", str(tmp_path)]
    assert command[-2:] == ["--device", "auto"]


def test_a_third_party_launcher_plugs_in_through_the_hook(tmp_path, tiny_suite_file):
    """A launcher shipped by another package (here: a pool of worker commands, as a Ray
    launcher would ship them) needs only the hook and the public contract."""
    from concurrent.futures import ThreadPoolExecutor

    from mae_bench import Launcher, Params, hookimpl
    from mae_bench.plugins import PluginInfo, _entry_point_candidates, build_registry
    from mae_bench.runner import resolve_launcher, run_suite
    from mae_bench.suite import load_suite

    class PoolParams(Params):
        jobs: int = 2

    class PoolLauncher(Launcher):
        """Each cell's worker command, run by a pool of threads."""

        name = "pool"
        Params = PoolParams

        def launch(self, request, console):
            def one(cell_id):
                return subprocess.run(request.command([cell_id]), capture_output=True).returncode

            with ThreadPoolExecutor(self.params.jobs) as pool:
                self.codes = list(pool.map(one, request.cell_ids))

    class Package:
        @staticmethod
        @hookimpl
        def register_launchers(register):
            register(PoolLauncher)

    info = PluginInfo(name="pool", module="pool", distribution="mae-bench-pool", version="0.1")
    registry = build_registry([*_entry_point_candidates(), (info, lambda: Package)])
    launcher = resolve_launcher(registry, "pool", {"jobs": 2})
    suite = load_suite(tiny_suite_file, registry)
    summary = run_suite(suite, tmp_path / "out", "cpu", launcher=launcher)
    assert launcher.codes == [0, 0]
    assert sorted(summary.finished) == sorted(c.cell_id for c in suite_cells(suite))
    assert not summary.failed and len(pd.read_csv(tmp_path / "out" / "tiny" / "runs.csv")) == 2
