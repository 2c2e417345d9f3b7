"""File helpers for the core and for plugins: clear errors, memory-mapped images, atomic
writes, and the permissions of files made through ``tempfile``."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch

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


def memmap_uint8(path: Path, item_shape: tuple[int, ...], dataset: str, hint: str) -> np.ndarray:
    """Memory-map a raw uint8 file as (N, *item_shape), checking its size first."""
    require_file(path, dataset, hint)
    item = int(np.prod(item_shape))
    size = path.stat().st_size
    if size == 0 or size % item:
        raise UserError(
            f"{dataset}: {path} has {size} bytes, not a whole number of {item}-byte images "
            f"({'x'.join(map(str, item_shape))} uint8): the file is truncated or not this "
            f"format. {hint}"
        )
    # copy-on-write: writable for torch.from_numpy, never written back to the file
    return np.memmap(path, dtype=np.uint8, mode="c", shape=(size // item, *item_shape))


def as_uint8_images(array: np.ndarray) -> torch.Tensor:
    """A (N, C, H, W) uint8 tensor sharing memory with ``array`` (memory maps included)."""
    return torch.from_numpy(array)


class ConcatImages:
    """Several uint8 (N_i, C, H, W) tensors, e.g. memory-mapped files, seen as one; no copy."""

    def __init__(self, *parts: torch.Tensor) -> None:
        if not parts or len({p.shape[1:] for p in parts}) != 1:
            raise ValueError("ConcatImages needs one or more tensors of the same image shape")
        self.parts = parts
        self.offsets = torch.tensor([0, *torch.cumsum(torch.tensor([len(p) for p in parts]), 0)])
        self.dtype = parts[0].dtype
        self.ndim = parts[0].ndim
        self.shape = torch.Size([int(self.offsets[-1]), *parts[0].shape[1:]])

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index: torch.Tensor | slice) -> torch.Tensor:
        """Images at ``index`` (a slice or a 1-D index tensor), read only from their parts."""
        idx = torch.arange(len(self))[index] if isinstance(index, slice) else index.long()
        part = torch.searchsorted(self.offsets, idx, right=True) - 1
        out = torch.empty((len(idx), *self.shape[1:]), dtype=self.dtype)
        for k in part.unique().tolist():
            where = part == k
            out[where] = self.parts[k][idx[where] - self.offsets[k]]
        return out


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
