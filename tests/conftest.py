"""Shared fixtures and helpers: the built-in registry, tiny suites, the CLI, and ONE finished
tiny run that many tests read (see tests/README.md for the layout)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
MAE_BENCH = str(Path(sys.executable).parent / "mae-bench")
TIMING_KEYS = {"pretrain_s", "imgs_per_s", "peak_mem_mb"}


def pytest_configure(config):
    """One torch thread per process (here and in the commands the tests start), unless
    OMP_NUM_THREADS says otherwise or benchmarks are timed: the tests' models are tiny, so
    intra-op threads only add overhead, and on a busy machine they contend for the cores
    (a several-fold slowdown). Every run a test compares with another has the same setting."""
    if config.getoption("benchmark_enable", False) or "OMP_NUM_THREADS" in os.environ:
        return
    os.environ["OMP_NUM_THREADS"] = "1"
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(1)


@pytest.fixture(scope="session")
def registry():
    from mae_bench.plugins import load_registry

    return load_registry()


@pytest.fixture
def fresh_registry():
    """Reload plugins in this process (after changing MAE_BENCH_PLUGINS or sys.path)."""
    from mae_bench.plugins import load_registry

    load_registry.cache_clear()
    yield load_registry
    load_registry.cache_clear()


# --------------------------------------------------------------- suites
def tiny_suite_data(**changes: Any) -> dict[str, Any]:
    """A seconds-long suite on synthetic data (both encoder families)."""
    data = yaml.safe_load((ROOT / "suites" / "tiny.yaml").read_text())
    data.update(changes)
    return data


def make_component(registry, kind: str, name: str, **params: Any):
    """A registered component of ``kind`` built with ``params`` (masking, loss, ...)."""
    info = registry.get(kind, name, kind)
    return info.cls(info.cls.Params(**params))


def small_vit(registry, **changes: Any):
    """A two-block ``vit`` on 16 x 16 RGB images (``changes`` override its params)."""
    info = registry.get("encoder", "vit", "encoder")
    params = {"patch_size": 4, "dim": 32, "depth": 2, "heads": 2, "decoder_dim": 16, **changes}
    return info.cls(info.cls.Params(**params), image_size=16, in_chans=3)


def seed_runs(values: dict[str, list[float]]) -> pd.DataFrame:
    """A runs table of one metric ``acc``: per variant, one row per seed (0, 1, ...)."""
    return pd.DataFrame(
        [
            {"variant": v, "seed": s, "encoder": "e", "masking": "m", "loss": "l", "acc": x}
            for v, xs in values.items()
            for s, x in enumerate(xs)
        ]
    )


def fake_local_workers(monkeypatch) -> list[tuple[list[str], dict[str, str]]]:
    """The local launcher's worker processes, recorded (command, environment) instead of
    started; a launch then finds no results folder to read (``finished`` is 0)."""
    from mae_bench_plugins import launchers

    from mae_bench import LaunchRequest

    started: list[tuple[list[str], dict[str, str]]] = []

    class FakeProcess:
        returncode = 0

        def __init__(self, command, env, **kwargs):
            started.append((command, env))

        def poll(self):
            return 0

    monkeypatch.setattr(launchers.subprocess, "Popen", FakeProcess)
    monkeypatch.setattr(LaunchRequest, "finished", lambda self: 0)
    return started


def registry_with(package: object, name: str):
    """The installed plugins plus ``package`` (a namespace of hook implementations),
    registered as the distribution ``mae-bench-<name>``, as a pip-installed plugin would be."""
    from mae_bench.plugins import PluginInfo, _entry_point_candidates, build_registry

    info = PluginInfo(name=name, module=name, distribution=f"mae-bench-{name}", version="0.1")
    return build_registry([*_entry_point_candidates(), (info, lambda: package)])


def write_suite(folder: Path, data: dict[str, Any] | None = None, **changes: Any) -> Path:
    """``data`` (default: the tiny suite with ``changes``) written to ``folder/<name>.yaml``,
    its keys in their order (evaluators run, and their columns show, in suite order)."""
    data = tiny_suite_data(**changes) if data is None else data
    path = folder / f"{data['name']}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.fixture
def tiny_suite_file(tmp_path: Path) -> Path:
    return write_suite(tmp_path)


# --------------------------------------------------------------- the command line
def invoke(*args: str):
    """Run the CLI in-process (fast); ``exit_code``, ``stdout`` and ``stderr`` as a user sees."""
    from click.testing import CliRunner

    from mae_bench.cli import cli

    return CliRunner().invoke(cli, list(args))


def run_cli(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None):
    """Run the installed ``mae-bench`` console script in a subprocess."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [MAE_BENCH, *args], capture_output=True, text=True, env=full_env, cwd=cwd, timeout=600
    )


# --------------------------------------------------------------- results folders
def cell_record(cell: Path) -> dict[str, Any]:
    """A cell folder's whole record: its pretraining and every stored evaluation."""
    import json

    from mae_bench.results import combine

    pretrain = json.loads((cell / "pretrain.json").read_text())
    evaluated = [json.loads(p.read_text()) for p in sorted((cell / "evals").glob("*/result.json"))]
    return combine(pretrain, evaluated)


def results_of(root: Path) -> dict[str, dict]:
    """Per finished cell of ``root``: every stored metric except timings, and the pretraining
    history (what two runs of the same cells must agree on)."""
    out = {}
    for cell in sorted((root / "cells").iterdir()):
        if cell.name.startswith("."):
            continue
        record = cell_record(cell)
        metrics = {k: v for k, v in record["metrics"].items() if k not in TIMING_KEYS}
        history = pd.read_csv(cell / "history.csv").to_dict("list")
        out[cell.name] = {"metrics": metrics, "history": history}
    return out


@dataclass(frozen=True)
class Run:
    """A finished run: the suite file, ``--out`` and the results folder ``<out>/<name>``."""

    suite: Path
    out: Path
    name: str = "tiny"
    stdout: str = field(default="", repr=False)
    seconds: float = 0.0  # its wall time, where measured

    @property
    def root(self) -> Path:
        return self.out / self.name

    def cells(self) -> dict[str, Path]:
        """Finished cell folders by ``<variant>-seed<k>``."""
        return {
            p.name.rsplit("-", 1)[0]: p
            for p in sorted((self.root / "cells").iterdir())
            if p.is_dir() and not p.name.startswith(".")
        }

    def copy(self, dest: Path) -> Run:
        """The suite file and the results, copied under ``dest`` (timestamps kept)."""
        dest.mkdir(parents=True, exist_ok=True)
        shutil.copy2(self.suite, dest / self.suite.name)
        shutil.copytree(self.out, dest / "out")
        return Run(dest / self.suite.name, dest / "out", self.name, self.stdout)


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in folder.rglob("*")
    }


def _read_only(run: Run, folder: Path):
    """Yield ``run``; fail the session at its end if a file under ``folder`` changed."""
    before = _snapshot(folder)
    yield run
    assert _snapshot(folder) == before, f"a test changed the shared run in {folder}"


TINY_SEEDS = [0, 1]


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Run:
    """THE shared finished run: suites/tiny.yaml with seeds [0, 1] (mlp and vit, 4 cells),
    run once per session with `mae-bench run --device cpu` (in this process).

    Read-only: a test that damages, extends or re-runs it takes ``tiny_run_copy``. The
    session fails at its end if a file of it changed (so do the other shared runs')."""
    base = tmp_path_factory.mktemp("tiny-run")
    suite = write_suite(base, seeds=TINY_SEEDS)
    result = invoke("run", str(suite), "--out", str(base / "out"), "--device", "cpu")
    assert result.exit_code == 0, result.output
    yield from _read_only(Run(suite, base / "out", stdout=result.stdout), base)


@pytest.fixture
def tiny_run_copy(tiny_run: Run, tmp_path: Path) -> Run:
    """A private copy of ``tiny_run`` to damage, extend or re-run."""
    return tiny_run.copy(tmp_path / "copy")


@pytest.fixture(scope="session")
def local_run(tiny_run: Run, tmp_path_factory) -> Run:
    """``tiny_run``'s suite run again through the installed command by the local launcher's
    two worker processes, once per session, timed (the launcher test compares it with
    ``tiny_run``; the scale-out benchmark, untimed in the default run, reads it). Read-only."""
    import time

    out = tmp_path_factory.mktemp("local-run") / "out"
    start = time.perf_counter()
    result = run_cli(
        "run", str(tiny_run.suite), "--out", str(out),
        "--launcher", "local", "--workers", "2", "--device", "cpu",
    )  # fmt: skip
    seconds = time.perf_counter() - start
    assert result.returncode == 0, result.stderr
    yield from _read_only(Run(tiny_run.suite, out, stdout=result.stdout, seconds=seconds), out)


def slow_suite(tmp_path: Path, name: str = "slow", **pretrain) -> Path:
    """One ViT cell whose pretraining takes a few seconds (long enough to kill it)."""
    data = tiny_suite_data(name=name)
    data["dataset"].update(n_pretrain=512)
    data["pretrain"] = {"epochs": 10, "batch_size": 32, "lr": 1e-3, **pretrain}
    data["variants"] = [v for v in data["variants"] if v["name"] == "vit"]
    return write_suite(tmp_path, data)


@pytest.fixture(scope="session")
def slow_run(tmp_path_factory) -> Run:
    """``slow_suite(checkpoint_every=1)`` run straight through, once per session: what an
    interrupted and resumed run of it must reproduce exactly. Read-only."""
    base = tmp_path_factory.mktemp("slow-run")
    suite = slow_suite(base, checkpoint_every=1)
    result = invoke("run", str(suite), "--out", str(base / "out"), "--device", "cpu")
    assert result.exit_code == 0, result.output
    yield from _read_only(Run(suite, base / "out", "slow"), base)


def wait_for_epoch(root: Path, epoch: int, proc=None, timeout: float = 120) -> dict:
    """Wait until a run's lease says it finished ``epoch`` (its checkpoint is saved); the
    lease. ``proc``: the run (a ``subprocess.Popen``), which must not end first."""
    import json
    import time

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


def pretrain_variant(suite, variant=None, *, device="cpu", init_seed=0, **options):
    """Pretrain ``variant`` (default: the suite's first) of a 16x16 suite in this process,
    its init drawn with ``init_seed``; ``options`` go to ``train.pretrain``. Returns
    ``(data, model, result)``."""
    import torch

    from mae_bench.data import ImageFeeder
    from mae_bench.train import pretrain

    data = suite.build_dataset().load()
    device = torch.device(device)
    feeder = ImageFeeder.fit(data.pretrain, image_size=16, channels=3, device=device)
    variant = variant or suite.variants[0]
    torch.manual_seed(init_seed)
    model = variant.build_model(16, 3).to(device)
    options.setdefault("target", variant.build_target())
    result = pretrain(
        model, data.pretrain, feeder, variant.build_masking(), variant.build_losses(),
        suite.config.pretrain, seed=0, **options,
    )  # fmt: skip
    return data, model, result


def mse_only(variant):
    """The variant with its first loss term alone (MSE; a batch statistic such as uniformity
    changes when a batch is split into micro-batches or over processes)."""
    import dataclasses

    return dataclasses.replace(variant, losses=variant.losses[:1])


# --------------------------------------------------------------- device placement
class DeviceChecker:
    """A global forward pre-hook: every module's inputs must be where its weights are."""

    def __init__(self) -> None:
        self.mismatches: list[str] = []
        self.input_devices: set[str] = set()
        self.calls = 0

    def __call__(self, module, args: tuple) -> None:
        from torch import Tensor

        self.calls += 1
        own = [*module.parameters(recurse=False), *module.buffers(recurse=False)]
        for t in args:
            if isinstance(t, Tensor):
                self.input_devices.add(t.device.type)
                self.mismatches += [
                    f"{type(module).__name__}: input on {t.device}, weights on {w.device}"
                    for w in own
                    if w.device != t.device
                ]


@pytest.fixture
def device_checker():
    import torch

    checker = DeviceChecker()
    handle = torch.nn.modules.module.register_module_forward_pre_hook(checker)
    yield checker
    handle.remove()
