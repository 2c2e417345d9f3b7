"""Reconstruction losses (MSE, normalized-pixel MSE, L1, masked Laplacian) and a uniformity term."""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import PositiveFloat
from torch import Tensor

from mae_bench import Loss, LossInputs, Params, hookimpl
from mae_bench.contract import Pool
from mae_bench.distributed import gather_batch
from mae_bench.layers import (
    denormalize_patches,
    masked_laplacian_error,
    normalize_patches,
    patch_mask_to_pixels,
    unpatchify,
)


def _masked_mean(per_patch: Tensor, mask: Tensor) -> Tensor:
    """Mean of a (B, L) per-patch loss over the masked patches."""
    return (per_patch * mask).sum() / mask.sum().clamp_min(1.0)


def _patch_mean(per_patch: Tensor, inputs: LossInputs, masked_only: bool) -> Tensor:
    """Mean of a (B, L) per-patch loss over the masked (and predicted) patches, or with
    ``masked_only`` false over every patch with a prediction (all, unless the model
    predicted only some: ``LossInputs.partial``)."""
    if masked_only or inputs.partial:
        return _masked_mean(per_patch, inputs.mask)
    return per_patch.mean()


class MSEParams(Params):
    """``norm_pix``: targets normalized per patch (mean 0, var 1), as in the MAE paper's best."""

    norm_pix: bool = False
    masked_only: bool = True


class MSELoss(Loss):
    """Mean squared error of the pixels of the masked patches."""

    name = "mse"
    Params = MSEParams

    @property
    def prediction_space(self) -> str:
        return "norm_pix" if self.params.norm_pix else "pixels"

    def to_input_space(self, pred: Tensor, target: Tensor, mask: Tensor) -> Tensor:
        """With ``norm_pix``, a visible patch is de-normalised with its own statistics and a
        masked patch with the image's average visible-patch mean and std: statistics the
        model could know. The masked patches' own statistics are never used."""
        if not self.params.norm_pix:
            return pred
        return denormalize_patches(pred, target, mask)

    def __call__(self, inputs: LossInputs) -> Tensor:
        target = inputs.target
        if self.params.norm_pix:
            target = normalize_patches(target)
        per_patch = ((inputs.pred - target) ** 2).mean(dim=-1)
        return _patch_mean(per_patch, inputs, self.params.masked_only)

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
        return _patch_mean(per_patch, inputs, self.params.masked_only)


class LaplacianParams(Params):
    """Distance between Laplacian-filtered images: squared (``l2``) or absolute (``l1``)."""

    distance: Literal["l1", "l2"] = "l2"


class LaplacianLoss(Loss):
    """Masked high-frequency loss: Laplacian of the reconstruction vs of the target image.

    The reconstruction is the prediction on masked patches and the input on visible ones
    (the definition of the ``hf_error`` metric), so only masked predictions get gradients.
    Predictions are pixels: combining it with ``mse(norm_pix)`` is refused at validation.
    """

    name = "laplacian"
    Params = LaplacianParams
    reads_images = True  # unpatchifies pred: pixel targets only

    def __call__(self, inputs: LossInputs) -> Tensor:
        recon = unpatchify(inputs.pred, inputs.patch_size, inputs.imgs.shape[1])
        pixel_mask = patch_mask_to_pixels(inputs.mask, inputs.patch_size)
        squared = self.params.distance == "l2"
        per_image = masked_laplacian_error(recon, inputs.imgs, pixel_mask, squared=squared)
        weights = pixel_mask.sum(dim=(1, 2, 3))  # every masked pixel counts once
        return (per_image * weights).sum() / weights.sum().clamp_min(1.0)

    def summary(self) -> str:
        return "laplacian" if self.params.distance == "l2" else "laplacian(l1)"


class UniformityParams(Params):
    """``t``: temperature of the Gaussian potential (Wang & Isola use 2); ``pool``: which
    embedding it spreads (``mean`` of the patch tokens, as the probes read it, or ``cls``)."""

    t: PositiveFloat = 2.0
    pool: Pool = "mean"


class UniformityLoss(Loss):
    """Wang & Isola's uniformity: log mean exp(-t ||z_i - z_j||^2) of normalized embeddings.

    Its pairs are those of the step's whole (micro-)batch: data-parallel ranks gather their
    embeddings (:func:`~mae_bench.distributed.gather_batch`), so the objective and its
    gradient do not depend on the number of processes."""

    name = "uniformity"
    Params = UniformityParams
    depends_on_batch = True  # pairs of the batch it sees: the micro-batch is in its key

    @property
    def prediction_space(self) -> None:
        return None  # reads the embedding only

    def __call__(self, inputs: LossInputs) -> Tensor:
        z = gather_batch(F.normalize(inputs.embedding(self.params.pool).float(), dim=-1))
        if len(z) < 2:
            return z.new_zeros(())
        sq_dist = torch.pdist(z, p=2).pow(2)
        return torch.logsumexp(-self.params.t * sq_dist, dim=0) - math.log(sq_dist.numel())

    def summary(self) -> str:
        return f"uniformity({self.params.pool})"


@hookimpl
def register_losses(register):
    register(MSELoss)
    register(L1Loss)
    register(LaplacianLoss)
    register(UniformityLoss)
