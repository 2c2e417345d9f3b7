"""Workers (mae_bench/worker.py): a failing cell is recorded and the others finish, Ctrl-C
keeps finished cells, and `run-cell` runs named or pending cells while `status` reports
each cell's state."""

import json
import os
import shutil
import signal

import pandas as pd

import mae_bench.worker
from mae_bench.leases import Leases
from tests.conftest import invoke, write_suite


def _suite(tmp_path):
    return write_suite(tmp_path, seeds=[0, 1])


def _failing_for(variant: str, error: BaseException):
    real = mae_bench.worker.pretrain_cell

    def pretrain_cell(cell, *args, **kwargs):
        if cell.variant.name == variant and cell.seed == 0:
            raise error
        return real(cell, *args, **kwargs)

    return pretrain_cell


def test_a_failing_cell_is_recorded_and_the_others_finish(tmp_path, monkeypatch):
    suite, out = _suite(tmp_path), tmp_path / "out"
    bug = KeyError("a plugin bug")
    monkeypatch.setattr(mae_bench.worker, "pretrain_cell", _failing_for("vit", bug))
    result = invoke("run", str(suite), "--out", str(out))
    assert result.exit_code == 1
    root = out / "tiny"
    log = next((root / "failed").glob("vit-seed0-*.log"))
    assert log.read_text().startswith("KeyError: 'a plugin bug'")
    assert "Traceback" in log.read_text()
    assert f"(traceback: {log})" in result.stderr and "1 cell(s) failed" in result.stderr
    cells = sorted(p.name.split("-")[0] + p.name.split("-")[1] for p in (root / "cells").iterdir())
    assert cells == ["mlpseed0", "mlpseed1", "vitseed1"]  # no half-written cell
    assert len(pd.read_csv(root / "runs.csv")) == 3
    monkeypatch.undo()  # the bug is fixed: a re-run retries the failed cell only
    again = invoke("run", str(suite), "--out", str(out))
    assert again.exit_code == 0, again.output
    assert "3 of 4 cells already finished" in again.stderr
    assert not log.exists() and len(pd.read_csv(root / "runs.csv")) == 4


def test_ctrl_c_keeps_finished_cells_and_exits_130(tmp_path, monkeypatch):
    suite, out = _suite(tmp_path), tmp_path / "out"
    real = mae_bench.worker.pretrain_cell

    def pretrain_cell(cell, *args, **kwargs):
        if cell.variant.name == "vit":
            os.kill(os.getpid(), signal.SIGINT)  # the real Ctrl-C, mid-cell
        return real(cell, *args, **kwargs)

    monkeypatch.setattr(mae_bench.worker, "pretrain_cell", pretrain_cell)
    result = invoke("run", str(suite), "--out", str(out))
    assert result.exit_code == 130 and "interrupted" in result.stderr
    cells = list((out / "tiny" / "cells").iterdir())
    assert [c.name.startswith("mlp-") for c in cells] == [True, True]  # nothing half-written
    assert not (out / "tiny" / "failed").exists()


def test_a_keyboard_interrupt_a_plugin_raises_fails_its_cell_not_the_suite(tmp_path, monkeypatch):
    """Only a real signal stops a suite (tests/test_faults_signals.py: through plugins)."""
    suite, out = _suite(tmp_path), tmp_path / "out"
    monkeypatch.setattr(mae_bench.worker, "pretrain_cell", _failing_for("vit", KeyboardInterrupt()))
    result = invoke("run", str(suite), "--out", str(out))
    assert result.exit_code == 1 and "interrupted" not in result.stderr
    assert "KeyboardInterrupt: (raised by a plugin, not a signal" in result.stderr
    assert len(pd.read_csv(out / "tiny" / "runs.csv")) == 3  # the other cells finished


def test_run_cell_runs_named_cells_and_status_reports_each_state(tiny_run_copy):
    root = tiny_run_copy.root
    record = json.loads((root / "suite.json").read_text())
    ids = [c["cell_id"] for c in record["cells"]]
    for cell_id in ids[1:]:
        shutil.rmtree(root / "cells" / cell_id)
    (root / "failed").mkdir(exist_ok=True)
    (root / "failed" / f"{ids[1]}.log").write_text("ValueError: boom\n\ntraceback")
    lease = Leases(root).claim(ids[2])
    lease.update(stage="pretraining", epoch=1, epochs=2)
    rows = {line.split()[1]: line for line in invoke("status", str(root)).stdout.splitlines()}
    assert rows[ids[0]].startswith("done")
    assert rows[ids[1]].startswith("failed") and "ValueError: boom" in rows[ids[1]]
    assert str(root / "failed" / f"{ids[1]}.log") in rows[ids[1]]
    assert rows[ids[2]].startswith("running") and f"pid {os.getpid()}" in rows[ids[2]]
    assert "pretraining epoch 1/2" in rows[ids[2]]
    assert rows[ids[3]].startswith("pending")
    as_json = [
        json.loads(line) for line in invoke("status", str(root), "--json").stdout.splitlines()
    ]
    assert [r["state"] for r in as_json] == ["done", "failed", "running", "pending"]

    result = invoke("run-cell", str(root), ids[1], ids[2])  # ids[2] is held: left alone
    assert result.exit_code == 0, result.stderr
    assert (root / "cells" / ids[1] / "pretrain.json").is_file()
    assert not (root / "cells" / ids[2]).exists()
    assert "1 cell is running in another process" in result.stderr
    lease.release()
    assert invoke("run-cell", str(root)).exit_code == 0  # any pending cell
    assert all((root / "cells" / i / "pretrain.json").is_file() for i in ids)
    assert len(pd.read_csv(root / "runs.csv")) == 4
    bad = invoke("run-cell", str(root), "nope-seed0-123")
    assert bad.exit_code == 2 and "no cell nope-seed0-123" in bad.stderr
