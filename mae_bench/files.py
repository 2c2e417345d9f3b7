"""Helpers for dataset plugins that read files: clear errors and memory-mapped images."""

from __future__ import annotations

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
