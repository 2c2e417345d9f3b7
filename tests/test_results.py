"""The results store (mae_bench/results.py): damaged records are set aside and recomputed,
every JSON is strict, folders appear whole or not at all (racing writers, SIGTERM mid-write,
stale temporaries), permissions follow the umask, and an older layout is one clear message."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import mae_bench.cell
from mae_bench.results import WEIGHT_FILES, CellStore, write_json
from tests.conftest import invoke, write_suite


@pytest.mark.parametrize(
    "damage", [b"", b'{"cell_id": "x", "metr', b"\xff\xfe garbage", b"[1, 2]", b'{"a": 1}']
)
def test_damaged_result_is_set_aside_and_recomputed(tiny_run_copy, damage):
    run = tiny_run_copy
    vit = run.cells()["vit-seed0"]
    (vit / "pretrain.json").write_bytes(damage)
    board = invoke("leaderboard", str(run.root))  # skipped with a warning naming the file
    assert board.exit_code == 0, board.output
    assert f"warning: damaged result {vit / 'pretrain.json'}" in board.stderr
    assert "3 of 4 cells finished" in board.stderr
    result = invoke("run", str(run.suite), "--out", str(run.out))
    assert result.exit_code == 0, result.output
    assert "moved to" in result.stderr and "recomputed" in result.stderr
    assert json.loads((vit / "pretrain.json").read_text())["variant"] == "vit"
    (aside,) = (run.root / "cells" / ".damaged").iterdir()
    assert (aside / "pretrain.json").read_bytes() == damage  # kept for inspection


def test_damaged_suite_record_is_one_clear_error(tiny_run_copy):
    root = tiny_run_copy.root
    (root / "suite.json").write_text('{"name": "tiny", "cells": 3}')
    for command in ("leaderboard", "report"):
        result = invoke(command, str(root))
        assert result.exit_code == 2 and "Traceback" not in result.output
        assert result.stderr.startswith(f"error: {root / 'suite.json'}: damaged")


def test_results_of_an_older_layout_get_one_clear_message(tiny_run_copy):
    run = tiny_run_copy
    record = json.loads((run.root / "suite.json").read_text())
    for cell in record["cells"]:
        del cell["evaluations"]
    (run.root / "suite.json").write_text(json.dumps(record))
    for command in (["leaderboard", str(run.root)], ["run", str(run.suite), "--out", str(run.out)]):
        result = invoke(*command)
        assert result.exit_code == 2 and "results of an older mae-bench" in result.stderr
    replaced = invoke("run", str(run.suite), "--out", str(run.out), "--replace")
    assert replaced.exit_code == 0, replaced.output
    assert len(list(run.out.glob("tiny.replaced-*"))) == 1


def test_result_json_is_strict_json(tiny_run, tmp_path):
    def refuse(constant):
        raise ValueError(f"bare {constant} in JSON")

    files = list(tiny_run.root.rglob("*.json"))
    assert len(files) > 4 * 3  # suite.json, and per cell its pretraining and evaluations
    for path in files:
        json.loads(path.read_text(), parse_constant=refuse)
    write_json(tmp_path / "x.json", {"auc": float("nan"), "m": [float("inf"), 1.5]})
    assert json.loads((tmp_path / "x.json").read_text()) == {"auc": None, "m": [None, 1.5]}


def test_stale_temporary_folders_are_removed_and_live_ones_kept(tiny_run_copy):
    run = tiny_run_copy
    cells = run.root / "cells"
    host = socket.gethostname().replace(".", "_")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    stale = [cells / f".vit-seed0-x.{host}.{dead}.abc.tmp", cells / ".vit-seed0-half.tmp"]
    live = cells / f".mlp-seed0-x.{host}.{os.getpid()}.abc.tmp"
    for folder in (*stale, live):
        folder.mkdir()
    assert invoke("run", str(run.suite), "--out", str(run.out)).exit_code == 0
    assert not any(p.exists() for p in stale) and live.is_dir()


def test_finished_cells_are_never_replaced_even_by_racing_writers(tmp_path):
    store = CellStore(tmp_path)
    record = {"cell_id": "c", "variant": "v", "seed": 0, "config_hash": "h", "config": {},
              "components": {}, "metrics": {}, "provenance": {}}  # fmt: skip

    def writer(tag: int):
        def write_files(folder: Path) -> None:
            (folder / "tag").write_text(str(tag))
            for name in WEIGHT_FILES:  # a cell without its weights is damaged
                save_file({"w": torch.zeros(2)}, str(folder / name))
            write_json(folder / "pretrain.json", record)

        for _ in range(25):
            store.write("c", write_files)

    seen_missing = []
    stop = threading.Event()

    def reader():
        while not stop.is_set():
            if store.path("c").is_dir() and not (store.path("c") / "pretrain.json").is_file():
                seen_missing.append(1)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(4)]
    watcher = threading.Thread(target=reader)
    watcher.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    watcher.join()
    assert seen_missing == [] and store.is_done("c")
    assert list(store.cells_dir.iterdir()) == [store.path("c")]  # no temporaries left


def test_results_respect_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        result = invoke("run", str(write_suite(tmp_path)), "--out", str(tmp_path / "out"))
    finally:
        os.umask(old)
    assert result.exit_code == 0, result.output
    cell = next((tmp_path / "out" / "tiny" / "cells").iterdir())
    assert cell.stat().st_mode & 0o777 == 0o755
    for name in ("pretrain.json", "history.csv", "encoder.safetensors", "decoder.safetensors"):
        assert (cell / name).stat().st_mode & 0o777 == 0o644, name  # a teammate reads them
    assert (tmp_path / "out" / "tiny" / "leaderboard.md").stat().st_mode & 0o777 == 0o644


def test_sigterm_while_a_cell_folder_is_written_leaves_nothing_half_written(tmp_path, monkeypatch):
    real = mae_bench.cell.write_json

    def write_then_get_killed(path, data):
        if path.name == "pretrain.json" and data["variant"] == "vit":
            os.kill(os.getpid(), signal.SIGTERM)  # the real signal, mid-write
        real(path, data)

    monkeypatch.setattr(mae_bench.cell, "write_json", write_then_get_killed)
    suite = write_suite(tmp_path)
    result = invoke("run", str(suite), "--out", str(tmp_path / "out"))
    assert result.exit_code == 143 and "terminated (SIGTERM)" in result.stderr
    cells = tmp_path / "out" / "tiny" / "cells"
    assert [p.name.split("-")[0] for p in cells.iterdir()] == ["mlp"]  # no .tmp, no vit
    monkeypatch.undo()
    again = invoke("run", str(suite), "--out", str(tmp_path / "out"))
    assert again.exit_code == 0 and "1 of 2 cells already finished" in again.stderr
