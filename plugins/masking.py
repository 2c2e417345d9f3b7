"""Masking strategies: uniform random (the MAE paper), a curriculum over the mask ratio, and
the paper's other samplings: BEiT-style blocks and a regular grid (MAE paper, Fig. 6)."""

from __future__ import annotations

import math
from typing import Annotated, Literal

import numpy as np
import torch
from pydantic import Field, model_validator

from mae_bench import Mask, MaskingStrategy, Params, hookimpl

Ratio = Annotated[float, Field(gt=0, lt=1)]


class RandomParams(Params):
    """Fraction of patches to hide, in (0, 1)."""

    ratio: Ratio = 0.75


class RandomMasking(MaskingStrategy):
    """Per-sample uniform masking of exactly ``ratio`` of the patches (argsort of noise)."""

    name = "random"
    Params = RandomParams

    def ratio_at(self, progress: float) -> float:
        return self.params.ratio

    def summary(self) -> str:
        return f"random({self.params.ratio:g})"


class CurriculumParams(Params):
    """Mask ratio scheduled from ``start`` to ``end``, reached at fraction ``until`` of training."""

    start: Ratio = 0.5
    end: Ratio = 0.75
    schedule: Literal["linear", "cosine"] = "linear"
    until: Annotated[float, Field(gt=0, le=1)] = 1.0

    @model_validator(mode="after")
    def _distinct(self) -> CurriculumParams:
        if self.start == self.end:
            raise ValueError("start and end are equal: use `random` masking instead")
        return self


class CurriculumMasking(MaskingStrategy):
    """Random masking whose ratio follows a linear or cosine schedule over pretraining."""

    name = "curriculum"
    Params = CurriculumParams

    def ratio_at(self, progress: float) -> float:
        p = self.params
        t = min(max(progress / p.until, 0.0), 1.0)
        if p.schedule == "cosine":
            t = (1.0 - math.cos(math.pi * t)) / 2.0
        return p.start + (p.end - p.start) * t

    def summary(self) -> str:
        p = self.params
        return f"curriculum({p.start:g}->{p.end:g},{p.schedule})"


def mask_from_hidden(hidden: torch.Tensor, device: torch.device | str | None) -> Mask:
    """The :class:`Mask` of a (B, L) boolean ``hidden`` (True = masked, the same count in
    every row), built as ``random_mask`` builds it; visible patches in patch order."""
    num_patches = hidden.shape[1]  # L
    len_keep = num_patches - int(hidden[0].sum())  # K
    ids_shuffle = torch.argsort(hidden.to(torch.uint8), dim=1, stable=True)  # (B, L): visible first
    ids_restore = torch.argsort(ids_shuffle, dim=1)  # (B, L): the inverse permutation
    ids_keep = ids_shuffle[:, :len_keep]  # (B, K)
    mask = hidden.float()  # (B, L) in patch order: 0 keep, 1 masked
    return Mask(ids_keep.to(device), ids_restore.to(device), mask.to(device))


class _Uniforms:
    """Uniform draws in [0, 1) from a torch generator, fetched in chunks (fast in Python
    loops, and the same sequence for the same generator state)."""

    def __init__(self, generator: torch.Generator | None, chunk: int) -> None:
        self.generator, self.chunk = generator, max(chunk, 64)
        self.values: list[float] = []

    def __call__(self) -> float:
        if not self.values:
            drawn = torch.rand(self.chunk, generator=self.generator, dtype=torch.float64)
            self.values = drawn.tolist()[::-1]
        return self.values.pop()

    def integer(self, low: int, high: int) -> int:
        """An integer in [low, high], both included."""
        return low + min(int(self() * (high - low + 1)), high - low)


class BlockParams(Params):
    """Fraction of patches to hide; the smallest rectangle drawn (in patches), and the
    smallest aspect ratio (height / width, log-uniform in [aspect, 1 / aspect])."""

    ratio: Ratio = 0.75
    min_patches: Annotated[int, Field(ge=1)] = 4
    aspect: Annotated[float, Field(gt=0, le=1)] = 0.3


class BlockMasking(MaskingStrategy):
    """Block-wise masking as in BEiT (Bao et al. 2021): rectangles of random area and aspect
    ratio at random places until exactly the random strategy's count is hidden.

    Each rectangle has an area drawn in [``min_patches``, patches still to hide] and an aspect
    ratio log-uniform in [``aspect``, 1 / ``aspect``]; it is kept only when it hides new
    patches without passing the count (BEiT's rule: 10 tries, then give up). Whatever is
    still missing is hidden next to the hidden region (any patch if none is hidden yet), so
    every image hides exactly ``L - int(L * (1 - ratio))`` patches, one always visible.
    """

    name = "block"
    Params = BlockParams
    attempts = 10  # rectangles tried per step, as BEiT's MaskingGenerator

    def ratio_at(self, progress: float) -> float:
        return self.params.ratio

    def summary(self) -> str:
        return f"block({self.params.ratio:g})"

    def __call__(
        self,
        batch_size: int,
        grid: tuple[int, int],
        *,
        progress: float = 1.0,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> Mask:
        """Block masks for ``batch_size`` images of a ``(rows, cols)`` patch grid, drawn on
        the CPU from ``generator``."""
        rows, cols = grid
        num_patches = rows * cols
        len_keep = max(1, int(num_patches * (1.0 - self.ratio_at(progress))))  # as random_mask
        target = num_patches - len_keep
        uniforms = _Uniforms(generator, chunk=batch_size * 16)
        hidden = np.stack([self._one(rows, cols, target, uniforms) for _ in range(batch_size)])
        return mask_from_hidden(torch.from_numpy(hidden).reshape(batch_size, -1), device)

    def _one(self, rows: int, cols: int, target: int, uniforms: _Uniforms) -> np.ndarray:
        """One (rows, cols) boolean mask with exactly ``target`` patches hidden."""
        hidden = np.zeros((rows, cols), dtype=bool)
        count = 0
        while count < target:
            added = self._rectangle(hidden, target - count, uniforms)
            if added == 0:
                break
            count += added
        while count < target:  # rectangles no longer fit: grow the hidden region
            hidden.flat[self._next_to(hidden, uniforms)] = True
            count += 1
        return hidden

    def _rectangle(self, hidden: np.ndarray, remaining: int, uniforms: _Uniforms) -> int:
        """Hide one random rectangle adding 1..``remaining`` new patches; how many it added
        (0 when ``attempts`` tries found none)."""
        rows, cols = hidden.shape
        low = min(self.params.min_patches, remaining)
        log_aspect = math.log(self.params.aspect)
        for _ in range(self.attempts):
            area = low + uniforms() * (remaining - low)
            aspect = math.exp(log_aspect + uniforms() * -2 * log_aspect)
            height = round(math.sqrt(area * aspect))
            width = round(math.sqrt(area / aspect))
            if not (0 < height < rows and 0 < width < cols):
                continue
            top, left = uniforms.integer(0, rows - height), uniforms.integer(0, cols - width)
            block = hidden[top : top + height, left : left + width]  # a view
            new = height * width - int(block.sum())
            if 0 < new <= remaining:
                block[...] = True
                return new
        return 0

    @staticmethod
    def _next_to(hidden: np.ndarray, uniforms: _Uniforms) -> int:
        """A random visible patch (flat index) 4-adjacent to a hidden one, else any visible."""
        near = np.zeros_like(hidden)
        near[1:] |= hidden[:-1]
        near[:-1] |= hidden[1:]
        near[:, 1:] |= hidden[:, :-1]
        near[:, :-1] |= hidden[:, 1:]
        candidates = np.flatnonzero(near & ~hidden)
        if candidates.size == 0:
            candidates = np.flatnonzero(~hidden)
        return int(candidates[uniforms.integer(0, candidates.size - 1)])


class GridParams(Params):
    """Side of the square cell keeping one patch (ratio ``1 - 1 / cell**2``), and where in
    the cell: ``fixed`` the top-left patch (the paper's grid), ``random`` one position per
    image drawn from the generator, the same in every cell."""

    cell: Annotated[int, Field(ge=2)] = 2
    offset: Literal["fixed", "random"] = "fixed"


class GridMasking(MaskingStrategy):
    """Regular grid sampling (MAE paper, Fig. 6): one patch kept in every ``cell`` x ``cell``
    square of patches; at ``cell`` 2, ratio 0.75. The cell must divide the patch grid."""

    name = "grid"
    Params = GridParams

    def ratio_at(self, progress: float) -> float:
        return 1.0 - 1.0 / self.params.cell**2

    def summary(self) -> str:
        shifted = ",random offset" if self.params.offset == "random" else ""
        return f"grid({self.ratio_at(1.0):g}{shifted})"

    def check_grid(self, grid: tuple[int, int]) -> None:
        cell = self.params.cell
        rows, cols = grid
        if rows % cell or cols % cell:
            raise ValueError(
                f"masking 'grid': its {cell}x{cell} cell does not divide the {rows}x{cols} "
                "patch grid; choose a cell that divides both sides"
            )

    def __call__(
        self,
        batch_size: int,
        grid: tuple[int, int],
        *,
        progress: float = 1.0,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> Mask:
        """Grid masks for ``batch_size`` images of a ``(rows, cols)`` patch grid."""
        self.check_grid(grid)
        rows, cols = grid
        cell = self.params.cell
        if self.params.offset == "random":  # (B, 2) kept row and column within the cell
            offsets = torch.randint(0, cell, (batch_size, 2), generator=generator)
        else:
            offsets = torch.zeros(batch_size, 2, dtype=torch.int64)
        row_in_cell = (torch.arange(rows) % cell).expand(batch_size, rows)  # (B, rows)
        col_in_cell = (torch.arange(cols) % cell).expand(batch_size, cols)  # (B, cols)
        kept_rows = row_in_cell == offsets[:, :1]  # (B, rows)
        kept_cols = col_in_cell == offsets[:, 1:]  # (B, cols)
        kept = kept_rows[:, :, None] & kept_cols[:, None, :]  # (B, rows, cols)
        return mask_from_hidden(~kept.reshape(batch_size, -1), device)


@hookimpl
def register_masking(register):
    register(RandomMasking)
    register(CurriculumMasking)
    register(BlockMasking)
    register(GridMasking)
