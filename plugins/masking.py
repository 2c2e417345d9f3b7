"""Masking strategies: uniform random (the MAE paper) and a curriculum over the mask ratio."""

from __future__ import annotations

import math
from typing import Annotated, Literal

from pydantic import Field, model_validator

from mae_bench import MaskingStrategy, Params, hookimpl

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


@hookimpl
def register_masking(register):
    register(RandomMasking)
    register(CurriculumMasking)
