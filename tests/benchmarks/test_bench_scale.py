"""Scale-out figures, side by side in one run (``tox -e bench``):

- a suite's wall time run ``inline`` (one process) and with the ``local`` launcher's 2 workers;
- the per-epoch pretraining time of one cell in 1 process and in 2 data-parallel gloo
  processes (torchrun), with the same global batch.

With ``tox -e bench`` the suite is ``suites/quick.yaml`` (minutes); under the default test
run (benchmarks disabled) the same code runs once on the seconds-long tiny suite.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from mae_bench.plan import suite_cells
from mae_bench.suite import load_suite
from tests.conftest import ROOT, tiny_suite_data

MAE_BENCH = [sys.executable, "-m", "mae_bench"]
pytestmark = pytest.mark.slow  # whole suite runs in subprocesses, even on the tiny suite


def _suite(benchmark, tmp_path: Path) -> Path:
    if benchmark.disabled:
        path = tmp_path / "tiny.yaml"
        path.write_text(yaml.safe_dump(tiny_suite_data(seeds=[0, 1])))
        return path
    return ROOT / "suites" / "quick.yaml"


def _timed(command: list[str], env: dict[str, str] | None = None) -> float:
    start = time.perf_counter()
    done = subprocess.run(
        command, capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=3600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return time.perf_counter() - start


@pytest.mark.parametrize("launcher", ["inline", "local-2-workers"])
def test_suite_wall_time(benchmark, tmp_path, launcher, record_property, registry, request):
    suite = _suite(benchmark, tmp_path)
    extra = ["--launcher", "local", "--workers", "2"] if launcher != "inline" else []
    # untimed, on the tiny suite, the local launcher's run is the very command the launcher
    # test runs (fixture local_run): run once per session for both
    shared = request.getfixturevalue("local_run") if benchmark.disabled and extra else None
    suite = shared.suite if shared else suite
    runs = iter(range(100))
    outs = []

    def run() -> float:
        if shared:
            outs.append(shared.out)
            return shared.seconds
        outs.append(tmp_path / f"out{next(runs)}")
        return _timed([*MAE_BENCH, "run", str(suite), "--out", str(outs[-1]), *extra])

    seconds = benchmark.pedantic(run, rounds=1, iterations=1)
    benchmark.extra_info["wall_s"] = round(seconds, 1)
    record_property("figure", f"{suite.name} suite, {launcher}: {seconds:.1f} s wall")
    # what was timed is the whole suite: every cell finished and in the leaderboard
    planned = suite_cells(load_suite(suite, registry))
    assert math.isfinite(seconds) and seconds > 0
    for out in outs:
        root = out / planned[0].suite
        done = {p.name for p in (root / "cells").iterdir() if not p.name.startswith(".")}
        assert done == {c.cell_id for c in planned}
        assert len(pd.read_csv(root / "runs.csv")) == len(planned)
        if extra:  # and the local launcher's two workers shared it
            assert len(list((root / "logs").glob("worker-*.log"))) == 2


@pytest.mark.parametrize("processes", [1, 2])
def test_pretrain_epoch_time_data_parallel(benchmark, tmp_path, processes, record_property):
    """One cell (the quick suite's vit-mae, or tiny's vit), pretraining per-epoch time."""
    source = _suite(benchmark, tmp_path)
    data = yaml.safe_load(source.read_text())
    keep = "vit" if benchmark.disabled else "vit-mae"
    data.update(name="epoch", seeds=[0], primary_metric="lp_acc")
    data.pop("reference", None)
    data["variants"] = [v for v in data["variants"] if v["name"] == keep]
    data["eval"] = {"linear_probe": {"epochs": 1}, "finetune": {"enabled": False},
                    "knn": {"enabled": False}, "reconstruction": {"enabled": False}}  # fmt: skip
    suite = tmp_path / "epoch.yaml"
    suite.write_text(yaml.safe_dump(data))
    runs = iter(range(100))

    def run() -> float:
        out = tmp_path / f"out{next(runs)}"
        if processes == 1:
            command = [*MAE_BENCH, "run", str(suite), "--out", str(out)]
        else:
            command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                       f"--nproc-per-node={processes}", "-m", "mae_bench", "run", str(suite),
                       "--out", str(out)]  # fmt: skip
        threads = max(1, (os.cpu_count() or 1) // processes)
        _timed(command, env={"OMP_NUM_THREADS": str(threads)})
        (record,) = (out / "epoch" / "cells").glob("*/pretrain.json")
        records.append(json.loads(record.read_text()))
        history = pd.read_csv(record.parent / "history.csv")
        assert len(history) == data["pretrain"]["epochs"]  # every epoch trained
        assert history["loss"].map(math.isfinite).all()
        return records[-1]["metrics"]["pretrain_s"] / data["pretrain"]["epochs"]

    records = []
    per_epoch = benchmark.pedantic(run, rounds=1, iterations=1)
    assert math.isfinite(per_epoch) and per_epoch > 0
    assert all(r["provenance"]["world_size"] == processes for r in records)
    benchmark.extra_info["epoch_s"] = round(per_epoch, 3)
    record_property(
        "figure", f"{keep} cell of {source.name}, {processes} process(es): "
        f"{per_epoch:.3f} s per pretraining epoch"
    )
