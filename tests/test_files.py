"""File helpers (mae_bench/files.py): atomic writes that fail with one message naming the
file, and opening a results file never through a symlink that leaves the results folder."""

from __future__ import annotations

import errno
import os
import warnings
from pathlib import Path

import pytest

from mae_bench import files
from mae_bench.errors import MaeBenchWarning, UserError
from mae_bench.files import WriteError, atomic_write, open_inside


def test_a_full_disk_is_a_write_error_naming_the_file(tmp_path, monkeypatch):
    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(files.os, "fsync", full)
    target = tmp_path / "leaderboard.csv"
    with pytest.raises(WriteError) as raised:
        atomic_write(target, "a,b\n")
    error = raised.value
    assert str(error) == f"cannot write {target}: No space left on device"
    assert isinstance(error, UserError) and isinstance(error, OSError)  # both kinds of handler
    assert error.errno == errno.ENOSPC and error.filename == str(target)
    assert list(tmp_path.iterdir()) == []  # no temporary file left behind


def test_a_read_only_folder_is_a_write_error_naming_the_file(tmp_path, monkeypatch):
    def read_only(*args, **kwargs):
        raise PermissionError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(files.tempfile, "mkstemp", read_only)
    with pytest.raises(WriteError, match=r"cannot write .*suite\.json: Read-only file system$"):
        atomic_write(tmp_path / "suite.json", "{}")


def test_exclusive_write_still_answers_false_when_the_file_exists(tmp_path):
    assert atomic_write(tmp_path / "lease.json", "1", exclusive=True)
    assert not atomic_write(tmp_path / "lease.json", "2", exclusive=True)
    assert (tmp_path / "lease.json").read_text() == "1"


def _append(root: Path, path: Path, text: bytes) -> None:
    fd = open_inside(root, path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    with os.fdopen(fd, "ab") as handle:
        handle.write(text)


def test_a_symlink_leading_outside_is_replaced_by_a_real_file(tmp_path):
    root, outside = tmp_path / "results", tmp_path / "elsewhere.txt"
    (root / "logs").mkdir(parents=True)
    outside.write_bytes(b"not yours\n")
    log = root / "logs" / "worker-0.log"
    log.symlink_to(outside)
    with pytest.warns(MaeBenchWarning, match=r"worker-0\.log was a symlink to .*elsewhere\.txt"):
        _append(root, log, b"output\n")
    assert outside.read_bytes() == b"not yours\n"
    assert not log.is_symlink() and log.read_bytes() == b"output\n"


def test_a_symlink_inside_the_folder_and_a_plain_file_are_written_as_they_are(tmp_path):
    root = tmp_path / "results"
    root.mkdir()
    (root / "real.log").write_bytes(b"a\n")
    (root / "link.log").symlink_to("real.log")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _append(root, root / "link.log", b"b\n")
        _append(root, root / "real.log", b"c\n")
        _append(root, root / "new.log", b"d\n")
    assert (root / "link.log").is_symlink() and (root / "real.log").read_bytes() == b"a\nb\nc\n"
    assert (root / "new.log").read_bytes() == b"d\n"


def test_a_symlink_loop_is_replaced_too(tmp_path):
    root = tmp_path / "results"
    root.mkdir()
    (root / "a.log").symlink_to("b.log")
    (root / "b.log").symlink_to("a.log")
    with pytest.warns(MaeBenchWarning, match="a symlink"):
        _append(root, root / "a.log", b"x\n")
    assert (root / "a.log").read_bytes() == b"x\n"


def test_a_folder_leading_outside_is_refused_with_one_message(tmp_path):
    root, outside = tmp_path / "results", tmp_path / "elsewhere"
    root.mkdir()
    outside.mkdir()
    (root / "logs").symlink_to(outside)
    with pytest.raises(UserError, match=r"logs/worker-0\.log: .*leads outside .*results"):
        _append(root, root / "logs" / "worker-0.log", b"x\n")
    assert list(outside.iterdir()) == []
