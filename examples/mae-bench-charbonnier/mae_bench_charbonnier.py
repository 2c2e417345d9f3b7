"""An example third-party mae-bench plugin: the Charbonnier (smooth L1-like) loss."""

from __future__ import annotations

from pydantic import PositiveFloat
from torch import Tensor

from mae_bench import Loss, LossInputs, Params, hookimpl


class CharbonnierParams(Params):
    """``eps``: below this error the loss is quadratic, above it roughly linear."""

    eps: PositiveFloat = 1e-3


class CharbonnierLoss(Loss):
    """Charbonnier loss sqrt((pred - target)^2 + eps^2) over the masked patches."""

    name = "charbonnier"
    Params = CharbonnierParams

    def __call__(self, inputs: LossInputs) -> Tensor:
        err = ((inputs.pred - inputs.target) ** 2 + self.params.eps**2).sqrt()
        per_patch = err.mean(dim=-1)
        return (per_patch * inputs.mask).sum() / inputs.mask.sum().clamp_min(1.0)


@hookimpl
def register_losses(register):
    register(CharbonnierLoss)
