"""The ``hog`` target: per-patch histograms of oriented gradients, what MaskFeat (Wei et al.,
2022, "Masked Feature Prediction for Self-Supervised Visual Pre-Training") predicts for
each masked patch instead of its pixels.

Computed in torch on the batch's device, as scikit-image's ``skimage.feature.hog``
(Dalal & Triggs) computes it for each channel, with one block per patch:

1. gradients of each channel of the whole image by centred differences ``[-1, 0, 1]``,
   zero on the image's first and last rows (vertical) and columns (horizontal);
2. each pixel votes its gradient magnitude into one of ``orientations`` unsigned bins
   (0-180 degrees, bin ``i`` holds ``[i, i + 1) * 180 / orientations``, no interpolation);
   a cell's histogram is the mean vote over its ``cell_size`` x ``cell_size`` pixels;
3. the ``(p / cell_size)^2`` cell histograms of a patch, per channel, are concatenated and
   L2-normalised, ``v / sqrt(|v|^2 + 1e-10)`` (scikit-image's ``block_norm="L2"`` with a
   block of ``p / cell_size`` cells, which is the patch);
4. the channels are concatenated: ``dim = C * (p / cell_size)^2 * orientations``, laid out
   ``(channel, cell row, cell column, orientation)``.

As in MaskFeat, the gradients are those of the whole image (a patch's border pixels see
their neighbours in the adjacent patches), pooled into cells per patch, and each RGB
channel has its own histograms. The public MaskFeat code (SlowFast's ``HOGLayerC``) differs
in details this module does not copy: Sobel filters with reflect padding instead of centred
differences, an optional Gaussian window on the magnitudes, and L2 normalisation per cell;
the paper normalises per block, which here is the patch (MaskFeat's 16-pixel patches hold
2 x 2 cells of 8 pixels; the default ``cell_size`` keeps that geometry).

Images arrive normalised with the dataset's per-channel mean and std. A per-channel affine
map ``a * x + b`` (a > 0) leaves the orientations unchanged and scales the magnitudes of that
channel by ``a``; the per-channel L2 normalisation removes the scale, so the target is the
HOG of the stored pixels, up to the 1e-5 in the norm (a flat patch has an all-zero target).
"""

from __future__ import annotations

from typing import Annotated

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from mae_bench import Mask, MaskedAutoencoder, Metric, Params, Target, hookimpl

EPS = 1e-5  # scikit-image's block-normalisation epsilon: v / sqrt(|v|^2 + EPS^2)


def hog_cells(imgs: Tensor, orientations: int, cell_size: int) -> Tensor:
    """Per-channel histograms of oriented gradients of every cell, (B, C, H/c, W/c, bins):
    centred-difference gradients of the whole image (zero on its border rows/columns),
    hard votes of the magnitude into unsigned orientation bins, averaged per cell."""
    x = imgs if imgs.dtype == torch.float64 else imgs.float()  # (B, C, H, W)
    gy, gx = torch.zeros_like(x), torch.zeros_like(x)
    gy[..., 1:-1, :] = x[..., 2:, :] - x[..., :-2, :]  # down the rows
    gx[..., :, 1:-1] = x[..., :, 2:] - x[..., :, :-2]  # along the columns
    magnitude = torch.hypot(gx, gy)
    angle = torch.rad2deg(torch.atan2(gy, gx)) % 180  # unsigned, [0, 180]
    # 180 (a rounded angle just below it) belongs to the last bin
    bins = torch.div(angle, 180 / orientations, rounding_mode="floor").clamp_(max=orientations - 1)
    cells = [  # each (B, C, H/c, W/c): mean vote of a cell's pixels into one bin
        F.avg_pool2d(torch.where(bins == i, magnitude, 0.0), cell_size) for i in range(orientations)
    ]
    return torch.stack(cells, dim=-1)


def hog_patches(imgs: Tensor, patch_size: int, orientations: int, cell_size: int) -> Tensor:
    """HOG target of every patch, (B, L, C * (p/c)^2 * bins), patches in row-major order:
    the cell histograms of :func:`hog_cells`, L2-normalised per patch and channel."""
    hist = hog_cells(imgs, orientations, cell_size)  # (B, C, H/c, W/c, n)
    b, c, rows, cols, n = hist.shape
    k = patch_size // cell_size  # cells per patch side
    h, w = rows // k, cols // k  # the patch grid
    hist = hist.reshape(b, c, h, k, w, k, n).permute(0, 2, 4, 1, 3, 5, 6)  # (B, h, w, C, k, k, n)
    hist = hist.reshape(b, h * w, c, k * k * n)  # (B, L, C, cells * bins)
    hist = hist / (hist.square().sum(dim=-1, keepdim=True) + EPS**2).sqrt()
    return hist.flatten(2)  # (B, L, C * k * k * n)


class HOGParams(Params):
    """``orientations``: unsigned orientation bins over 0-180 degrees (MaskFeat: 9).
    ``cell_size``: pixels per cell side, a divisor of the encoder's patch size; by default
    half the patch (MaskFeat's 2 x 2 cells per patch), the whole patch when its side is odd."""

    orientations: Annotated[int, Field(ge=1, le=180)] = 9
    cell_size: Annotated[int, Field(ge=1)] | None = None


class HOGTarget(Target):
    """MaskFeat's target: per-patch, per-channel L2-normalised histograms of oriented
    gradients of the whole image (see the module docstring for the exact definition)."""

    name = "hog"
    Params = HOGParams

    def summary(self) -> str:
        p = self.params
        cells = "" if p.cell_size is None else f",c{p.cell_size}"
        return f"hog({p.orientations}{cells})"

    def cell_size(self, model: MaskedAutoencoder) -> int:
        """Pixels per cell side for ``model``'s patches; ``ValueError`` naming ``cell_size``
        when it does not divide the patch size."""
        p, c = model.patch_size, self.params.cell_size
        if c is None:
            return p // 2 if p % 2 == 0 else p
        if p % c:
            raise ValueError(
                f"target 'hog': cell_size {c} does not divide the encoder's patch_size {p}; "
                f"use a divisor of {p} (cells tile each patch)"
            )
        return c

    def dim(self, model: MaskedAutoencoder) -> int:
        k = model.patch_size // self.cell_size(model)
        return model.in_chans * k * k * self.params.orientations

    def setup(self, model: MaskedAutoencoder) -> None:
        self.cell_size(model)  # refuse a cell size that does not tile the patches

    def __call__(self, imgs: Tensor, mask: Mask, model: MaskedAutoencoder) -> Tensor:
        return hog_patches(
            imgs, model.patch_size, self.params.orientations, self.cell_size(model)
        )  # (B, L, C * (p/c)^2 * orientations)

    def metrics(self) -> dict[str, Metric]:
        return {
            "hog_error": Metric(
                "mean squared error of the predicted HOG histograms of the masked patches "
                "(held-out images, the reconstruction evaluator's masks)",
                higher_is_better=False,
                fmt="{:.4f}",
                headline=True,
                bounds=(0, None),
            )
        }

    def reconstruction_metrics(
        self, pred: Tensor, target: Tensor, mask: Tensor
    ) -> dict[str, float]:
        per_patch = (pred.double() - target.double()).square().mean(dim=-1)  # (B, L)
        masked = mask.double()
        return {"hog_error": float((per_patch * masked).sum() / masked.sum())}


@hookimpl
def register_targets(register):
    register(HOGTarget)
