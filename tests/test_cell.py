"""One cell (mae_bench/cell.py): every stage runs where the feeder puts the data, a full disk
fails one cell only, and a failure is one line with a hint."""

import dataclasses
import errno
import math
from pathlib import Path

import pytest
import torch

import mae_bench.cell
import mae_bench.device
from mae_bench.cell import evaluate_cell, failure_line, pretrain_cell
from mae_bench.data import ImageFeeder
from mae_bench.device import peak_memory_mb, reset_peak_memory
from mae_bench.plan import suite_cells
from mae_bench.suite import resolve_suite
from tests.conftest import invoke, tiny_suite_data, write_suite

CPU = torch.device("cpu")


def test_every_cell_runs_its_model_on_the_feeders_device(registry, device_checker):
    """The feeder's device is `meta` (no GPU here): pretrained and baseline cells must send
    inputs and weights to it alike, in pretraining and in every evaluation. Meta tensors hold
    no data, so each stage stops at its first read-back; by then its model calls have been
    checked. Each evaluation runs on its own, so each evaluator is checked."""
    data_cfg = tiny_suite_data()
    data_cfg["eval"]["baselines"] = True
    suite = resolve_suite(data_cfg, registry)
    data = suite.build_dataset().load()
    cpu_feeder = ImageFeeder.fit(data.pretrain, image_size=16, channels=3, device=CPU)
    feeder = dataclasses.replace(cpu_feeder, device=torch.device("meta"))
    cells = suite_cells(suite)
    assert [c.variant.baseline for c in cells] == [False, False, True, True]
    mean_image = cpu_feeder.mean_image(data.pretrain)
    evaluated = []
    for cell in cells:
        if cell.variant.baseline:  # no training: its random init, on the device
            model = pretrain_cell(cell, suite, data, feeder).model
        else:
            calls = device_checker.calls
            with pytest.raises((NotImplementedError, RuntimeError), match=r"(?i)meta"):
                pretrain_cell(cell, suite, data, feeder)
            assert device_checker.calls > calls, cell.cell_id  # it ran the model
            # the pretrained model as a later run loads it: built, then moved to the device
            model = cell.variant.build_model(16, 3).to(feeder.device)
        assert {p.device.type for p in model.parameters()} == {"meta"}
        for evaluation in cell.evaluations:
            calls = device_checker.calls
            with pytest.raises((NotImplementedError, RuntimeError), match=r"(?i)meta"):
                list(evaluate_cell(cell, suite, data, feeder, model, mean_image, [evaluation]))
            assert device_checker.calls > calls, (cell.cell_id, evaluation.name)
            evaluated.append((cell.variant.name, evaluation.name))
    names = {name for _, name in evaluated}
    assert names == {"reconstruction", "linear_probe", "knn"}  # every evaluator reached
    assert device_checker.mismatches == []
    assert device_checker.input_devices == {"meta"}


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_tiny_suite_with_baselines_and_finetuning_on_cuda(tmp_path, device_checker):
    result = invoke(
        "run", str(write_suite(tmp_path)), "--out", str(tmp_path), "--device", "cuda",
        "--set", "eval.baselines=true", "--set", "eval.finetune.enabled=true",
        "--set", "eval.finetune.epochs=1",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert device_checker.mismatches == [] and "cuda" in device_checker.input_devices


def test_full_disk_while_storing_fails_that_cell_only(tmp_path, monkeypatch):
    real = mae_bench.cell.save_weights

    def full_for_vit(model, folder, meta):
        if meta["cell_id"].startswith("vit-"):
            raise OSError(errno.ENOSPC, "No space left on device")
        real(model, folder, meta)

    monkeypatch.setattr(mae_bench.cell, "save_weights", full_for_vit)
    result = invoke("run", str(write_suite(tmp_path)), "--out", str(tmp_path / "out"))
    assert result.exit_code == 1 and "the disk holding the results is full" in result.stderr
    cells = list((tmp_path / "out" / "tiny" / "cells").iterdir())
    assert [c.name.split("-")[0] for c in cells] == ["mlp"]


def test_out_of_memory_gets_a_hint():
    line = failure_line(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"))
    assert line.startswith("OutOfMemoryError: CUDA out of memory") and "batch_size" in line
    assert failure_line(ValueError("")) == "ValueError: "


def test_a_plugin_exiting_or_interrupting_is_told_from_a_signal():
    reason = " (raised by a plugin, not a signal: it fails the cell only)"
    assert failure_line(SystemExit(0)) == "SystemExit: 0" + reason
    assert failure_line(KeyboardInterrupt()) == "KeyboardInterrupt:" + reason


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
def test_peak_memory_on_the_cpu_is_the_cells_not_the_processs():
    """A 256 MiB tensor freed before the next cell starts: the next cell's peak must not
    inherit it (the process's high-water mark did, for every later cell)."""
    assert reset_peak_memory(CPU)
    before = peak_memory_mb(CPU)
    big = torch.ones(64 * 2**20)  # 256 MiB, every page touched
    during = peak_memory_mb(CPU)
    del big
    assert reset_peak_memory(CPU)
    after = peak_memory_mb(CPU)
    assert during - before > 200 and during - after > 200


def test_memory_is_not_reported_where_it_cannot_be_measured_per_cell(
    registry, monkeypatch, tmp_path
):
    """Without a way to restart the measurement, a cell's peak is unknown (NaN), never the
    process's peak so far."""
    data_cfg = tiny_suite_data()
    data_cfg["eval"]["baselines"] = True
    suite = resolve_suite(data_cfg, registry)
    data = suite.build_dataset().load()
    feeder = ImageFeeder.fit(data.pretrain, image_size=16, channels=3, device=CPU)
    baseline = next(c for c in suite_cells(suite) if c.variant.baseline)  # no training: fast
    measured = pretrain_cell(baseline, suite, data, feeder).record
    if Path("/proc/self/clear_refs").exists():
        assert 10 < measured["metrics"]["peak_mem_mb"] < float("inf")
    monkeypatch.setattr(mae_bench.device, "CLEAR_REFS", tmp_path / "missing" / "clear_refs")
    assert reset_peak_memory(CPU) is False
    unmeasured = pretrain_cell(baseline, suite, data, feeder).record
    assert math.isnan(unmeasured["metrics"]["peak_mem_mb"])
    provenance = unmeasured["provenance"]
    assert provenance["host"] and provenance["run_id"] == measured["provenance"]["run_id"]
