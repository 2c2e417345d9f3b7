"""Loggers (plugins/loggers.py; worker.py fans each call out and switches a failing one off):
TensorBoard event files and W&B offline runs, read back."""

import sys

import pytest

from mae_bench.errors import ConfigError
from mae_bench.suite import resolve_suite
from tests.conftest import cell_record, invoke, tiny_suite_data, write_suite


def _scalars(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    tags = events.Tags()["scalars"]
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in tags}


def test_tensorboard_writes_curves_and_metrics_per_cell(tmp_path):
    suite = write_suite(tmp_path, loggers=["tensorboard"])
    result = invoke("run", str(suite), "--out", str(tmp_path / "out"))
    assert result.exit_code == 0, result.output
    root = tmp_path / "out" / "tiny"
    folders = sorted((root / "tensorboard").iterdir())
    assert [f.name.split("-")[0] for f in folders] == ["mlp", "vit"]
    scalars = _scalars(next(f for f in folders if f.name.startswith("vit")))
    assert [step for step, _ in scalars["pretrain/loss"]] == [1, 2]  # tiny: 2 epochs
    assert {"pretrain/mse", "pretrain/laplacian", "pretrain/mask_ratio"} <= set(scalars)
    record = cell_record(next((root / "cells").glob("vit-*")))
    assert scalars["linear_probe/lp_acc"] == [(2, pytest.approx(record["metrics"]["lp_acc"]))]
    assert "reconstruction/psnr_masked" in scalars


def test_wandb_offline_run_per_cell(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    suite = write_suite(tmp_path)
    result = invoke("run", str(suite), "--out", str(tmp_path), "--logger", "wandb")
    assert result.exit_code == 0, result.output
    runs = sorted((tmp_path / "tiny" / "wandb").glob("offline-run-*"))
    assert len(runs) == 2
    names = set()
    for run in runs:
        (data,) = run.glob("run-*.wandb")
        content = data.read_bytes()
        assert b"pretrain/loss" in content and b"linear_probe/lp_acc" in content
        names |= {n for n in (b"mlp-seed0", b"vit-seed0") if n in content}
    assert names == {b"mlp-seed0", b"vit-seed0"}


def test_a_missing_logger_package_fails_validation(registry, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None if name == "wandb" else 1)
    with pytest.raises(ConfigError, match=r"loggers\[0\]: .*pip install 'mae-bench\[wandb\]'"):
        resolve_suite(tiny_suite_data(loggers=["wandb"]), registry)
    with pytest.raises(ConfigError, match="unknown logger 'mlflow'; known: tensorboard, wandb"):
        resolve_suite(tiny_suite_data(loggers=["mlflow"]), registry)


def test_a_failing_logger_is_switched_off_and_the_run_goes_on(tmp_path, monkeypatch):
    from mae_bench_plugins.loggers import TensorBoardLogger

    def broken(self, cell_id, epoch, row):
        raise OSError("disk quota exceeded")

    monkeypatch.setattr(TensorBoardLogger, "log_epoch", broken)
    suite = write_suite(tmp_path)
    result = invoke("run", str(suite), "--out", str(tmp_path), "--logger", "tensorboard")
    assert result.exit_code == 0, result.output
    assert result.stderr.count("logger 'tensorboard' failed in log_epoch") == 1
    assert (tmp_path / "tiny" / "leaderboard.md").is_file()


def test_plugins_lists_loggers():
    out = invoke("plugins").stdout
    assert "logger    tensorboard" in out and "logger    wandb" in out
