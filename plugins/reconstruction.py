"""Reconstruction quality of a pretrained cell: PSNR and high-frequency error on held-out
images, with a fixed-seed stratified sample and fixed-seed masks shared by every variant."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import torch
from pydantic import Field, PositiveInt
from torch import Tensor

from mae_bench import (
    EvalContext,
    EvalResult,
    Evaluator,
    Loss,
    MaskedAutoencoder,
    Metric,
    Params,
    hookimpl,
)
from mae_bench.contract import Mask, Seed, call_masking
from mae_bench.data import ImageFeeder, index_batches
from mae_bench.evaluate import evaluation_sample, fixed_masks, reconstruct
from mae_bench.layers import masked_laplacian_error, patch_mask_to_pixels


class ReconstructionParams(Params):
    """PSNR of held-out reconstructions on ``num_images`` (a stratified sample). ``masks``:
    ``random`` (default) masks a uniformly random ``mask_ratio`` drawn from ``mask_seed``,
    the same masks for every variant; ``variant`` uses each variant's own masking strategy
    (at the end of its schedule), drawn from the same seed."""

    num_images: PositiveInt = 512
    masks: Literal["random", "variant"] = "random"
    mask_ratio: Annotated[float, Field(gt=0, lt=1)] = 0.75
    mask_seed: Seed = 0
    batch_size: PositiveInt = 256


def _psnr(mse: Tensor) -> Tensor:
    return 10.0 * torch.log10(1.0 / mse.clamp_min(1e-10))


@torch.no_grad()
def reconstruction_quality(
    model: MaskedAutoencoder,
    images: Tensor,
    feeder: ImageFeeder,
    cfg: ReconstructionParams,
    *,
    decoder_loss: Loss | None,
    mean_image: Tensor,
    masks: Mask | None = None,
) -> dict[str, float]:
    """Reconstruction quality on held-out images, pixels in [0, 1], means over images.

    ``images`` are the evaluation sample (:func:`evaluation_sample`), masked with
    :func:`fixed_masks`: the same for every variant. ``psnr_masked``: PSNR over the masked
    patches. ``psnr_full``: PSNR of the raw prediction of every patch, visible ones included.
    ``hf_error``: :func:`mae_bench.layers.masked_laplacian_error` (the ``laplacian`` loss's
    definition) of the reconstruction, in pixels.

    ``decoder_loss`` maps predictions back to the input (``Loss.to_input_space``): for
    ``mse(norm_pix)`` a masked patch is de-normalised with the image's visible-patch
    statistics, never with its own. ``mean_image`` ([0, 1], C x H x W) gives the PSNR of
    predicting the mean training image, a floor every useful model must clear.
    """
    model.eval()
    if masks is None:
        masks = fixed_masks(len(images), model.num_patches, cfg.mask_ratio, cfg.mask_seed)
    p = model.patch_size
    psnr_model, psnr_mean, psnr_full, hf_error = [], [], [], []
    for idx in index_batches(len(images), cfg.batch_size):
        x = feeder(images[idx])
        mask = Mask(*(t[idx].to(x.device) for t in (masks.ids_keep, masks.ids_restore, masks.mask)))
        recon = feeder.to_pixels(reconstruct(model, x, mask, decoder_loss))
        truth = feeder.to_pixels(x)
        pixel_mask = patch_mask_to_pixels(mask.mask, p)
        denom = pixel_mask.sum(dim=(1, 2, 3)) * x.shape[1]
        for guess, out in ((recon, psnr_model), (mean_image.to(x.device)[None], psnr_mean)):
            mse = (((guess - truth) ** 2) * pixel_mask).sum(dim=(1, 2, 3)) / denom
            out.append(_psnr(mse).cpu())
        psnr_full.append(_psnr(((recon - truth) ** 2).mean(dim=(1, 2, 3))).cpu())
        hf_error.append(masked_laplacian_error(recon, truth, pixel_mask).cpu())
    return {
        "psnr_masked": torch.cat(psnr_model).mean().item(),
        "psnr_full": torch.cat(psnr_full).mean().item(),
        "hf_error": torch.cat(hf_error).mean().item(),
        "psnr_mean_image": torch.cat(psnr_mean).mean().item(),
    }


def reconstruction_sanity(scores: dict[str, float], n_images: int, masks: str) -> dict[str, Any]:
    """What says how far the reconstruction figures can be trusted, for the result's
    ``sanity``: the sample size, which masks, and a warning when ``psnr_masked`` is below
    its floor ``psnr_mean_image`` (predicting the mean training image does better)."""
    warnings = []
    if scores["psnr_masked"] < scores["psnr_mean_image"]:
        warnings.append(
            f"psnr_masked {scores['psnr_masked']:.2f} dB is below psnr_mean_image "
            f"{scores['psnr_mean_image']:.2f} dB: predicting the mean training image "
            "reconstructs the masked patches better than this model"
        )
    return {"n_images": n_images, "masks": masks, "warnings": warnings}


class ReconstructionEvaluator(Evaluator):
    """PSNR over masked patches and full images, and the masked high-frequency error."""

    name = "reconstruction"
    Params = ReconstructionParams
    enabled_by_default = True
    needs_pretraining = True

    def metrics(self) -> dict[str, Metric]:
        return {
            "psnr_masked": Metric("PSNR (dB) over the masked patches", fmt="{:.2f}", headline=True),
            "psnr_full": Metric(
                "PSNR (dB) of the raw prediction of every patch", fmt="{:.2f}", headline=True
            ),
            "hf_error": Metric(
                "Laplacian (high-frequency) error over masked pixels",
                higher_is_better=False,
                fmt="{:.4f}",
                headline=True,
                bounds=(0, None),
            ),
            "psnr_mean_image": Metric(
                "PSNR (dB) of predicting the mean training image: a floor, not compared",
                fmt="{:.2f}",
                compare=False,
            ),
        }

    def evaluate(self, ctx: EvalContext) -> EvalResult:
        p = self.params
        sample = evaluation_sample(ctx.data.test_labels, p.num_images, p.mask_seed)
        masks = None
        if p.masks == "variant" and ctx.masking is not None:
            generator = torch.Generator().manual_seed(p.mask_seed)
            masks = call_masking(
                ctx.masking,
                len(sample),
                ctx.model.grid,
                progress=1.0,
                generator=generator,
                device=None,
            )
            masks.validate(len(sample), ctx.model.num_patches)
        scores = reconstruction_quality(
            ctx.model, ctx.data.test_images[sample], ctx.feeder, p,
            decoder_loss=ctx.decoder_loss, mean_image=ctx.mean_image, masks=masks,
        )  # fmt: skip
        return EvalResult(scores, sanity=reconstruction_sanity(scores, len(sample), p.masks))


@hookimpl
def register_evaluators(register):
    register(ReconstructionEvaluator)
