"""Reconstruction quality of a pretrained cell: PSNR and high-frequency error on held-out
images, with a fixed-seed stratified sample and fixed-seed masks shared by every variant (or
each variant's own); and a picture of each variant's own masks on a few images."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated, Any, Literal

import pandas as pd
import torch
import torch.nn.functional as F
from pydantic import Field, PositiveInt
from torch import Tensor

from mae_bench import (
    EvalContext,
    EvalResult,
    Evaluator,
    Loss,
    MaskedAutoencoder,
    MaskingStrategy,
    Metric,
    Params,
    TablePlot,
    Target,
    hookimpl,
)
from mae_bench.contract import Feeder, Mask, Seed
from mae_bench.data import ImageFeeder, index_batches
from mae_bench.device import autocast
from mae_bench.evaluate import evaluation_masks, evaluation_sample, fixed_masks, reconstruct
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


def _masked_batches(
    images: Tensor, feeder: ImageFeeder, masks: Mask, batch_size: int
) -> Iterator[tuple[Tensor, Mask]]:
    """``images`` in batches of model input on the feeder's device, each with its masks."""
    for idx in index_batches(len(images), batch_size):
        x = feeder(images[idx])
        parts = (masks.ids_keep, masks.ids_restore, masks.mask)
        yield x, Mask(*(t[idx].to(x.device) for t in parts))


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
    target: Target | None = None,
) -> dict[str, float]:
    """Reconstruction quality on held-out images, pixels in [0, 1], means over images.

    ``images`` are the evaluation sample (:func:`evaluation_sample`), masked with
    :func:`fixed_masks`: the same for every variant. ``psnr_masked``: PSNR over the masked
    patches. ``psnr_full``: PSNR of the raw prediction of every patch, visible ones included.
    ``hf_error``: :func:`mae_bench.layers.masked_laplacian_error` (the ``laplacian`` loss's
    definition) of the reconstruction, in pixels.

    ``decoder_loss`` maps predictions back to the input (``Loss.to_input_space``): for
    ``mse(norm_pix)`` a masked patch is de-normalised with the image's visible-patch
    statistics, never with its own; a pixel ``target`` (``norm_pix``) maps them instead.
    ``mean_image`` ([0, 1], C x H x W) gives the PSNR of
    predicting the mean training image, a floor every useful model must clear.
    """
    model.eval()
    if masks is None:
        masks = fixed_masks(len(images), model.num_patches, cfg.mask_ratio, cfg.mask_seed)
    p = model.patch_size
    psnr_model, psnr_mean, psnr_full, hf_error = [], [], [], []
    for x, mask in _masked_batches(images, feeder, masks, cfg.batch_size):
        recon = feeder.to_pixels(reconstruct(model, x, mask, decoder_loss, target))
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


@torch.no_grad()
def target_quality(
    model: MaskedAutoencoder,
    images: Tensor,
    feeder: ImageFeeder,
    cfg: ReconstructionParams,
    target: Target,
    masks: Mask,
) -> dict[str, float]:
    """A target's own measure of the held-out reconstruction (``Target.reconstruction_metrics``)
    for predictions that are not pixels (HOG histograms, a teacher's features), on the same
    images and masks as :func:`reconstruction_quality`; {} when it declares none."""
    if not target.metrics():
        return {}
    model.eval()
    preds, targets = [], []
    for x, mask in _masked_batches(images, feeder, masks, cfg.batch_size):
        with autocast(x.device):
            preds.append(model(x, mask).pred.float().cpu())
        targets.append(target(x, mask, model).float().cpu())
    return target.reconstruction_metrics(torch.cat(preds), torch.cat(targets), masks.mask.cpu())


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


MASK_PICTURE_IMAGES = 4
"""Images in each variant's picture of its masks."""
MASK_PICTURE_SIDE = 64
"""The pictures' images are stored at most this many pixels a side (averaged down)."""


def mask_picture_tables(
    model: MaskedAutoencoder,
    labels: Tensor,
    images: Any,
    feeder: Feeder,
    masking: MaskingStrategy,
    seed: int,
) -> dict[str, pd.DataFrame]:
    """What the picture of a variant's masks is drawn from: ``masks`` (per ``image``,
    ``progress``, ``ratio`` and row-major ``patch`` with its ``row`` and ``col``: ``masked``,
    1 = hidden) with ``masking`` drawn from ``seed`` at the end of pretraining (progress 1)
    and, for a schedule such as a curriculum, its start (progress 0); and ``mask_images``
    (per ``image``, pixel ``y`` and ``x``: channels ``c0``... in [0, 1]), the first
    :data:`MASK_PICTURE_IMAGES` of the fixed-seed stratified sample, as the model sees them."""
    sample = evaluation_sample(labels, MASK_PICTURE_IMAGES, seed)
    rows, cols = model.grid
    progresses = [0.0, 1.0] if masking.ratio_at(0.0) != masking.ratio_at(1.0) else [1.0]
    frames = []
    for progress in progresses:
        masks = evaluation_masks(
            model,
            len(sample),
            ratio=masking.ratio_at(progress),
            seed=seed,
            masking=masking,
            progress=progress,
        )
        hidden = masks.mask.cpu().reshape(-1).to(torch.int64)
        patch = torch.arange(rows * cols).repeat(len(sample))
        frames.append(
            pd.DataFrame(
                {"image": torch.arange(len(sample)).repeat_interleave(rows * cols),
                 "progress": progress, "ratio": masking.ratio_at(progress),
                 "patch": patch, "row": patch // cols, "col": patch % cols, "masked": hidden}
            )
        )  # fmt: skip
    pixels = feeder.to_pixels(feeder(images[sample])).float().cpu()
    height, width = pixels.shape[-2:]
    side = (min(height, MASK_PICTURE_SIDE), min(width, MASK_PICTURE_SIDE))
    pixels = F.adaptive_avg_pool2d(pixels, side).clamp(0, 1)
    n, channels, height, width = pixels.shape
    y, x = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    image = pd.DataFrame(
        {"image": torch.arange(n).repeat_interleave(height * width),
         "y": y.reshape(-1).repeat(n), "x": x.reshape(-1).repeat(n)}
    )  # fmt: skip
    for c in range(channels):
        image[f"c{c}"] = pixels[:, c].reshape(-1).numpy().round(3)
    return {"masks": pd.concat(frames, ignore_index=True), "mask_images": image}


class VariantMasks(TablePlot):
    """Each variant's own masks on the same few test images, masked patches greyed out: a
    row per variant at the end of pretraining, and at its start for a schedule."""

    name = "variant_masks"
    table = "masks"
    also = ("mask_images",)
    title = "Each variant's masks (grey: masked patches)"

    def figure(self, tables: dict[str, pd.DataFrame], **also: dict[str, pd.DataFrame]) -> Any:
        import matplotlib.pyplot as plt

        pictures = also["mask_images"]
        rows = [
            (variant, progress, masks[masks["progress"] == progress])
            for variant, masks in tables.items()
            if variant in pictures
            for progress in sorted(set(masks["progress"]), reverse=True)
        ]
        if not rows:
            return None
        n_images = max(int(masks["image"].max()) + 1 for _, _, masks in rows)
        fig, axes = plt.subplots(
            len(rows), n_images, figsize=(1.3 * n_images + 1.5, 1.35 * len(rows) + 0.4),
            squeeze=False,
        )  # fmt: skip
        for axes_row, (variant, progress, masks) in zip(axes, rows, strict=True):
            images = pictures[variant]
            for image, ax in enumerate(axes_row):
                ax.set_xticks([])
                ax.set_yticks([])
                self._draw_one(ax, images[images["image"] == image],
                               masks[masks["image"] == image])  # fmt: skip
            label = f"{variant}\n{float(masks['ratio'].iloc[0]):.0%} masked"
            if tables[variant]["progress"].nunique() > 1:  # a schedule: say which end
                label += " (start)" if progress == 0 else " (end)"
            axes_row[0].set_ylabel(label, rotation=0, ha="right", va="center", fontsize=8)
        fig.suptitle(self.title, fontsize=9)
        return fig

    @staticmethod
    def _draw_one(ax: Any, image: pd.DataFrame, masks: pd.DataFrame) -> None:
        """One image, its masked patches greyed out (drawn in patch coordinates)."""
        if image.empty or masks.empty:
            ax.set_axis_off()
            return
        height, width = int(image["y"].max()) + 1, int(image["x"].max()) + 1
        channels = sorted(c for c in image.columns if c.startswith("c") and c[1:].isdigit())
        pixels = image.sort_values(["y", "x"])[channels].to_numpy().reshape(height, width, -1)
        rows, cols = int(masks["row"].max()) + 1, int(masks["col"].max()) + 1
        grid = masks.sort_values(["row", "col"])["masked"].to_numpy().reshape(rows, cols)
        extent = (0, cols, rows, 0)
        shown = pixels[..., 0] if pixels.shape[-1] == 1 else pixels[..., :3]
        ax.imshow(shown, cmap="gray", vmin=0, vmax=1, extent=extent, interpolation="nearest")
        overlay = [[(0.55, 0.55, 0.55, 0.9 if m else 0.0) for m in line] for line in grid]
        ax.imshow(overlay, extent=extent, interpolation="nearest")


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
        own = ctx.masking if p.masks == "variant" else None
        masks = evaluation_masks(
            ctx.model, len(sample), ratio=p.mask_ratio, seed=p.mask_seed, masking=own
        )
        images, target = ctx.data.test_images[sample], ctx.target
        if target is not None and not target.predicts_pixels:  # no PSNR: the target's own
            scores = target_quality(ctx.model, images, ctx.feeder, p, target, masks)
            note = f"predictions are {target.summary()} targets, not pixels: no PSNR" + (
                "" if scores else " (the target reports no reconstruction metric)"
            )
            sanity = {"n_images": len(sample), "masks": p.masks, "warnings": [], "note": note}
        else:
            scores = reconstruction_quality(
                ctx.model, images, ctx.feeder, p, decoder_loss=ctx.decoder_loss,
                mean_image=ctx.mean_image, masks=masks, target=target,
            )  # fmt: skip
            sanity = reconstruction_sanity(scores, len(sample), p.masks)
            if target is not None:  # a pixel target's own measure too, if it has one
                scores.update(target_quality(ctx.model, images, ctx.feeder, p, target, masks))
        tables = {}
        if ctx.masking is not None:  # after the model ran (a read-back ends a dry run here)
            tables = mask_picture_tables(ctx.model, ctx.data.test_labels, ctx.data.test_images,
                                         ctx.feeder, ctx.masking, p.mask_seed)  # fmt: skip
        return EvalResult(scores, tables, sanity=sanity)

    def plots(self) -> list[TablePlot]:
        return [VariantMasks()]


@hookimpl
def register_evaluators(register):
    register(ReconstructionEvaluator)
