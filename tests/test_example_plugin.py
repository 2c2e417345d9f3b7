"""A real third-party plugin package, installed with pip, used in a suite."""

import json
import subprocess
import sys

import pytest
import yaml

from tests.conftest import ROOT, run_cli, tiny_suite_data


@pytest.fixture(scope="module")
def installed_example(tmp_path_factory):
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
    record = json.loads((cell / "result.json").read_text())
    assert record["config"]["variant"]["loss"] == [
        {"name": "charbonnier", "eps": 0.01, "weight": 1.0}
    ]
    assert record["components"]["loss"] == "charbonnier"
    assert "charbonnier" in (cell / "history.csv").read_text().splitlines()[0]
    # without the plugin installed, the suite is rejected with a clear message
    result = run_cli("validate", str(suite))
    assert result.returncode == 2 and "unknown loss 'charbonnier'" in result.stderr
