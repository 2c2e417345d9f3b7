"""Launchers (plugins/launchers.py, and the Launcher contract in mae_bench/runner.py): their
options, GPU slices per worker, local worker processes, submitit (SLURM) including a
preempted task, and a third-party launcher plugged in through the hook."""

import os
import signal
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pandas as pd
import pytest
import torch
from mae_bench_plugins.launchers import CellTask, LocalLauncher, LocalParams, device_slices
from rich.console import Console

from mae_bench import Launcher, LaunchRequest, Params, UserError, hookimpl
from mae_bench.plan import suite_cells
from mae_bench.runner import resolve_launcher, run_suite
from mae_bench.suite import load_suite
from tests.conftest import (
    ROOT,
    fake_local_workers,
    invoke,
    registry_with,
    results_of,
    wait_for_epoch,
)


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
    assert device_slices("cpu", 2, 1) is None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")
    assert device_slices("auto", 2, 2) == ["4,5", "6,7"]
    assert device_slices("cuda", 4, 1) == ["4", "5", "6", "7"]
    assert device_slices("auto", 3, 2) == ["4,5", "6,7", "4,5"]  # shared: test_workers_per_gpu
    with pytest.raises(UserError, match="each cell runs one process per GPU and 4 GPUs"):
        device_slices("auto", 1, 5)


@pytest.mark.slow
def test_local_workers_match_inline(tiny_run, local_run):
    """The shared tiny run (inline, one process) against the same suite run by two local
    worker processes."""
    logs = sorted((local_run.root / "logs").glob("worker-*.log"))
    assert len(logs) == 2
    a, b = results_of(tiny_run.root), results_of(local_run.root)
    assert a.keys() == b.keys() and len(a) == 4
    for cell in a:  # float sums may differ in the last bits between processes
        assert b[cell]["history"]["loss"] == pytest.approx(a[cell]["history"]["loss"], rel=1e-4)


def test_submitit_debug_executor_runs_the_suite_with_the_example_options(tmp_path, tiny_suite_file):
    result = invoke(
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
    assert result.exit_code == 0, result.output
    assert len(pd.read_csv(tmp_path / "out" / "tiny" / "runs.csv")) == 2


@pytest.mark.slow
def test_submitit_preempted_task_is_requeued_and_resumes_exactly(tmp_path, registry, slow_run):
    """A SLURM-style preemption signal (submitit's SIGUSR2) to the task running a cell: the
    cell saves a checkpoint, submitit requeues the task, and it resumes to the same result."""
    suite_file = slow_run.suite  # ``slow_run``: the same suite run straight through

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
    assert "Requeued job" in log and f"resumed {cell} from its checkpoint saved" in log
    assert results_of(root) == results_of(slow_run.root)


def test_local_launcher_gives_workers_gpu_slices_and_torchrun(tmp_path, monkeypatch):
    started = fake_local_workers(monkeypatch)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")
    request = LaunchRequest(tmp_path, ("a-seed0-1", "b-seed0-2"), "auto")
    LocalLauncher(LocalParams(workers=2, procs_per_cell=2, threads=3)).launch(request, Console())
    assert [env["CUDA_VISIBLE_DEVICES"] for _, env in started] == ["0,1", "2,3"]
    assert all(env["OMP_NUM_THREADS"] == "3" for _, env in started)
    command = started[0][0]
    assert command[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    assert command[5:9] == ["-m", "mae_bench", "run-cell", str(tmp_path)]
    assert command[-2:] == ["--device", "auto"]


def test_cells_are_planned_alike_whatever_processes_the_launcher_gives_each_cell(
    tmp_path, monkeypatch, registry
):
    """A batch-statistic loss (``uniformity``) gathers the whole micro-batch over the
    processes: a cell run on 2 processes is the cell run on 1, keyed alike."""
    requested = []
    monkeypatch.setattr(LaunchRequest, "finished", lambda self: 0)
    monkeypatch.setattr(LocalLauncher, "launch", lambda self, req, console: requested.append(req))
    suite = load_suite(str(ROOT / "suites" / "tiny.yaml"), registry)  # vit: uniformity
    launcher = LocalLauncher(LocalParams(workers=1, procs_per_cell=2))
    summary = run_suite(suite, tmp_path, "cpu", launcher=launcher)
    assert len(summary.failed) == 2  # nothing ran here: each cell's job ended without a result
    (request,) = requested
    assert set(request.cell_ids) == {c.cell_id for c in suite_cells(suite)}


@pytest.mark.slow
def test_a_third_party_launcher_plugs_in_through_the_hook(tmp_path, tiny_suite_file):
    """A launcher shipped by another package (here: a pool of worker commands, as a Ray
    launcher would ship them) needs only the hook and the public contract."""

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

    registry = registry_with(Package, "pool")
    launcher = resolve_launcher(registry, "pool", {"jobs": 2})
    suite = load_suite(tiny_suite_file, registry)
    summary = run_suite(suite, tmp_path / "out", "cpu", launcher=launcher)
    assert launcher.codes == [0, 0]
    assert sorted(summary.finished) == sorted(c.cell_id for c in suite_cells(suite))
    assert not summary.failed and len(pd.read_csv(tmp_path / "out" / "tiny" / "runs.csv")) == 2
