"""Nothing lost, nothing silently wrong: unusual images, damaged results, filesystem and
numeric faults. Each test reproduces a fault found by probing the CLI as a user would."""

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from mae_bench_plugins.imagefolder import cached_images, decode, discover, to_rgb
from mae_bench_plugins.probes import knn_classify
from PIL import Image

import mae_bench.cell
from mae_bench.errors import MaeBenchWarning
from mae_bench.metrics import best_thresholds
from mae_bench.results import CellStore, write_json
from tests.conftest import invoke, tiny_suite_data


def _suite(tmp_path, **changes) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny_suite_data(**changes)))
    return path


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished tiny run (2 cells) to damage, copied per test."""
    base = tmp_path_factory.mktemp("finished")
    result = invoke("run", str(_suite(base)), "--out", str(base / "out"))
    assert result.exit_code == 0, result.output
    return base


@pytest.fixture
def run_copy(finished, tmp_path):
    import shutil

    shutil.copytree(finished, tmp_path / "copy")
    suite = tmp_path / "copy" / "tiny.yaml"
    root = tmp_path / "copy" / "out" / "tiny"
    return suite, root


def _cells(root: Path) -> dict[str, Path]:
    return {p.name.split("-seed")[0]: p for p in (root / "cells").iterdir() if p.is_dir()}


# --------------------------------------------------------------- images by mode
def _rgb(img) -> np.ndarray:
    return np.asarray(to_rgb(img))


def test_sixteen_bit_and_float_images_are_scaled_not_clipped(tmp_path):
    raw = np.array([[0, 257], [32896, 65535]], dtype=np.uint16)
    png = tmp_path / "sixteen.png"
    Image.fromarray(raw).save(png)
    with Image.open(png) as img:
        assert img.mode.startswith("I")  # a real 16-bit PNG, as medical sets ship them
        decoded = _rgb(img)
    assert decoded[..., 0].tolist() == [[0, 1], [128, 255]]
    assert (decoded[..., 2] == decoded[..., 0]).all()
    unit = Image.fromarray(np.array([[0.0, 0.25], [0.5, 1.0]], dtype=np.float32), "F")
    assert _rgb(unit)[..., 1].tolist() == [[0, 64], [128, 255]]
    wide = Image.fromarray(np.array([[-5.0, 0.0], [5.0, 15.0]], dtype=np.float32), "F")
    assert _rgb(wide)[..., 1].tolist() == [[0, 64], [128, 255]]  # by its value range
    tiff = tmp_path / "float.tiff"
    unit.save(tiff)
    assert decode(tiff, 2)[0].tolist() == [[0, 64], [128, 255]]


def test_palette_bilevel_alpha_and_cmyk_images_decode_to_known_rgb():
    palette = Image.new("P", (2, 1))
    palette.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    palette.putdata([0, 1])
    assert _rgb(palette).tolist() == [[[10, 20, 30], [200, 100, 50]]]
    bilevel = Image.fromarray(np.array([[0, 1]], dtype=bool))
    assert bilevel.mode == "1" and _rgb(bilevel).tolist() == [[[0, 0, 0], [255, 255, 255]]]
    la = Image.fromarray(np.array([[[200, 255], [200, 0]]], dtype=np.uint8), "LA")
    assert _rgb(la).tolist() == [[[200, 200, 200], [0, 0, 0]]]  # over black
    rgba = Image.fromarray(np.array([[[100, 50, 200, 255], [100, 50, 200, 51]]], np.uint8))
    assert _rgb(rgba).tolist() == [[[100, 50, 200], [20, 10, 40]]]
    cmyk = Image.fromarray(
        np.array([[[0, 0, 0, 0], [255, 0, 0, 0], [0, 0, 0, 128]]], dtype=np.uint8), "CMYK"
    )
    assert _rgb(cmyk).tolist() == [[[255, 255, 255], [0, 255, 255], [127, 127, 127]]]


# --------------------------------------------------------------- class symlinks
def _class_dirs(root: Path, *names: str) -> None:
    for name in names:
        (root / name).mkdir(parents=True)
        Image.new("RGB", (4, 4), (9, 9, 9)).save(root / name / "a.png")


@pytest.mark.parametrize(
    ("target", "message"),
    [(".", "the dataset root or above"), ("c", "loops or leads nowhere"), ("OUT", "outside it")],
)
def test_class_folder_symlinks_that_loop_or_escape_are_refused(tmp_path, target, message):
    from mae_bench import UserError

    root = tmp_path / "data"
    _class_dirs(root, "a", "b")
    _class_dirs(tmp_path, "elsewhere")
    os.symlink(tmp_path / "elsewhere" if target == "OUT" else target, root / "c")
    with pytest.raises(UserError, match=message):
        discover(root)


def test_class_folder_symlink_inside_the_root_is_read(tmp_path):
    root = tmp_path / "data"
    _class_dirs(root, "a", "store/b")
    os.symlink("store/b", root / "b")
    classes, files, _ = discover(root)
    assert classes == ["a", "b", "store"] and len(files) == 3


# --------------------------------------------------------------- damaged caches and results
def test_damaged_decode_cache_is_rebuilt_with_a_warning(tmp_path):
    files = []
    for i in range(3):
        files.append(tmp_path / f"{i}.png")
        Image.new("RGB", (8, 8), (i * 50, 0, 0)).save(files[-1])
    first = cached_images(files, 4, tmp_path / "cache").clone()
    (cache,) = (tmp_path / "cache").glob("*.npy")
    for damage in (b"", cache.read_bytes()[:100]):
        cache.write_bytes(damage)
        with pytest.warns(MaeBenchWarning, match=f"decode cache {cache} is damaged"):
            again = cached_images(files, 4, tmp_path / "cache")
        assert torch.equal(again, first)


@pytest.mark.parametrize(
    "damage", [b"", b'{"cell_id": "x", "metr', b"\xff\xfe garbage", b"[1, 2]", b'{"a": 1}']
)
def test_damaged_result_is_set_aside_and_recomputed(run_copy, damage):
    suite, root = run_copy
    vit = _cells(root)["vit"]
    (vit / "pretrain.json").write_bytes(damage)
    board = invoke("leaderboard", str(root))  # skipped with a warning naming the file
    assert board.exit_code == 0, board.output
    assert f"warning: damaged result {vit / 'pretrain.json'}" in board.stderr
    assert "1 of 2 cells finished" in board.stderr
    result = invoke("run", str(suite), "--out", str(root.parent))
    assert result.exit_code == 0, result.output
    assert "moved to" in result.stderr and "recomputed" in result.stderr
    assert json.loads((vit / "pretrain.json").read_text())["variant"] == "vit"
    (aside,) = (root / "cells" / ".damaged").iterdir()
    assert (aside / "pretrain.json").read_bytes() == damage  # kept for inspection


def test_damaged_suite_record_is_one_clear_error(run_copy):
    _, root = run_copy
    (root / "suite.json").write_text('{"name": "tiny", "cells": 3}')
    for command in ("leaderboard", "report"):
        result = invoke(command, str(root))
        assert result.exit_code == 2 and "Traceback" not in result.output
        assert result.stderr.startswith(f"error: {root / 'suite.json'}: damaged")


def test_report_skips_truncated_weights_and_missing_history(run_copy):
    _, root = run_copy
    cells = _cells(root)
    weights = cells["vit"] / "encoder.safetensors"
    weights.write_bytes(weights.read_bytes()[:50])
    (cells["mlp"] / "history.csv").unlink()
    result = invoke("report", str(root))
    assert result.exit_code == 0, result.output
    assert f"{weights}" in result.stderr and "vit skipped" in result.stderr
    assert f"{cells['mlp'] / 'history.csv'}: no loss history: skipped" in result.stderr
    assert (root / "plots" / "reconstructions.png").is_file()  # from the intact cell


def test_result_json_is_strict_json(run_copy, tmp_path):
    _, root = run_copy

    def refuse(constant):
        raise ValueError(f"bare {constant} in JSON")

    for path in root.rglob("*.json"):
        json.loads(path.read_text(), parse_constant=refuse)
    write_json(tmp_path / "x.json", {"auc": float("nan"), "m": [float("inf"), 1.5]})
    assert json.loads((tmp_path / "x.json").read_text()) == {"auc": None, "m": [None, 1.5]}


# --------------------------------------------------------------- the results folder
def test_another_suite_under_the_same_name_is_refused_then_replaced(run_copy):
    suite, root = run_copy
    before = (root / "leaderboard.md").read_text()
    other = ["--set", "pretrain.epochs=1"]  # every cell's key changes
    result = invoke("run", str(suite), "--out", str(root.parent), *other)
    assert result.exit_code == 2 and "holds the results of another suite" in result.stderr
    assert "--replace" in result.stderr and (root / "leaderboard.md").read_text() == before
    replaced = invoke("run", str(suite), "--out", str(root.parent), *other, "--replace")
    assert replaced.exit_code == 0, replaced.output
    (aside,) = root.parent.glob("tiny.replaced-*")
    assert len(list((aside / "cells").iterdir())) == 2 and len(_cells(root)) == 2


def test_stale_temporary_folders_are_removed_and_live_ones_kept(run_copy):
    suite, root = run_copy
    cells = root / "cells"
    host = socket.gethostname().replace(".", "_")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    stale = [cells / f".vit-seed0-x.{host}.{dead}.abc.tmp", cells / ".vit-seed0-half.tmp"]
    live = cells / f".mlp-seed0-x.{host}.{os.getpid()}.abc.tmp"
    for folder in (*stale, live):
        folder.mkdir()
    assert invoke("run", str(suite), "--out", str(root.parent)).exit_code == 0
    assert not any(p.exists() for p in stale) and live.is_dir()


def test_finished_cells_are_never_replaced_even_by_racing_writers(tmp_path):
    store = CellStore(tmp_path)
    record = {"cell_id": "c", "variant": "v", "seed": 0, "config_hash": "h", "config": {},
              "components": {}, "metrics": {}, "provenance": {}}  # fmt: skip

    def writer(tag: int):
        def write_files(folder: Path) -> None:
            (folder / "tag").write_text(str(tag))
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
        result = invoke("run", str(_suite(tmp_path)), "--out", str(tmp_path / "out"))
    finally:
        os.umask(old)
    assert result.exit_code == 0, result.output
    cell = next((tmp_path / "out" / "tiny" / "cells").iterdir())
    assert cell.stat().st_mode & 0o777 == 0o755
    assert (cell / "pretrain.json").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "out" / "tiny" / "leaderboard.md").stat().st_mode & 0o777 == 0o644


# --------------------------------------------------------------- filesystem and input errors
def test_unwritable_output_is_found_before_training(tmp_path, monkeypatch):
    suite = _suite(tmp_path)
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
    result = invoke("run", str(_suite(tmp_path)), "--out", str(tmp_path / "ro"))
    assert result.exit_code == 2 and "cannot write results under" in result.stderr


def test_full_disk_while_storing_fails_that_cell_only(tmp_path, monkeypatch):
    real = mae_bench.cell._save_weights

    def full_for_vit(module, path, meta):
        if meta["cell_id"].startswith("vit-"):
            raise OSError(errno.ENOSPC, "No space left on device")
        real(module, path, meta)

    monkeypatch.setattr(mae_bench.cell, "_save_weights", full_for_vit)
    result = invoke("run", str(_suite(tmp_path)), "--out", str(tmp_path / "out"))
    assert result.exit_code == 1 and "the disk holding the results is full" in result.stderr
    cells = list((tmp_path / "out" / "tiny" / "cells").iterdir())
    assert [c.name.split("-")[0] for c in cells] == ["mlp"]


def test_bad_suite_files_and_devices_are_one_clear_error(tmp_path):
    latin = tmp_path / "latin.yaml"
    latin.write_bytes("name: caf\xe9\n".encode("latin-1"))
    result = invoke("validate", str(latin))
    assert result.exit_code == 2 and result.stderr.startswith(f"error: {latin}: not UTF-8")
    for device in ("meta", "xla", "hpu"):
        result = invoke("run", str(_suite(tmp_path)), "--device", device, "--out", str(tmp_path))
        assert result.exit_code == 2 and f"unsupported device {device!r}" in result.stderr
    for setting, field in (("pretrain.lr=.inf", "pretrain.lr"), (f"seeds=[{2**63}]", "seeds[0]")):
        result = invoke("validate", str(_suite(tmp_path)), "--set", setting)
        assert result.exit_code == 2 and f": {field}: " in result.stderr, result.stderr


def test_a_suite_that_cannot_fit_in_memory_is_refused_with_the_figure(tmp_path):
    suite = _suite(tmp_path)
    huge = ["--set", "dataset.image_size=4096"]
    result = invoke("run", str(suite), "--out", str(tmp_path / "out"), *huge)
    assert result.exit_code == 2 and "one pretraining step needs about" in result.stderr
    assert "GiB of memory" in result.stderr and not (tmp_path / "out").exists()
    checked = invoke("validate", str(suite), *huge)
    assert checked.exit_code == 0 and "warning:" in checked.stderr


# --------------------------------------------------------------- numeric faults
def test_knn_votes_are_stable_at_tiny_temperatures():
    g = torch.Generator().manual_seed(0)
    train, test = torch.randn(50, 8, generator=g), torch.randn(10, 8, generator=g)
    labels = torch.randint(3, (50,), generator=g)
    probs = knn_classify(train, labels, test, num_classes=3, k=5, temperature=0.001)
    assert torch.isfinite(probs).all() and torch.allclose(probs.sum(1), torch.ones(10))
    nearest = (torch.nn.functional.normalize(test, dim=1)
               @ torch.nn.functional.normalize(train, dim=1).T).argmax(1)  # fmt: skip
    assert torch.equal(probs.argmax(1), labels[nearest])


def test_binary_threshold_search_emits_no_runtime_warning():
    y = np.array([0, 0, 1, 1, 0, 1])
    scores = np.array([0.9, 0.8, 0.1, 0.2, 0.7, 0.3])  # worst ranking: F1 is 0/0 somewhere
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        best = best_thresholds(y, scores)
    assert 0 <= best["best_f1"] <= 1


# --------------------------------------------------------------- SIGTERM
def test_sigterm_keeps_finished_cells_and_says_how_to_resume(tmp_path):
    data = tiny_suite_data(seeds=[0, 1, 2])
    data["pretrain"]["epochs"] = 20
    suite = tmp_path / "s.yaml"
    suite.write_text(yaml.safe_dump(data))
    exe = Path(sys.executable).parent / "mae-bench"
    proc = subprocess.Popen([str(exe), "run", str(suite), "--out", str(tmp_path / "out")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    cells = tmp_path / "out" / "tiny" / "cells"
    deadline = time.time() + 120
    while time.time() < deadline and not any(
        p.name.startswith("mlp-") and not p.name.startswith(".") for p in
        (cells.iterdir() if cells.is_dir() else [])
    ):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 143, stderr
    assert "terminated (SIGTERM): finished cells are kept" in stderr and "Traceback" not in stderr
    kept = [p for p in cells.iterdir() if not p.name.startswith(".")]
    assert kept and all((p / "pretrain.json").is_file() for p in kept)
    assert not list(cells.glob(".*.tmp"))


def test_sigterm_while_a_cell_folder_is_written_leaves_nothing_half_written(
    tmp_path, monkeypatch
):
    real = mae_bench.cell.write_json

    def write_then_get_killed(path, data):
        if path.name == "pretrain.json" and data["variant"] == "vit":
            os.kill(os.getpid(), signal.SIGTERM)  # the real signal, mid-write
        real(path, data)

    monkeypatch.setattr(mae_bench.cell, "write_json", write_then_get_killed)
    suite = _suite(tmp_path)
    result = invoke("run", str(suite), "--out", str(tmp_path / "out"))
    assert result.exit_code == 143 and "terminated (SIGTERM)" in result.stderr
    cells = tmp_path / "out" / "tiny" / "cells"
    assert [p.name.split("-")[0] for p in cells.iterdir()] == ["mlp"]  # no .tmp, no vit
    monkeypatch.undo()
    again = invoke("run", str(suite), "--out", str(tmp_path / "out"))
    assert again.exit_code == 0 and "1 of 2 cells already finished" in again.stderr
