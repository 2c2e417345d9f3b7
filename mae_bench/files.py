"""File helpers for the core and for plugins: clear errors for missing files, atomic writes,
and the permissions of files made through ``tempfile``. (Image files as tensors, for dataset
plugins, are in :mod:`mae_bench.data`.)"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from mae_bench.errors import UserError


def require_dir(path: Path, dataset: str, hint: str) -> Path:
    """``path`` if it is a folder, else a UserError saying where and how to get it."""
    if not path.is_dir():
        raise UserError(f"{dataset}: folder not found: {path}. {hint}")
    return path


def require_file(path: Path, dataset: str, hint: str) -> Path:
    """``path`` if it is a file, else a UserError saying where and how to get it."""
    if not path.is_file():
        raise UserError(f"{dataset}: file not found: {path}. {hint}")
    return path


Writer = Callable[[BinaryIO], None]


def atomic_write(path: Path | str, data: str | bytes | Writer, *, exclusive: bool = False) -> bool:
    """Write ``path`` all at once or not at all: ``data`` (text as UTF-8, bytes, or a function
    writing to a binary file) goes to a temporary file beside it, is flushed to disk (fsync),
    given the permissions the umask allows, then renamed into place. With ``exclusive`` it is
    hard-linked instead, which fails if ``path`` exists (also over NFS): False then.

    The folder is created if needed; nothing is left behind on failure. True when written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            if callable(data):
                data(handle)
            else:
                handle.write(data.encode("utf-8") if isinstance(data, str) else data)
            handle.flush()
            os.fsync(handle.fileno())
        grant_umask(tmp)
        if not exclusive:
            os.replace(tmp, path)
            return True
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        return True
    finally:
        Path(tmp).unlink(missing_ok=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def grant_umask(path: Path | str, folder: bool = False) -> None:
    """Give a file made by ``mkstemp`` (0600) or a folder made by ``mkdtemp`` (0700) the
    permissions a plain ``open``/``mkdir`` would have under the current umask, so results
    on a shared filesystem are readable by the team as the umask intends."""
    os.chmod(path, (0o777 if folder else 0o666) & ~_umask())
