"""Faults and signals (issue 21, items 2, 3 and 5): a plugin's failure is its cell's failure,
however it fails, and only a real signal stops a suite.

The misbehaving components live in a small third-party package written here (``FAULTS``),
installed by hand into a folder that goes on ``sys.path`` (in this process) or
``PYTHONPATH`` (in the commands the tests start), as a pip-installed plugin would be.
"""

from __future__ import annotations

import os
import signal
import subprocess
import textwrap
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from tests.conftest import MAE_BENCH, invoke, run_cli, tiny_suite_data, write_suite

FAULTS = '''
"""Misbehaving components for the fault tests (a package written from docs/plugins.md)."""

import os
import time
from pathlib import Path
from typing import Literal

from mae_bench import EvalResult, Evaluator, Logger, Loss, Metric, Params, hookimpl


class FaultParams(Params):
    fault: Literal["none", "system_exit", "keyboard_interrupt", "hang", "stubborn_hang"] = "none"
    after_steps: int = 0


class FaultLoss(Loss):
    """MSE that misbehaves on a real device after ``after_steps`` steps (hangs only while
    MAE_BENCH_FAULT_MARKER names a file, which it writes when it starts hanging)."""

    name = "fault"
    Params = FaultParams

    def __init__(self, params):
        super().__init__(params)
        self.steps = 0

    def __call__(self, inputs):
        loss = ((inputs.pred - inputs.target) ** 2).mean()
        if inputs.pred.is_meta:  # the memory pre-check: behave
            return loss
        self.steps += 1
        fault = self.params.fault
        if self.steps <= self.params.after_steps or fault == "none":
            return loss
        if fault == "system_exit":
            raise SystemExit(0)
        if fault == "keyboard_interrupt":
            raise KeyboardInterrupt
        marker = os.environ.get("MAE_BENCH_FAULT_MARKER")
        if not marker:
            return loss
        Path(marker).write_text("hanging")
        while True:
            try:
                time.sleep(3600)
            except BaseException:
                if fault == "hang":
                    raise
                # stubborn_hang swallows even the stop


class ValueParams(Params):
    value: Literal["nan", "inf"] = "nan"


class ValueEvaluator(Evaluator):
    """A headline metric that is NaN or infinite."""

    name = "fault_value"
    Params = ValueParams

    def metrics(self):
        return {"odd": Metric("a NaN or infinite number", headline=True)}

    def evaluate(self, ctx):
        return EvalResult({"odd": float(self.params.value)})


class ExitingLogger(Logger):
    """A logger that calls sys.exit() when told of an epoch."""

    name = "fault_exit"

    def log_epoch(self, cell_id, epoch, row):
        raise SystemExit(3)


@hookimpl
def register_losses(register):
    register(FaultLoss)


@hookimpl
def register_evaluators(register):
    register(ValueEvaluator)


@hookimpl
def register_loggers(register):
    register(ExitingLogger)
'''


@pytest.fixture(scope="module")
def fault_site(tmp_path_factory) -> Path:
    """A folder holding the installed ``mae-bench-faults`` distribution."""
    site = tmp_path_factory.mktemp("fault-site")
    (site / "mae_bench_faults.py").write_text(textwrap.dedent(FAULTS))
    info = site / "mae_bench_faults-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: mae-bench-faults\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[mae_bench]\nfaults = mae_bench_faults\n")
    return site


@pytest.fixture
def faults(fault_site, fresh_registry, monkeypatch) -> Path:
    """The fault package installed in this process."""
    monkeypatch.syspath_prepend(str(fault_site))
    monkeypatch.delenv("MAE_BENCH_PLUGINS", raising=False)
    fresh_registry.cache_clear()
    return fault_site


def _variant(name: str, fault: str = "none", after_steps: int = 0, **loss) -> dict:
    return {
        "name": name,
        "encoder": {"name": "mlp", "patch_size": 4, "dim": 32, "hidden": 64},
        "loss": {"name": "fault", "fault": fault, "after_steps": after_steps, **loss},
    }


def _suite(tmp_path: Path, variants: list[dict], evaluators=None, **changes) -> Path:
    """The tiny suite with ``variants``, evaluating only reconstruction and ``evaluators``."""
    data = tiny_suite_data(**changes)
    data["variants"] = variants
    data["eval"] = {"linear_probe": {"enabled": False}, "knn": {"enabled": False}}
    data["eval"].update(evaluators or {})
    data["primary_metric"] = "psnr_masked"
    return write_suite(tmp_path, data)


def _failed_logs(root: Path) -> dict[str, str]:
    return {p.name.split("-")[0]: p.read_text() for p in (root / "failed").glob("*.log")}


# ------------------------------------------------ item 2: a NaN or inf headline metric
def test_a_nan_or_infinite_headline_metric_is_shown_as_missing(faults, tmp_path):
    variants = [_variant("a"), _variant("b")]
    suite = _suite(tmp_path, variants, {"fault_value": {"value": "nan"}}, seeds=[0, 1])
    for value in ("nan", "inf"):
        out = tmp_path / value
        result = invoke(
            "run", str(suite), "--out", str(out), "--set", f"eval.fault_value.value={value}"
        )
        assert result.exit_code == 0, result.output
        assert "Traceback" not in result.output
        assert result.stderr.count("odd —") == 4  # each cell's line, the metric missing
        assert len(pd.read_csv(out / "tiny" / "runs.csv")) == 4  # one run stores every cell


# ------------------------------------------------ item 3: SystemExit, KeyboardInterrupt
def test_a_plugin_raising_system_exit_or_keyboard_interrupt_fails_its_cell_only(faults, tmp_path):
    variants = [
        _variant("healthy"),
        _variant("exits", "system_exit", after_steps=2),
        _variant("interrupts", "keyboard_interrupt", after_steps=2),
    ]
    suite = _suite(tmp_path, variants, loggers=["fault_exit"])
    result = invoke("run", str(suite), "--out", str(tmp_path / "out"))
    assert result.exit_code == 1, result.output
    assert "interrupted" not in result.stderr and "Traceback" not in result.output
    assert "2 cell(s) failed" in result.stderr
    assert "exits-seed0-" in result.stderr and "SystemExit: 0" in result.stderr
    assert "interrupts-seed0-" in result.stderr and "KeyboardInterrupt" in result.stderr
    root = tmp_path / "out" / "tiny"
    logs = _failed_logs(root)
    assert logs["exits"].startswith("SystemExit: 0") and "Traceback" in logs["exits"]
    assert logs["interrupts"].startswith("KeyboardInterrupt") and "Traceback" in logs["interrupts"]
    assert "raise SystemExit(0)" in logs["exits"]  # the plugin's line, for its author
    cells = [p.name.split("-")[0] for p in (root / "cells").iterdir() if p.is_dir()]
    assert cells == ["healthy"]
    assert list(pd.read_csv(root / "runs.csv")["variant"]) == ["healthy"]  # leaderboard written
    assert "| healthy" in result.stdout
    # the logger that called sys.exit() was switched off, once; the run went on
    assert result.stderr.count("logger 'fault_exit' failed in log_epoch (SystemExit: 3)") == 1


# ------------------------------------------------ item 5: SIGTERM while a plugin hangs
def _wait_for(found, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not found():
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, "timed out"
        time.sleep(0.02)


def _hanging_run(tmp_path: Path, fault_site: Path, fault: str):
    """``mae-bench run`` of one cell whose loss hangs in the first step of epoch 2 (after the
    checkpoint of epoch 1), with a 2 s grace period; returns the process once it hangs."""
    variants = [_variant("hangs", fault, after_steps=4)]  # 128 images, batch 32: 4 per epoch
    pretrain = {"epochs": 2, "batch_size": 32, "lr": 1e-3, "checkpoint_every": 1}
    suite = _suite(tmp_path, variants, pretrain=pretrain)
    marker = tmp_path / "hanging"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            filter(None, [str(fault_site), os.environ.get("PYTHONPATH")])
        ),
        "MAE_BENCH_STOP_GRACE_S": "2",
        "MAE_BENCH_FAULT_MARKER": str(marker),
    }
    env.pop("MAE_BENCH_PLUGINS", None)
    proc = subprocess.Popen(
        [MAE_BENCH, "run", str(suite), "--out", str(tmp_path / "out"), "--device", "cpu"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        _wait_for(marker.exists, proc)
    except BaseException:
        proc.kill()
        raise
    return suite, proc


def _terminate(proc: subprocess.Popen) -> tuple[float, str]:
    """SIGTERM to ``proc``: the seconds it took to exit, and its stderr."""
    start = time.perf_counter()
    proc.send_signal(signal.SIGTERM)
    try:
        _, stderr = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise AssertionError("SIGTERM was ignored while the plugin hung") from None
    return time.perf_counter() - start, stderr


@pytest.mark.slow
def test_sigterm_while_a_plugin_hangs_in_a_step_stops_after_the_grace_period(fault_site, tmp_path):
    suite, proc = _hanging_run(tmp_path, fault_site, "hang")
    seconds, stderr = _terminate(proc)
    assert proc.returncode == 143, stderr
    assert 1.5 < seconds < 20
    assert "terminated (SIGTERM)" in stderr and "Traceback" not in stderr
    assert "did not finish within 2 s of the signal" in stderr
    assert "resumes from its last checkpoint" in stderr
    root = tmp_path / "out" / "tiny"
    (checkpoint,) = (root / "checkpoints").glob("*.pt")
    assert torch.load(checkpoint, weights_only=True)["epoch"] == 1  # kept, not overwritten
    assert not (root / "failed").exists()
    again = run_cli(  # the plugin no longer hangs: the cell resumes and finishes
        "run", str(suite), "--out", str(tmp_path / "out"), "--device", "cpu",
        env={"PYTHONPATH": str(fault_site), "MAE_BENCH_FAULT_MARKER": ""},
    )  # fmt: skip
    assert again.returncode == 0, again.stderr
    assert "resumed hangs-seed0-" in again.stderr
    assert "from its checkpoint saved after epoch 1" in again.stderr
    assert (root / "cells").is_dir() and len(pd.read_csv(root / "runs.csv")) == 1


@pytest.mark.slow
def test_a_plugin_swallowing_the_stop_is_ended_after_a_second_grace_period(fault_site, tmp_path):
    _, proc = _hanging_run(tmp_path, fault_site, "stubborn_hang")
    seconds, stderr = _terminate(proc)
    assert proc.returncode == 143, stderr
    assert 3.5 < seconds < 25
    assert "terminated (SIGTERM): the step in training did not stop within 4 s" in stderr
    assert "exiting at once; the cell resumes from its last checkpoint" in stderr
    (checkpoint,) = (tmp_path / "out" / "tiny" / "checkpoints").glob("*.pt")
    assert torch.load(checkpoint, weights_only=True)["epoch"] == 1


def test_a_bad_grace_period_is_one_clear_message(tmp_path, monkeypatch):
    monkeypatch.setenv("MAE_BENCH_STOP_GRACE_S", "soon")
    result = invoke("run", str(write_suite(tmp_path)), "--out", str(tmp_path / "out"))
    assert result.exit_code == 2
    assert result.stderr.startswith("error: MAE_BENCH_STOP_GRACE_S: ")
    assert not (tmp_path / "out").exists()
