"""The example plugin packages (examples/), installed with pip, used in suites: a loss and an
evaluator that the core knows nothing about."""

import json
import subprocess
import sys
from types import SimpleNamespace

import pytest
import yaml

from tests.conftest import ROOT, cell_record, invoke, tiny_suite_data, write_suite


@pytest.fixture(scope="module")
def installed_example(tmp_path_factory):
    """Both example packages, pip-installed into a site folder of their own."""
    target = tmp_path_factory.mktemp("site")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "--quiet",
            "--target",
            str(target),
            str(ROOT / "examples" / "mae-bench-charbonnier"),
            str(ROOT / "examples" / "mae-bench-fewshot"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    return target


@pytest.fixture
def example_plugins(installed_example, fresh_registry, monkeypatch):
    """The example packages importable in this process, found through their entry points as
    the command finds an installed package (test_plugins runs the command itself with a
    package on its PYTHONPATH); ``uninstall()`` takes them away again."""
    monkeypatch.syspath_prepend(str(installed_example))
    monkeypatch.delenv("MAE_BENCH_PLUGINS", raising=False)
    fresh_registry.cache_clear()

    def uninstall():
        monkeypatch.undo()
        fresh_registry.cache_clear()

    return SimpleNamespace(uninstall=uninstall)


def test_example_plugin_is_listed(example_plugins):
    data = json.loads(invoke("plugins", "--json").stdout)
    example = [p for p in data if p["distribution"] == "mae-bench-charbonnier"]
    assert example and example[0]["components"]["losses"] == ["charbonnier"]
    assert example[0]["errors"] == []


def test_example_plugin_runs_in_a_suite(example_plugins, tmp_path):
    data = tiny_suite_data()
    data["variants"] = [
        {
            "name": "vit-charbonnier",
            "encoder": data["variants"][1]["encoder"],
            "loss": {"name": "charbonnier", "eps": 0.01},
        }
    ]
    suite = write_suite(tmp_path, data)
    result = invoke("run", str(suite), "--out", str(tmp_path / "out"))
    assert result.exit_code == 0, result.output
    (cell,) = (tmp_path / "out" / "tiny" / "cells").iterdir()
    record = cell_record(cell)
    assert record["config"]["variant"]["loss"] == [
        {"name": "charbonnier", "eps": 0.01, "weight": 1.0}
    ]
    assert record["components"]["loss"] == "charbonnier"
    assert "charbonnier" in (cell / "history.csv").read_text().splitlines()[0]
    # without the plugin installed, the suite is rejected with a clear message
    example_plugins.uninstall()
    result = invoke("validate", str(suite))
    assert result.exit_code == 2 and "unknown loss 'charbonnier'" in result.stderr


def test_example_evaluator_is_listed_and_runs_in_a_suite(example_plugins, tiny_run_copy):
    data = json.loads(invoke("plugins", "--json").stdout)
    (fewshot,) = [p for p in data if p["distribution"] == "mae-bench-fewshot"]
    assert fewshot["components"]["evaluators"] == ["fewshot"] and fewshot["errors"] == []
    run = tiny_run_copy  # the shared tiny run, the evaluator added: it runs from the weights
    suite_data = yaml.safe_load(run.suite.read_text())
    suite_data["eval"]["fewshot"] = {"shots": 3}
    run.suite.write_text(yaml.safe_dump(suite_data, sort_keys=False))
    result = invoke("run", str(run.suite), "--out", str(run.out))
    assert result.exit_code == 0, result.output
    assert "only run: fewshot" in result.stderr
    assert "fewshot_acc" in result.stdout.splitlines()[2]  # a headline column
    cells = list((run.root / "cells").iterdir())
    assert len(cells) == 4
    for cell in cells:
        record = cell_record(cell)
        assert 0 <= record["metrics"]["fewshot_acc"] <= 1
        assert record["evaluations"]["fewshot"]["info"]["fewshot_acc"]["headline"] is True
    glossary = (run.root / "leaderboard.md").read_text()
    assert "| `fewshot_acc` | test accuracy of nearest class centroids, 3 shots" in glossary
    # the leaderboard re-renders from the stored results, without the plugin installed
    example_plugins.uninstall()
    assert "fewshot_acc" in invoke("leaderboard", str(run.root)).stdout
    without = invoke("validate", str(run.suite))
    assert without.exit_code == 2 and "unknown evaluator 'fewshot'" in without.stderr
