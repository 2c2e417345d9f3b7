"""File helpers for the core and for plugins: clear errors, memory-mapped images, and the
permissions of files made through ``tempfile``."""

from __future__ import annotations

import os
from pathlib import Path

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


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def grant_umask(path: Path | str, folder: bool = False) -> None:
    """Give a file made by ``mkstemp`` (0600) or a folder made by ``mkdtemp`` (0700) the
    permissions a plain ``open``/``mkdir`` would have under the current umask, so results
    on a shared filesystem are readable by the team as the umask intends."""
    os.chmod(path, (0o777 if folder else 0o666) & ~_umask())
