"""Shared fixtures: the built-in registry, tiny suites and a CLI runner."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def registry():
    from mae_bench.plugins import load_registry

    return load_registry()


def tiny_suite_data(**changes: Any) -> dict[str, Any]:
    """A seconds-long suite on synthetic data (both encoder families)."""
    data = yaml.safe_load((ROOT / "suites" / "tiny.yaml").read_text())
    data.update(changes)
    return data


@pytest.fixture
def tiny_suite_file(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny_suite_data()))
    return path


def cell_record(cell: Path) -> dict[str, Any]:
    """A cell folder's whole record: its pretraining and every stored evaluation."""
    import json

    from mae_bench.results import combine

    pretrain = json.loads((cell / "pretrain.json").read_text())
    evaluated = [json.loads(p.read_text()) for p in sorted((cell / "evals").glob("*/result.json"))]
    return combine(pretrain, evaluated)


def invoke(*args: str):
    """Run the CLI in-process (fast); ``exit_code``, ``stdout`` and ``stderr`` as a user sees."""
    from click.testing import CliRunner

    from mae_bench.cli import cli

    return CliRunner().invoke(cli, list(args))


@pytest.fixture
def fresh_registry():
    """Reload plugins in this process (after changing MAE_BENCH_PLUGINS or sys.path)."""
    from mae_bench.plugins import load_registry

    load_registry.cache_clear()
    yield load_registry
    load_registry.cache_clear()


def run_cli(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None):
    """Run the installed ``mae-bench`` console script in a subprocess."""
    full_env = {**os.environ, **(env or {})}
    exe = Path(sys.executable).parent / "mae-bench"
    return subprocess.run(
        [str(exe), *args], capture_output=True, text=True, env=full_env, cwd=cwd, timeout=600
    )
