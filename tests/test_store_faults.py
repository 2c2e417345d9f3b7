"""Faults of the results store (issue 21, items 6-10 and 17): a damaged record, bare NaN,
deleted or truncated weights, an unreadable lease and a symlinked ``cells/.damaged`` are each
repaired by ONE run, which says in one warning line what it set aside; nothing is written
through a symlink that leaves the results folder."""

import json
import os
import shutil

import pandas as pd
import pytest

from mae_bench.results import CellStore
from tests.conftest import Run, invoke


def _run_again(run: Run):
    """Run ``run``'s suite again on its results folder; it must succeed without a traceback."""
    result = invoke("run", str(run.suite), "--out", str(run.out))
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    return result


def _warnings(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("warning:")]


def _assert_whole(run: Run) -> None:
    """Every cell of ``run`` is stored and evaluated, and the leaderboard has all of them."""
    store = CellStore(run.root)
    record = json.loads((run.root / "suite.json").read_text())
    ids = [(c["cell_id"], c["evaluations"]) for c in record["cells"]]
    assert sorted(store.finished(ids, repair=False)) == sorted(c for c, _ in ids)
    runs = pd.read_csv(run.root / "runs.csv")
    assert sorted(runs["variant"]) == ["mlp", "mlp", "vit", "vit"]


def _status(run: Run) -> dict[str, str]:
    result = invoke("status", str(run.root))
    assert result.exit_code == 0, result.output
    return {line.split()[1]: line for line in result.stdout.splitlines()}


@pytest.mark.parametrize("damage", ["deleted", "folder"])
def test_a_cell_without_its_pretrain_json_is_repaired_in_one_run(tiny_run_copy, damage):
    run = tiny_run_copy
    cell = run.cells()["mlp-seed0"]
    evals = sorted(p.name for p in (cell / "evals").iterdir())
    (cell / "pretrain.json").unlink()
    if damage == "folder":
        (cell / "pretrain.json").mkdir()
    result = _run_again(run)
    (warning,) = _warnings(result)
    assert f"damaged result {cell / 'pretrain.json'}" in warning
    assert f"(its pretraining and {len(evals)} evaluations) moved to" in warning
    assert "recomputed" in warning
    (aside,) = (run.root / "cells" / ".damaged").iterdir()
    assert aside.name.startswith(cell.name) and str(aside) in warning
    assert sorted(p.name for p in (aside / "evals").iterdir()) == evals  # kept for inspection
    assert (cell / "pretrain.json").is_file()
    assert sorted(p.name for p in (cell / "evals").iterdir()) == evals
    _assert_whole(run)


@pytest.mark.parametrize("which", ["result", "pretrain"])
def test_a_bare_nan_or_infinity_is_damage_set_aside_and_recomputed(tiny_run_copy, which):
    run = tiny_run_copy
    cell = run.cells()["mlp-seed0"]
    if which == "result":
        path = next((cell / "evals").glob("*/result.json"))
        text = path.read_text()
        name, value = next(iter(json.loads(text)["metrics"].items()))
        bare = text.replace(f'"{name}": {json.dumps(value)}', f'"{name}": NaN', 1)
    else:
        path = cell / "pretrain.json"
        text = path.read_text()
        bare = text.replace('"seed": 0', '"seed": 0, "extra": Infinity', 1)
    assert bare != text
    path.write_text(bare)

    board = invoke("leaderboard", str(run.root))
    assert board.exit_code == 0, board.output
    assert f"warning: damaged result {path}: not strict JSON" in board.stderr
    assert "3 of 4 cells finished" in board.stderr

    result = _run_again(run)
    (warning,) = _warnings(result)
    assert f"damaged result {path}: not strict JSON" in warning and "recomputed" in warning
    json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f"bare {c}"))
    _assert_whole(run)


@pytest.mark.parametrize("damage", ["deleted", "truncated"])
def test_deleted_or_truncated_weights_are_not_done_and_one_run_repretrains(tiny_run_copy, damage):
    run = tiny_run_copy
    cell = run.cells()["mlp-seed0"]
    weights = cell / ("encoder.safetensors" if damage == "deleted" else "decoder.safetensors")
    if damage == "deleted":
        weights.unlink()
    else:
        weights.write_bytes(weights.read_bytes()[:-100])
    row = _status(run)[cell.name]
    assert row.startswith("damaged") and str(weights) in row  # not "done"

    result = _run_again(run)
    (warning,) = _warnings(result)
    assert f"damaged result {weights}" in warning and "moved to" in warning
    assert "1 cell reuses" not in result.stderr  # re-pretrained, not only re-evaluated
    assert "FAILED" not in result.stderr
    from mae_bench.results import check_safetensors

    check_safetensors(weights)
    assert all(line.startswith("done") for line in _status(run).values())
    _assert_whole(run)


def test_the_weights_header_check_names_what_is_wrong(tiny_run, tmp_path):
    from mae_bench.results import check_safetensors

    weights = tiny_run.cells()["mlp-seed0"] / "encoder.safetensors"
    check_safetensors(weights)  # a whole file passes
    data = weights.read_bytes()
    for cut, problem in ((4, "no safetensors header"), (20, "header"), (len(data) - 1, "bytes")):
        damaged = tmp_path / f"cut{cut}.safetensors"
        damaged.write_bytes(data[:cut])
        with pytest.raises(ValueError, match=problem):
            check_safetensors(damaged)


@pytest.mark.parametrize("lease", ["garbage", "folder", "unreadable"])
def test_an_unreadable_lease_is_stale_and_taken_over(tiny_run_copy, lease):
    run = tiny_run_copy
    cell = run.cells()["mlp-seed0"]
    shutil.rmtree(cell)
    path = run.root / "leases" / f"{cell.name}.json"
    path.parent.mkdir(exist_ok=True)
    if lease == "garbage":
        path.write_bytes(b"\x00\xff{not json")
    elif lease == "folder":
        path.mkdir()
        (path / "inside").write_text("x")
    else:
        if os.geteuid() == 0:
            pytest.skip("root reads a file whatever its permissions")
        path.write_text("{}")
        path.chmod(0)
    assert _status(run)[cell.name].startswith("pending")

    result = _run_again(run)
    assert "running in other processes" not in result.stderr
    assert "running in another process" not in result.stderr
    (warning,) = _warnings(result)
    assert f"lease {path} cannot be read" in warning and "taken over" in warning
    assert not path.exists()  # released once the cell was stored
    _assert_whole(run)


def test_a_symlinked_damaged_folder_is_never_written_through(tiny_run_copy, tmp_path):
    run = tiny_run_copy
    outside = tmp_path / "outside"
    outside.mkdir()
    damaged = run.root / "cells" / ".damaged"
    damaged.symlink_to(outside, target_is_directory=True)
    cell = run.cells()["mlp-seed0"]
    (cell / "pretrain.json").write_text("{broken")

    result = _run_again(run)
    assert list(outside.iterdir()) == []  # nothing moved out of the results folder
    assert damaged.is_dir() and not damaged.is_symlink()
    (aside,) = damaged.iterdir()
    assert (aside / "pretrain.json").read_text() == "{broken"
    link, repaired = _warnings(result)
    assert f"{damaged} is a symbolic link" in link and str(outside) in link
    assert str(aside) in repaired
    _assert_whole(run)


def test_a_file_in_the_way_of_the_damaged_folder_is_kept_inside_it(tmp_path):
    store = CellStore(tmp_path)
    (store.cells_dir / "c" / "evals").mkdir(parents=True)
    (store.cells_dir / ".damaged").write_text("a stray file")
    target = store.set_aside(store.path("c"))
    damaged = store.cells_dir / ".damaged"
    assert target is not None and target.parent == damaged and target.is_dir()
    (stray,) = [p for p in damaged.iterdir() if p != target]
    assert stray.read_text() == "a stray file"
    assert store.set_aside(store.path("c")) is None  # moved already (by another worker)
