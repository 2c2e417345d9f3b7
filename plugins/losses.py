"""Reconstruction losses (MSE, normalized-pixel MSE, L1, masked Laplacian) and a uniformity term."""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import PositiveFloat
from torch import Tensor

from mae_bench import Loss, LossInputs, Params, hookimpl
from mae_bench.layers import laplacian, patch_mask_to_pixels, unpatchify


def _masked_mean(per_patch: Tensor, mask: Tensor) -> Tensor:
    """Mean of a (B, L) per-patch loss over the masked patches."""
    return (per_patch * mask).sum() / mask.sum().clamp_min(1.0)


class MSEParams(Params):
    """``norm_pix``: targets normalized per patch (mean 0, var 1), as in the MAE paper's best."""

    norm_pix: bool = False
    masked_only: bool = True


class MSELoss(Loss):
    """Mean squared error of the pixels of the masked patches."""

    name = "mse"
    Params = MSEParams

    @property
    def normalizes_target(self) -> bool:
        return self.params.norm_pix

    def __call__(self, inputs: LossInputs) -> Tensor:
        target = inputs.target
        if self.params.norm_pix:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1e-6) ** 0.5
        per_patch = ((inputs.pred - target) ** 2).mean(dim=-1)
        if not self.params.masked_only:
            return per_patch.mean()
        return _masked_mean(per_patch, inputs.mask)

    def summary(self) -> str:
        return "mse(norm_pix)" if self.params.norm_pix else "mse"


class L1Params(Params):
    """``masked_only``: average over masked patches only (default) or all patches."""

    masked_only: bool = True


class L1Loss(Loss):
    """Mean absolute error of the pixels of the masked patches."""

    name = "l1"
    Params = L1Params

    def __call__(self, inputs: LossInputs) -> Tensor:
        per_patch = (inputs.pred - inputs.target).abs().mean(dim=-1)
        if not self.params.masked_only:
            return per_patch.mean()
        return _masked_mean(per_patch, inputs.mask)


class LaplacianParams(Params):
    """Distance between Laplacian-filtered images: squared (``l2``) or absolute (``l1``)."""

    distance: Literal["l1", "l2"] = "l2"


class LaplacianLoss(Loss):
    """Masked high-frequency loss: Laplacian of the reconstruction vs of the target image."""

    name = "laplacian"
    Params = LaplacianParams

    def __call__(self, inputs: LossInputs) -> Tensor:
        channels = inputs.imgs.shape[1]
        recon = unpatchify(inputs.pred, inputs.patch_size, channels)
        diff = laplacian(recon) - laplacian(inputs.imgs)
        err = diff.abs() if self.params.distance == "l1" else diff**2
        pixel_mask = patch_mask_to_pixels(inputs.mask, inputs.patch_size)
        return (err * pixel_mask).sum() / (pixel_mask.sum() * channels).clamp_min(1.0)


class UniformityParams(Params):
    """``t``: temperature of the Gaussian potential (Wang & Isola use 2)."""

    t: PositiveFloat = 2.0


class UniformityLoss(Loss):
    """Wang & Isola's uniformity: log mean exp(-t ||z_i - z_j||^2) of normalized embeddings."""

    name = "uniformity"
    Params = UniformityParams

    def __call__(self, inputs: LossInputs) -> Tensor:
        z = F.normalize(inputs.embedding.float(), dim=-1)
        if len(z) < 2:
            return z.new_zeros(())
        sq_dist = torch.pdist(z, p=2).pow(2)
        return torch.logsumexp(-self.params.t * sq_dist, dim=0) - math.log(sq_dist.numel())


@hookimpl
def register_losses(register):
    register(MSELoss)
    register(L1Loss)
    register(LaplacianLoss)
    register(UniformityLoss)
