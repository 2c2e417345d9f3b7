"""Misbehaving components for fault-injection tests: one plugin module (a namespace of hook
implementations) whose encoder, masking strategy and loss each misbehave as a suite asks.

Select a fault in the suite, e.g. ``encoder: {name: faulty, fault: forward}``; with
``fault: none`` (the default) each component behaves. ``raises`` picks what a ``forward`` /
``raise`` fault raises (a plugin may raise ``SystemExit`` or ``KeyboardInterrupt`` too).

Use it in a test in one of two ways:

- ``install(folder, monkeypatch)``: an installed distribution ``mae-bench-faults`` (a
  dist-info with its entry point) on ``sys.path``, found by the CLI in this process (clear
  ``load_registry``'s cache, e.g. with the ``fresh_registry`` fixture) and, with
  ``pythonpath(folder)`` as ``PYTHONPATH``, by the installed command;
- ``registry_with(tests.fault_plugins, "faults")`` (conftest): a registry object.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Literal

import pytest
import torch
from mae_bench_plugins.mlp import MLPMAE, MLPParams
from torch import Tensor

from mae_bench import Loss, LossInputs, Mask, MaskingStrategy, Params, hookimpl

DISTRIBUTION = "mae-bench-faults"
ROOT = Path(__file__).resolve().parent.parent

Raises = Literal["RuntimeError", "ValueError", "SystemExit", "KeyboardInterrupt"]
_EXCEPTIONS: dict[str, type[BaseException]] = {
    "RuntimeError": RuntimeError,
    "ValueError": ValueError,
    "SystemExit": SystemExit,
    "KeyboardInterrupt": KeyboardInterrupt,
}


def fail(what: str, raises: str = "RuntimeError") -> None:
    """Raise the injected fault: ``raises`` with a message naming ``what``."""
    raise _EXCEPTIONS[raises](f"injected fault: {what}")


# --------------------------------------------------------------------------- encoder
class FaultyEncoderParams(MLPParams):
    """The ``mlp`` encoder's sizes, and its fault: ``init`` (the constructor raises),
    ``forward`` (every forward pass raises), ``width`` (the encoder's tokens are one
    channel narrower than ``embed_dim``)."""

    fault: Literal["none", "init", "forward", "width"] = "none"
    raises: Raises = "RuntimeError"


class FaultyEncoder(MLPMAE):
    """The ``mlp`` encoder with an injected fault."""

    name = "faulty"
    Params = FaultyEncoderParams

    def __init__(self, params: FaultyEncoderParams, *, image_size: int, in_chans: int) -> None:
        if params.fault == "init":
            fail("encoder constructor", params.raises)
        super().__init__(params, image_size=image_size, in_chans=in_chans)

    def forward_encoder(self, imgs: Tensor, ids_keep: Tensor) -> Tensor:
        if self.params.fault == "forward":
            fail("encoder forward pass", self.params.raises)
        latent = super().forward_encoder(imgs, ids_keep)
        return latent[..., :-1] if self.params.fault == "width" else latent


# --------------------------------------------------------------------------- masking
class FaultyMaskingParams(Params):
    """Uniform masking at ``ratio``, and its fault: ``raise`` (every call raises),
    ``float-ids`` (``ids_keep`` and ``ids_restore`` as float tensors), ``nan-ratio``
    (``ratio_at`` is NaN)."""

    ratio: float = 0.75
    fault: Literal["none", "raise", "float-ids", "nan-ratio"] = "none"
    raises: Raises = "RuntimeError"


class FaultyMasking(MaskingStrategy):
    """Uniform random masking with an injected fault."""

    name = "faulty"
    Params = FaultyMaskingParams

    def ratio_at(self, progress: float) -> float:
        return math.nan if self.params.fault == "nan-ratio" else self.params.ratio

    def __call__(
        self,
        batch_size: int,
        grid: tuple[int, int],
        *,
        progress: float = 1.0,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> Mask:
        if self.params.fault == "raise":
            fail("masking", self.params.raises)
        mask = super().__call__(
            batch_size, grid, progress=progress, generator=generator, device=device
        )
        if self.params.fault == "float-ids":
            return Mask(mask.ids_keep.float(), mask.ids_restore.float(), mask.mask)
        return mask


# --------------------------------------------------------------------------- loss
class FaultyLossParams(Params):
    """Mean squared error on the masked patches, and its fault: ``raise`` (every call
    raises), ``not-tensor`` (returns a Python float)."""

    fault: Literal["none", "raise", "not-tensor"] = "none"
    raises: Raises = "RuntimeError"


class FaultyLoss(Loss):
    """Masked-patch MSE with an injected fault."""

    name = "faulty"
    Params = FaultyLossParams

    def __call__(self, inputs: LossInputs) -> Any:
        if self.params.fault == "raise":
            fail("loss", self.params.raises)
        error = ((inputs.pred - inputs.target) ** 2).mean(dim=-1)
        loss = (error * inputs.mask).sum() / inputs.mask.sum().clamp(min=1)
        return 0.5 if self.params.fault == "not-tensor" else loss


# --------------------------------------------------------------------------- hooks
@hookimpl
def register_encoders(register):
    register(FaultyEncoder)


@hookimpl
def register_masking(register):
    register(FaultyMasking)


@hookimpl
def register_losses(register):
    register(FaultyLoss)


# --------------------------------------------------------------------------- installing
def write_distribution(
    folder: Path, module: str = __name__, distribution: str = DISTRIBUTION
) -> Path:
    """``folder`` holding the dist-info of ``distribution``, whose one ``mae_bench`` entry
    point is ``module`` (default: these fault plugins): on ``sys.path`` it is found as an
    installed plugin package is."""
    dist_info = folder / f"{distribution.replace('-', '_')}-0.1.dist-info"
    dist_info.mkdir(parents=True, exist_ok=True)
    (dist_info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: {distribution}\nVersion: 0.1\n", encoding="utf-8"
    )
    entry_point = module.rsplit(".", 1)[-1].replace("_", "-")
    (dist_info / "entry_points.txt").write_text(
        f"[mae_bench]\n{entry_point} = {module}\n", encoding="utf-8"
    )
    return folder


def pythonpath(folder: Path) -> str:
    """A ``PYTHONPATH`` under which the installed command finds the plugins of ``folder``."""
    return os.pathsep.join([str(folder), str(ROOT), os.environ.get("PYTHONPATH", "")])


def install(
    folder: Path,
    monkeypatch: pytest.MonkeyPatch,
    module: str = __name__,
    distribution: str = DISTRIBUTION,
) -> Path:
    """Install ``module`` (default: these fault plugins) as the plugin package
    ``distribution`` in this process until the test ends (``folder``: where its dist-info
    goes); clear ``load_registry``'s cache (``fresh_registry``) for the CLI to see it."""
    write_distribution(folder, module, distribution)
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.delenv("MAE_BENCH_PLUGINS", raising=False)
    return folder
