"""Result storage: atomic writes, one folder per finished cell, provenance of every result.

Layout under ``<out>/<suite>/``::

    suite.json                      resolved suite and the ids of its cells
    cells/<variant>-seed<k>-<hash>/ result.json, history.csv, encoder/decoder.safetensors
    runs.csv, leaderboard.csv, leaderboard.md

A cell folder is assembled under a temporary name and renamed into place, so it exists
complete or not at all; a re-run skips every cell whose folder exists.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

import timm
import torch

import mae_bench
from mae_bench.errors import UserError

RESULT_FILE = "result.json"
SUITE_FILE = "suite.json"


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temporary file in the same folder and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, data: Any) -> None:
    """Atomically write pretty JSON."""
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True, allow_nan=True) + "\n")


@cache
def git_commit() -> str:
    """The git commit of the mae-bench source tree ('+dirty' if modified), or 'unknown'."""
    source = Path(mae_bench.__file__).resolve().parent.parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=source, capture_output=True, text=True, timeout=5
        )
        if commit.returncode != 0:
            return "unknown"
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=source,
            capture_output=True,
            text=True,
            timeout=5,
        )
        return commit.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def provenance(device_name: str) -> dict[str, str]:
    """Versions, commit, device and date to store beside every result."""
    return {
        "mae_bench_version": mae_bench.__version__,
        "git_commit": git_commit(),
        "torch_version": torch.__version__,
        "timm_version": timm.__version__,
        "python_version": sys.version.split()[0],
        "platform": platform.platform(),
        "device": device_name,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }


class CellStore:
    """The finished cells of one suite's results folder."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.cells_dir = root / "cells"

    def path(self, cell_id: str) -> Path:
        """Folder of a cell."""
        return self.cells_dir / cell_id

    def is_done(self, cell_id: str) -> bool:
        """True when the cell's results are complete on disk."""
        return (self.path(cell_id) / RESULT_FILE).is_file()

    def write(self, cell_id: str, write_files: Callable[[Path], None]) -> Path:
        """Let ``write_files`` fill a temporary folder, then move it into place atomically."""
        self.cells_dir.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=self.cells_dir, prefix=f".{cell_id}.", suffix=".tmp"))
        final = self.path(cell_id)
        try:
            write_files(tmp)
            if not (tmp / RESULT_FILE).is_file():
                raise RuntimeError(f"cell {cell_id} wrote no {RESULT_FILE}")
            if final.exists():  # an older, incomplete attempt (no result.json)
                shutil.rmtree(final)
            os.replace(tmp, final)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        return final

    def load(self, cell_id: str) -> dict[str, Any]:
        """The stored ``result.json`` of a finished cell."""
        return json.loads((self.path(cell_id) / RESULT_FILE).read_text(encoding="utf-8"))


def read_suite_record(root: Path) -> dict[str, Any]:
    """The ``suite.json`` of a results folder, or a UserError naming the missing file."""
    path = root / SUITE_FILE
    if not path.is_file():
        raise UserError(f"{root} is not a mae-bench results folder: {path} is missing")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: not valid JSON ({exc})") from None
