"""One failing cell must not sink a suite; Ctrl-C stops cleanly."""

import pandas as pd
import torch
import yaml

import mae_bench.worker
from mae_bench.cell import failure_line
from tests.conftest import invoke, tiny_suite_data


def _suite(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny_suite_data(seeds=[0, 1])))
    return path


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


def test_out_of_memory_gets_a_hint():
    line = failure_line(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"))
    assert line.startswith("OutOfMemoryError: CUDA out of memory") and "batch_size" in line
    assert failure_line(ValueError("")) == "ValueError: "


def test_ctrl_c_keeps_finished_cells_and_exits_130(tmp_path, monkeypatch):
    suite, out = _suite(tmp_path), tmp_path / "out"
    monkeypatch.setattr(
        mae_bench.worker, "pretrain_cell", _failing_for("vit", KeyboardInterrupt())
    )
    result = invoke("run", str(suite), "--out", str(out))
    assert result.exit_code == 130 and "interrupted" in result.stderr
    cells = list((out / "tiny" / "cells").iterdir())
    assert [c.name.startswith("mlp-") for c in cells] == [True, True]  # nothing half-written
    assert not (out / "tiny" / "failed").exists()
