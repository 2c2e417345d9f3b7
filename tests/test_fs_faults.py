"""Hostile or broken filesystems, through the command line: a disk filling mid-run, a
read-only results folder, damaged tables and symlinks leading out of the results folder give
one clear line naming the file (and a non-zero exit where nothing could be written), never a
traceback, and nothing is lost or written outside the results folder."""

from __future__ import annotations

import errno
import os
import stat

import pytest
from mae_bench_plugins import launchers
from mae_bench_plugins.launchers import LocalLauncher, LocalParams
from mae_bench_plugins.probes import RocPlot
from rich.console import Console

import mae_bench.worker
from mae_bench import LaunchRequest
from mae_bench.errors import MaeBenchWarning
from mae_bench.leaderboard import read_table
from mae_bench.plots import plot_tables
from mae_bench.results import CellStore, read_suite_record, recorded_cells
from tests.conftest import invoke, write_suite

ROOT_USER = os.geteuid() == 0


def _no_traceback(result) -> None:
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output


# --------------------------------------------------------------- item 15: full disk, read-only
def test_a_disk_filling_mid_run_fails_that_cell_and_ends_with_one_line(tmp_path, monkeypatch):
    """The disk fills as the second cell stores its pretraining: that cell fails, the first
    is kept, and the final writes give one line naming the file instead of a traceback."""
    full = {"now": False}
    real_store, real_fsync = mae_bench.worker.store_pretrained, os.fsync

    def store(store, cell, pre):
        full["now"] = full["now"] or cell.cell_id.startswith("vit-")
        return real_store(store, cell, pre)

    def fsync(fd: int) -> None:
        if full["now"]:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(mae_bench.worker, "store_pretrained", store)
    monkeypatch.setattr(os, "fsync", fsync)
    out = tmp_path / "out"
    result = invoke("run", str(write_suite(tmp_path)), "--out", str(out), "--device", "cpu")
    _no_traceback(result)
    assert result.exit_code != 0
    said = " ".join(result.stderr.split())  # the cell lines wrap at the console's width
    assert "FAILED vit-" in said and "(the disk holding the results is full" in said
    (line,) = [x for x in result.stderr.splitlines() if x.startswith("error:")]
    assert line.startswith(f"error: cannot write {out / 'tiny'}") and "No space left" in line
    cells = [c.name for c in (out / "tiny" / "cells").iterdir() if not c.name.startswith(".")]
    assert [c.split("-")[0] for c in cells] == ["mlp"]  # the finished cell is kept
    assert (out / "tiny" / "cells" / cells[0] / "pretrain.json").is_file()


def test_read_only_results_folder_is_one_line_per_command(tiny_run_copy, monkeypatch):
    """Every command that writes into a read-only folder names the file it cannot write."""
    root = tiny_run_copy.root

    def read_only(*args, **kwargs):
        raise PermissionError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr("mae_bench.files.tempfile.mkstemp", read_only)
    for args, written in [
        (("report", str(root)), root / "comparisons.csv"),
        (("run", str(tiny_run_copy.suite), "--out", str(tiny_run_copy.out)), root / "suite.json"),
    ]:
        result = invoke(*args)
        _no_traceback(result)
        assert result.exit_code == 2, result.output
        assert f"error: cannot write {written}: Read-only file system" in result.stderr
    assert invoke("status", str(root)).exit_code == 0


def test_a_lock_file_that_cannot_be_opened_is_one_line(tiny_run_copy):
    root = tiny_run_copy.root
    (root / ".leaderboard.lock").unlink(missing_ok=True)
    (root / ".leaderboard.lock").mkdir()
    result = invoke("leaderboard", str(root))
    _no_traceback(result)
    assert result.exit_code == 2
    assert f"error: cannot write {root / '.leaderboard.lock'}: Is a directory" in result.stderr


@pytest.mark.skipif(ROOT_USER, reason="root writes into read-only folders")
def test_read_only_folder_by_permissions(tiny_run_copy):
    root = tiny_run_copy.root
    folders = [root, *(p for p in root.rglob("*") if p.is_dir())]
    for path in [*folders, *(p for p in root.rglob("*") if p.is_file())]:
        path.chmod(path.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    try:
        for args in [
            ("leaderboard", str(root)),
            ("report", str(root)),
            ("run", str(tiny_run_copy.suite), "--out", str(tiny_run_copy.out)),
        ]:
            result = invoke(*args)
            _no_traceback(result)
            assert result.exit_code == 2, (args, result.output)
            (line,) = [x for x in result.stderr.splitlines() if x.startswith("error:")]
            assert line.startswith(f"error: cannot write {root}/") and "denied" in line, line
        assert invoke("status", str(root)).exit_code == 0
    finally:
        for path in folders:
            path.chmod(0o755)


# --------------------------------------------------------------- item 16: damaged tables
def test_report_skips_a_truncated_predictions_table_with_one_warning(tiny_run_copy):
    root = tiny_run_copy.root
    cells = tiny_run_copy.cells()
    (predictions,) = (cells["vit-seed0"] / "evals").glob("*/predictions.csv")
    text = predictions.read_text()
    predictions.write_text(text[: len(text) // 2])  # cut in the middle of a row
    result = invoke("report", str(root))
    assert result.exit_code == 0, result.output
    _no_traceback(result)
    warned = [x for x in result.stderr.splitlines() if x.startswith("warning:")]
    assert warned == [f"warning: damaged table {predictions} (truncated: its last line is "
                      "incomplete): skipped"]  # fmt: skip
    assert "roc.png" in result.stdout and (root / "report.html").is_file()
    record = read_suite_record(root)
    records = list(CellStore(root).finished(recorded_cells(record), repair=False).values())
    roc = RocPlot("linear_probe")
    with pytest.warns(MaeBenchWarning, match="damaged table"):
        drawn, _ = plot_tables(records, CellStore(root), "linear_probe", roc)
    assert set(drawn) == {"mlp", "vit"}  # vit from its next seed's intact table
    assert not drawn["vit"].isna().any().any()


def test_a_table_with_a_short_row_is_skipped(tmp_path, recwarn):
    path = tmp_path / "thresholds.csv"
    path.write_text("threshold,precision,recall\n0.1,0.5,0.5\n0.2,0.4\n0.3,0.2,0.9\n")
    assert read_table(path) is None
    (warning,) = [w for w in recwarn if issubclass(w.category, MaeBenchWarning)]
    assert str(warning.message) == (
        f"damaged table {path} (line 3 has 2 fields, the header 3): skipped"
    )
    path.write_text("threshold,precision,recall\n0.1,0.5,0.5\n0.2,,0.4\n")  # a missing value
    assert read_table(path)["precision"].isna().tolist() == [False, True]


# --------------------------------------------------------------- item 17: symlinks leading out
def test_a_symlinked_lock_file_is_replaced_not_followed(tiny_run_copy, tmp_path):
    root = tiny_run_copy.root
    outside = tmp_path / "not-yours"
    outside.write_text("keep me\n")
    lock = root / ".leaderboard.lock"
    lock.unlink(missing_ok=True)
    lock.symlink_to(outside)
    result = invoke("leaderboard", str(root))
    assert result.exit_code == 0, result.output
    assert f"{lock} was a symlink to {outside}" in result.stderr
    assert outside.read_text() == "keep me\n" and not lock.is_symlink()


def test_a_worker_log_symlinked_outside_is_not_appended_through(tmp_path, monkeypatch):
    """The local launcher's worker output goes into the results folder, never through a
    symlink at ``logs/worker-<i>.log`` to a file elsewhere."""
    outside = tmp_path / "elsewhere.txt"
    outside.write_bytes(b"keep me\n")
    root = tmp_path / "results"
    (root / "logs").mkdir(parents=True)
    (root / "logs" / "worker-0.log").symlink_to(outside)

    class FakeProcess:
        returncode = 0

        def __init__(self, command, stdout, **kwargs):
            stdout.write(b"worker output\n")
            stdout.flush()

        def poll(self):
            return 0

    monkeypatch.setattr(launchers.subprocess, "Popen", FakeProcess)
    monkeypatch.setattr(LaunchRequest, "finished", lambda self: 0)
    request = LaunchRequest(root, ("a-seed0-1",), "cpu")
    with pytest.warns(match=r"worker-0\.log was a symlink to .*elsewhere\.txt"):
        LocalLauncher(LocalParams(workers=1, threads=1)).launch(request, Console())
    assert outside.read_bytes() == b"keep me\n"
    log = root / "logs" / "worker-0.log"
    assert not log.is_symlink() and log.read_bytes() == b"worker output\n"
