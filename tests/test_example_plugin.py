"""A real third-party plugin package, installed with pip, used in a suite."""

import json
import subprocess
import sys

import pytest
import yaml

from tests.conftest import ROOT, cell_record, run_cli, tiny_suite_data


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
    return {"PYTHONPATH": str(target)}


def test_example_plugin_is_listed(installed_example):
    data = json.loads(run_cli("plugins", "--json", env=installed_example).stdout)
    example = [p for p in data if p["distribution"] == "mae-bench-charbonnier"]
    assert example and example[0]["components"]["losses"] == ["charbonnier"]
    assert example[0]["errors"] == []


def test_example_plugin_runs_in_a_suite(installed_example, tmp_path):
    data = tiny_suite_data()
    data["variants"] = [
        {
            "name": "vit-charbonnier",
            "encoder": data["variants"][1]["encoder"],
            "loss": {"name": "charbonnier", "eps": 0.01},
        }
    ]
    suite = tmp_path / "suite.yaml"
    suite.write_text(yaml.safe_dump(data))
    result = run_cli("run", str(suite), "--out", str(tmp_path / "out"), env=installed_example)
    assert result.returncode == 0, result.stderr
    (cell,) = (tmp_path / "out" / "tiny" / "cells").iterdir()
    record = cell_record(cell)
    assert record["config"]["variant"]["loss"] == [
        {"name": "charbonnier", "eps": 0.01, "weight": 1.0}
    ]
    assert record["components"]["loss"] == "charbonnier"
    assert "charbonnier" in (cell / "history.csv").read_text().splitlines()[0]
    # without the plugin installed, the suite is rejected with a clear message
    result = run_cli("validate", str(suite))
    assert result.returncode == 2 and "unknown loss 'charbonnier'" in result.stderr


def test_example_evaluator_is_listed_and_runs_in_a_suite(installed_example, tmp_path):
    data = json.loads(run_cli("plugins", "--json", env=installed_example).stdout)
    (fewshot,) = [p for p in data if p["distribution"] == "mae-bench-fewshot"]
    assert fewshot["components"]["evaluators"] == ["fewshot"] and fewshot["errors"] == []
    suite_data = tiny_suite_data()
    suite_data["eval"]["fewshot"] = {"shots": 3}
    suite = tmp_path / "suite.yaml"
    suite.write_text(yaml.safe_dump(suite_data))
    result = run_cli("run", str(suite), "--out", str(tmp_path / "out"), env=installed_example)
    assert result.returncode == 0, result.stderr
    assert "fewshot_acc" in result.stdout.splitlines()[2]  # a headline column
    for cell in (tmp_path / "out" / "tiny" / "cells").iterdir():
        record = cell_record(cell)
        assert 0 <= record["metrics"]["fewshot_acc"] <= 1
        assert record["evaluations"]["fewshot"]["info"]["fewshot_acc"]["headline"] is True
    glossary = (tmp_path / "out" / "tiny" / "leaderboard.md").read_text()
    assert "| `fewshot_acc` | test accuracy of nearest class centroids, 3 shots" in glossary
    # the leaderboard re-renders from the stored results, without the plugin installed
    assert "fewshot_acc" in run_cli("leaderboard", str(tmp_path / "out" / "tiny")).stdout
    without = run_cli("validate", str(suite))
    assert without.returncode == 2 and "unknown evaluator 'fewshot'" in without.stderr
