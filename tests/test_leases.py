"""Leases (mae_bench/leases.py): one holder per cell, expiry of dead or silent holders, and
two runs sharing a results folder compute each cell once."""

import json
import os
import subprocess
import sys
import time

import pandas as pd
import pytest

from mae_bench import leases as leases_module
from mae_bench.errors import MaeBenchWarning
from mae_bench.leases import Leases
from tests.conftest import MAE_BENCH, invoke, write_suite


def test_leases_one_holder_and_expiry(tmp_path, monkeypatch):
    leases = Leases(tmp_path)
    first = leases.claim("cell-a")
    assert first is not None and leases.claim("cell-a") is None  # held: a second claim fails
    first.update(stage="pretraining", epoch=3, epochs=10)
    held = leases.read("cell-a")
    assert (held.stage, held.epoch, held.pid) == ("pretraining", 3, os.getpid())
    first.release()
    assert leases.read("cell-a") is None and not leases.path("cell-a").exists()

    # a holder of this host that is gone (kill -9) loses its lease at once
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    ).stdout.strip()
    stale = leases.claim("cell-b")
    stale._stop.set()
    data = json.loads(leases.path("cell-b").read_text())
    leases.path("cell-b").write_text(json.dumps({**data, "pid": int(dead)}))
    taken = leases.claim("cell-b")
    assert taken is not None and taken.info.token != data["token"]
    assert not stale.held()  # the old holder can tell its lease was taken over
    taken.release()

    # another host's lease expires when its heartbeat is older than the time to live
    other = leases.claim("cell-c")
    other._stop.set()
    data = json.loads(leases.path("cell-c").read_text())
    leases.path("cell-c").write_text(json.dumps({**data, "host": "elsewhere"}))
    assert leases.claim("cell-c") is None  # fresh heartbeat: alive
    old = time.time() - leases_module.TTL_S - 1
    os.utime(leases.path("cell-c"), (old, old))
    assert leases.read("cell-c") is None
    assert leases.claim("cell-c") is not None


@pytest.mark.slow
def test_two_runs_on_one_folder_compute_each_cell_once(tmp_path):
    suite = write_suite(tmp_path, name="shared", seeds=[0, 1, 2])
    out = str(tmp_path / "out")
    procs = [
        subprocess.Popen(
            [MAE_BENCH, "run", str(suite), "--out", out],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    logs = [proc.communicate(timeout=300) for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], logs
    done = [line for _, err in logs for line in err.splitlines() if line.startswith("done ")]
    names = sorted(line.split(":")[0] for line in done)
    expected = sorted(f"done {v} seed {s}" for v in ("mlp", "vit") for s in (0, 1, 2))
    assert names == expected  # every cell once, by one of the two processes
    root = tmp_path / "out" / "shared"
    board = pd.read_csv(root / "runs.csv")
    assert len(board) == 6  # the process that ended last wrote every cell
    status = invoke("status", str(root))
    assert status.stdout.count("done ") == 6 and "6 done" in status.stderr


def test_an_unreadable_lease_is_taken_over_once_by_one_of_two_workers(tmp_path):
    leases = Leases(tmp_path)
    path = leases.path("cell-a")
    path.parent.mkdir()
    path.write_bytes(b"\x00garbage")
    with pytest.warns(MaeBenchWarning, match=f"lease {path} cannot be read .*taken over"):
        first = leases.claim("cell-a")
    assert first is not None and first.held()
    # a second worker that also saw the unreadable file moves aside first's fresh lease:
    # it must put it back and give up, not delete it
    assert leases_module._take_over(path, None) is False
    assert first.held() and leases.claim("cell-a") is None
    first.release()
