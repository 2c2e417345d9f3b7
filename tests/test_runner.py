"""Running a suite (mae_bench/runner.py, through `mae-bench run`): stored pretraining and
evaluations are reused, an interrupted run resumes where it stopped, the same seed gives the
same numbers, another suite's results are never orphaned, and what would fail hours later
(an unwritable output, a step that cannot fit in memory) is refused before training."""

import errno
import json
import os
import shutil
import signal
import subprocess
import time
from types import SimpleNamespace

import pandas as pd
import pytest

from tests.conftest import MAE_BENCH, cell_record, invoke, tiny_suite_data, write_suite


def _snapshot(root):
    return {
        str(p.relative_to(root)): p.stat().st_mtime_ns for p in (root / "cells").rglob("*.json")
    }


# --------------------------------------------------------------- reuse: evaluations apart
def test_changing_knn_k_reruns_only_knn(tiny_run_copy):
    run = tiny_run_copy
    before = _snapshot(run.root)
    result = invoke("run", str(run.suite), "--out", str(run.out), "--set", "eval.knn.k=3")
    assert result.exit_code == 0, result.output
    assert "4 cells reuse their stored pretraining and only run: knn" in result.stderr
    after = _snapshot(run.root)
    assert all(after[path] == mtime for path, mtime in before.items())  # nothing rewritten
    added = sorted(set(after) - set(before))
    assert len(added) == 4 and all("/evals/knn-" in path for path in added)
    for cell in (run.root / "cells").iterdir():
        knn = [json.loads(p.read_text()) for p in cell.glob("evals/knn-*/result.json")]
        assert sorted(k["config"]["evaluator"]["k"] for k in knn) == [3, 20]
    # and back: both k-NN settings are cached now
    again = invoke("run", str(run.suite), "--out", str(run.out))
    assert "4 of 4 cells already finished" in again.stderr
    assert "loading dataset" not in again.stderr


def test_adding_an_evaluator_runs_only_it_from_the_stored_weights(tiny_run_copy):
    run = tiny_run_copy
    cell = run.cells()["vit-seed0"]
    stored = cell_record(cell)
    result = invoke(
        "run", str(run.suite), "--out", str(run.out),
        "--set", "eval.finetune={enabled: true, epochs: 1}",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "only run: finetune" in result.stderr and "(pretraining reused)" in result.stderr
    now = cell_record(cell)
    assert now["metrics"]["lp_acc"] == stored["metrics"]["lp_acc"] and "ft_acc" in now["metrics"]


def test_a_deleted_evaluation_is_recomputed_identically_from_stored_weights(tiny_run_copy):
    run = tiny_run_copy
    cell = run.cells()["vit-seed0"]
    (knn,) = cell.glob("evals/knn-*")
    first = json.loads((knn / "result.json").read_text())["metrics"]
    shutil.rmtree(knn)
    result = invoke("run", str(run.suite), "--out", str(run.out))
    assert result.exit_code == 0, result.output
    assert "1 cell reuses its stored pretraining and only runs: knn" in result.stderr
    assert json.loads((knn / "result.json").read_text())["metrics"] == first


# --------------------------------------------------------------- resume: cells apart
def test_rerun_skips_finished_cells(tiny_run_copy):
    run = tiny_run_copy
    before = {p.name: p.stat().st_mtime_ns for p in (run.root / "cells").iterdir()}
    result = invoke("run", str(run.suite), "--out", str(run.out), "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert "4 of 4 cells already finished" in result.stderr
    assert "loading dataset" not in result.stderr
    after = {p.name: p.stat().st_mtime_ns for p in (run.root / "cells").iterdir()}
    assert before == after


def test_interrupted_suite_resumes_only_missing_cells(tiny_run_copy):
    run = tiny_run_copy
    cells = sorted((run.root / "cells").iterdir())
    keep = cells[0].stat().st_mtime_ns
    shutil.rmtree(cells[1])  # as if the run had stopped before this cell finished
    (run.root / "cells" / ".vit-seed0-half.tmp").mkdir()  # a crashed half-written cell
    result = invoke("run", str(run.suite), "--out", str(run.out))
    assert result.exit_code == 0, result.output
    assert "3 of 4 cells already finished" in result.stderr
    assert cells[0].stat().st_mtime_ns == keep and cells[1].is_dir()
    assert not (run.root / "cells" / ".vit-seed0-half.tmp").exists()
    assert len(pd.read_csv(run.root / "runs.csv")) == 4


def test_same_seed_is_deterministic_on_cpu(tiny_run, tmp_path):
    """Seed 1 again, in this process: the shared run computed it in another."""
    suite = write_suite(tmp_path, seeds=[1])
    result = invoke("run", str(suite), "--out", str(tmp_path / "again"), "--device", "cpu")
    assert result.exit_code == 0, result.output
    again = sorted((tmp_path / "again" / "tiny" / "cells").iterdir())
    assert [c.name for c in again] == sorted(
        c.name for name, c in tiny_run.cells().items() if name.endswith("seed1")
    )
    for cell in again:
        first = cell_record(tiny_run.root / "cells" / cell.name)
        for key in ("psnr_masked", "lp_acc", "final_loss"):
            assert cell_record(cell)["metrics"][key] == first["metrics"][key], key


# --------------------------------------------------------------- the results folder
def test_another_suite_under_the_same_name_is_refused_then_replaced(tiny_run_copy):
    run = tiny_run_copy
    before = (run.root / "leaderboard.md").read_text()
    other_file = run.suite.with_name("other.yaml")  # another suite file named `tiny` too
    other_file.write_text(run.suite.read_text())
    other = ["--set", "pretrain.epochs=1", "--set", "seeds=[0]"]  # every cell's key changes
    result = invoke("run", str(other_file), "--out", str(run.out), *other)
    assert result.exit_code == 2 and "holds the results of another suite" in result.stderr
    assert "--replace" in result.stderr and (run.root / "leaderboard.md").read_text() == before
    replaced = invoke("run", str(other_file), "--out", str(run.out), *other, "--replace")
    assert replaced.exit_code == 0, replaced.output
    (aside,) = run.out.glob("tiny.replaced-*")
    assert len(list((aside / "cells").iterdir())) == 4 and len(run.cells()) == 2


def test_the_same_file_with_every_setting_changed_is_the_same_suite(tiny_run_copy):
    """Editing a suite in place (or --set) keeps its folder: the earlier cells stay and come
    back, without recomputing, when their settings do."""
    run = tiny_run_copy
    first = set(run.cells())
    suite = json.loads((run.root / "suite.json").read_text())["source"]  # the file it ran
    changed = invoke("run", suite, "--out", str(run.out), "--set", "seeds=[5]")
    assert changed.exit_code == 0, changed.output
    assert set(run.cells()) > first and len(pd.read_csv(run.root / "runs.csv")) == 2
    back = invoke("run", suite, "--out", str(run.out))
    assert back.exit_code == 0, back.output
    assert f"{len(first)} of {len(first)} cells already finished" in back.stderr


# --------------------------------------------------------------- refused before training
def test_unwritable_output_is_found_before_training(tmp_path, monkeypatch):
    suite = write_suite(tmp_path)
    (tmp_path / "file").write_text("x")
    result = invoke("run", str(suite), "--out", str(tmp_path / "file"))
    assert result.exit_code == 2 and "--out: cannot write results under" in result.stderr

    def read_only(*args, **kwargs):
        raise PermissionError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr("mae_bench.results.tempfile.mkstemp", read_only)
    result = invoke("run", str(suite), "--out", str(tmp_path / "ro"))
    assert result.exit_code == 2 and "Read-only file system" in result.stderr
    assert "Traceback" not in result.output and not (tmp_path / "ro" / "tiny").exists()
    monkeypatch.undo()
    nearly_full = SimpleNamespace(total=1 << 40, used=(1 << 40) - (1 << 20), free=1 << 20)
    monkeypatch.setattr("mae_bench.results.shutil.disk_usage", lambda path: nearly_full)
    result = invoke("run", str(suite), "--out", str(tmp_path / "full"))
    assert result.exit_code == 2 and "MiB free" in result.stderr and "need about" in result.stderr


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_folder_by_permissions(tmp_path):
    (tmp_path / "ro").mkdir(mode=0o555)
    result = invoke("run", str(write_suite(tmp_path)), "--out", str(tmp_path / "ro"))
    assert result.exit_code == 2 and "cannot write results under" in result.stderr


def test_a_suite_that_cannot_fit_in_memory_is_refused_with_the_figure(tmp_path):
    suite = write_suite(tmp_path)
    # 4096x4096 images: hundreds of GiB for one step even of one image (a small batch keeps
    # the measurement on the meta device quick)
    huge = ["--set", "dataset.image_size=4096", "--set", "pretrain.batch_size=1"]
    result = invoke("run", str(suite), "--out", str(tmp_path / "out"), *huge)
    assert result.exit_code == 2 and "one pretraining step needs about" in result.stderr
    assert "GiB of memory" in result.stderr and not (tmp_path / "out").exists()
    checked = invoke("validate", str(suite), *huge)
    assert checked.exit_code == 0 and "warning:" in checked.stderr


# --------------------------------------------------------------- signals
def _block_sigterm() -> None:
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})


@pytest.mark.slow
@pytest.mark.parametrize("inherited", ["unblocked", "blocked"])
def test_sigterm_keeps_finished_cells_and_says_how_to_resume(tmp_path, inherited):
    """Also when the parent blocked SIGTERM (a mask is inherited; some CI runners and job
    supervisors block it): mae-bench unblocks what it handles, or the signal would wait,
    pending, until the run had finished."""
    data = tiny_suite_data(seeds=[0, 1, 2])
    data["pretrain"]["epochs"] = 20
    suite = write_suite(tmp_path, data)
    start = _block_sigterm if inherited == "blocked" else None
    proc = subprocess.Popen([MAE_BENCH, "run", str(suite), "--out", str(tmp_path / "out")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=start)  # fmt: skip
    cells = tmp_path / "out" / "tiny" / "cells"
    deadline = time.time() + 120
    while time.time() < deadline and not any(
        p.name.startswith("mlp-") and not p.name.startswith(".")
        for p in (cells.iterdir() if cells.is_dir() else [])
    ):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 143, stderr
    assert "terminated (SIGTERM): finished cells are kept" in stderr and "Traceback" not in stderr
    kept = [p for p in cells.iterdir() if not p.name.startswith(".")]
    assert kept and all((p / "pretrain.json").is_file() for p in kept)
    assert not list(cells.glob(".*.tmp"))
