"""File helpers for the core and for plugins: clear errors for missing files, atomic writes
(a write that fails is one :class:`WriteError` naming the file), opening a results file never
through a symlink that leads out of the results folder, and the permissions of files made
through ``tempfile``. (Image files as tensors, for dataset plugins, are in
:mod:`mae_bench.data`.)"""

from __future__ import annotations

import errno
import os
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from mae_bench.errors import MaeBenchWarning, UserError


class WriteError(UserError, OSError):
    """A file could not be written (a full disk, a read-only folder, ...): ``cannot write
    <path>: <reason>``. An OSError too (``errno`` kept), so handlers of either kind catch it;
    the CLI prints it as one line."""

    def __str__(self) -> str:
        return f"cannot write {self.filename}: {self.strerror or 'unknown error'}"

    @classmethod
    def of(cls, path: Path | str, exc: OSError) -> WriteError:
        """The WriteError for ``exc``, raised while writing ``path``."""
        if isinstance(exc, WriteError):
            return exc
        return cls(exc.errno, exc.strerror or str(exc), str(path))


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

    The folder is created if needed; nothing is left behind on failure. True when written;
    a :class:`WriteError` naming ``path`` when it cannot be written."""
    path = Path(path)
    try:
        return _atomic_write(path, data, exclusive)
    except OSError as exc:
        raise WriteError.of(path, exc) from exc


def _atomic_write(path: Path, data: str | bytes | Writer, exclusive: bool) -> bool:
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


def _leads_outside(root: Path, path: Path) -> bool:
    """Whether ``path``, every symlink followed, lies outside ``root``."""
    real_root = os.path.realpath(root)
    real = os.path.realpath(path)
    return os.path.commonpath([real_root, real]) != real_root


def _loops(path: Path) -> bool:
    """Whether ``path`` is a symlink that never resolves (a loop)."""
    try:
        os.stat(path)
    except OSError as exc:
        return exc.errno == errno.ELOOP
    return False


def drop_escaping_symlink(root: Path | str, path: Path | str, *, any_symlink: bool = False) -> None:
    """Make ``path`` (a file under the results folder ``root``) safe to write: a symlink
    there that leads outside ``root`` or nowhere (a loop), with ``any_symlink`` any symlink,
    is removed with a warning naming where it led, so the file is made anew in the folder.
    A folder above it that leads outside ``root`` is refused (UserError): nothing is
    written through it."""
    root, path = Path(root), Path(path)
    if _leads_outside(root, path.parent):
        raise UserError(
            f"{path}: its folder leads outside {root} (through a symlink to "
            f"{os.path.realpath(path.parent)}): nothing is written there; replace the symlink "
            "with a folder"
        )
    if path.is_symlink() and (any_symlink or _leads_outside(root, path) or _loops(path)):
        target = os.readlink(path)
        try:
            path.unlink(missing_ok=True)
        except OSError as exc:
            raise WriteError.of(path, exc) from exc
        warnings.warn(
            f"{path} was a symlink to {target}: replaced by a file of its own",
            MaeBenchWarning,
            stacklevel=2,
        )


def open_inside(root: Path | str, path: Path | str, flags: int, mode: int = 0o666) -> int:
    """``os.open(path, flags, mode)`` for a file under the results folder ``root``, never
    through a symlink that leads outside it (see :func:`drop_escaping_symlink`); a file
    descriptor. A symlink within ``root`` is followed. WriteError naming ``path`` if it
    cannot be opened."""
    path = Path(path)
    drop_escaping_symlink(root, path)
    nofollow = 0 if path.is_symlink() else getattr(os, "O_NOFOLLOW", 0)  # one made since: ELOOP
    try:
        return os.open(path, flags | nofollow, mode)
    except OSError as exc:
        raise WriteError.of(path, exc) from exc
