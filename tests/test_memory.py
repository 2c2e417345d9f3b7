"""memory.py: the pretraining step's footprint measured on the meta device; a plugin that
fails there fails its own cells, never the suite; a huge batch is estimated, not allocated."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from mae_bench.errors import MaeBenchWarning
from mae_bench.memory import memory_check, memory_problem, pretrain_step_bytes
from mae_bench.suite import resolve_suite
from tests import fault_plugins
from tests.conftest import invoke, registry_with, tiny_suite_data, write_suite

HEALTHY = {"name": "mlp", "patch_size": 4, "dim": 32, "hidden": 64}
FAULTY = {**HEALTHY, "name": "faulty"}
FAULTS = {
    "encoder-raises": {"encoder": {**FAULTY, "fault": "forward"}},
    "encoder-width": {"encoder": {**FAULTY, "fault": "width"}},
    "masking-raises": {"masking": {"name": "faulty", "fault": "raise"}},
    "masking-float-ids": {"masking": {"name": "faulty", "fault": "float-ids"}},
    "masking-nan-ratio": {"masking": {"name": "faulty", "fault": "nan-ratio"}},
    "loss-raises": {"loss": {"name": "faulty", "fault": "raise"}},
    "loss-not-tensor": {"loss": {"name": "faulty", "fault": "not-tensor"}},
}
REASONS = {
    "encoder-raises": "injected fault: encoder forward pass",
    "encoder-width": "returned tokens of shape",
    "masking-raises": "injected fault: masking",
    "masking-float-ids": "Mask.ids_keep must be a 2-D torch.int64 tensor",
    "masking-nan-ratio": "masking 'faulty': ratio_at(0) returned nan, not a mask ratio",
    "loss-raises": "injected fault: loss",
    "loss-not-tensor": "returned float, not a scalar tensor",
}


def fault_suite_data(*faults: str, **changes) -> dict:
    """A one-epoch suite: a healthy variant, then one per fault in ``faults``."""
    data = tiny_suite_data(name="faults", **changes)
    data["pretrain"] = {"epochs": 1, "batch_size": 32, "lr": 1.0e-3}
    data["eval"] = {"reconstruction": {"num_images": 8}, "linear_probe": {"epochs": 1}}
    data["variants"] = [{"name": "healthy", "encoder": HEALTHY}] + [
        {"name": fault, "encoder": HEALTHY, **FAULTS[fault]} for fault in faults
    ]
    return data


@pytest.fixture
def faults_installed(tmp_path: Path, monkeypatch, fresh_registry) -> Path:
    return fault_plugins.install(tmp_path / "site", monkeypatch)


@pytest.fixture(scope="module")
def fault_registry():
    return registry_with(fault_plugins, "faults")


def test_a_failing_variant_is_noted_and_not_refused(fault_registry):
    suite = resolve_suite(fault_suite_data(*FAULTS), fault_registry, "faults.yaml")
    check = memory_check(suite, torch.device("cpu"))
    assert check.problem is None
    assert set(check.unchecked) == set(FAULTS)
    for i, (name, reason) in enumerate(REASONS.items(), start=1):
        assert reason in check.unchecked[name] and "\n" not in check.unchecked[name]
        note = check.notes[i - 1]
        assert note.startswith(f"faults.yaml: variants[{i}] ({name}): ") and "\n" not in note
    with pytest.warns(MaeBenchWarning) as warned:  # the old call still answers, and warns
        assert memory_problem(suite, torch.device("cpu")) is None
    assert [str(w.message) for w in warned] == list(check.notes)


def test_the_cells_of_failing_plugins_fail_and_the_others_run(faults_installed, tmp_path):
    suite = write_suite(tmp_path, fault_suite_data(*FAULTS))
    out = tmp_path / "out"
    result = invoke("run", str(suite), "--out", str(out), "--device", "cpu")
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit) and "Traceback" not in result.output
    root = out / "faults"
    (healthy,) = (root / "cells").glob("healthy-seed0-*")
    assert (healthy / "pretrain.json").is_file() and len(list(healthy.glob("evals/*"))) == 3
    failed = {p.name.split("-seed0-")[0]: p for p in (root / "failed").glob("*.log")}
    assert set(failed) == set(FAULTS)
    for name, log in failed.items():
        reason = log.read_text().splitlines()[0]
        assert REASONS[name] in reason, (name, reason)
        assert f"  {name}-seed0-" in result.stderr
    assert "| healthy" in result.stdout


def test_validate_names_the_variant_it_could_not_check(faults_installed, tmp_path):
    suite = write_suite(tmp_path, fault_suite_data("masking-raises", "loss-not-tensor"))
    result = invoke("validate", str(suite))
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    assert "ok: suite 'faults'" in result.stdout
    assert (
        "warning: faults.yaml: variants[1] (masking-raises): its pretraining step's memory "
        "could not be estimated (RuntimeError: injected fault: masking)"
    ) in result.stderr.replace(f"{tmp_path}/", "")
    assert "variants[2] (loss-not-tensor): its pretraining step's memory" in result.stderr


def test_a_huge_batch_is_estimated_quickly_without_allocating_it(tmp_path, registry):
    data = fault_suite_data()
    data["pretrain"]["batch_size"] = 1_000_000_000_000
    suite = write_suite(tmp_path, data)
    start = time.perf_counter()
    result = invoke("validate", str(suite))
    seconds = time.perf_counter() - start
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    (warning,) = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert "variants[0] (healthy): one pretraining step needs about" in warning
    assert "micro-batch 1000000000000" in warning
    assert seconds < 5, seconds


def test_the_estimate_grows_with_the_batch_not_with_what_is_drawn(registry):
    small = resolve_suite(fault_suite_data(), registry, "a.yaml")
    data = fault_suite_data()
    data["pretrain"]["batch_size"] = 64
    double = resolve_suite(data, registry, "b.yaml")
    one, two = (pretrain_step_bytes(s.variants[0], s) for s in (small, double))
    assert one < two < 2 * one
