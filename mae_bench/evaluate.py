"""Evaluation of a pretrained cell: reconstruction PSNR and a linear probe on cached features."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mae_bench.contract import Loss, Mask, MaskedAutoencoder, Pool
from mae_bench.data import ImageFeeder, index_batches
from mae_bench.device import autocast
from mae_bench.layers import (
    masked_laplacian_error,
    patch_mask_to_pixels,
    patchify,
    random_mask,
    unpatchify,
)
from mae_bench.suite import LinearProbeConfig, ReconstructionConfig


@torch.no_grad()
def extract_features(
    model: MaskedAutoencoder, images: Tensor, feeder: ImageFeeder, pool: Pool, batch_size: int = 256
) -> Tensor:
    """Frozen encoder features (every patch visible) of uint8 ``images``, float32 on the CPU."""
    model.eval()
    chunks = []
    for idx in index_batches(len(images), batch_size):
        with autocast(feeder.device):
            chunks.append(model.forward_features(feeder(images[idx]), pool).float().cpu())
    return torch.cat(chunks)


def linear_probe(
    train_x: Tensor,
    train_y: Tensor,
    test_x: Tensor,
    test_y: Tensor,
    cfg: LinearProbeConfig,
    *,
    num_classes: int,
    seed: int,
) -> tuple[dict[str, float], Tensor]:
    """The MAE linear-probe head (BatchNorm without affine, then linear) on cached features.

    The BatchNorm normalises with batch statistics while training, and at test time with the
    exact mean and variance of all the training features (not a momentum-averaged estimate,
    which lags far behind on short probes). Returns ``{"lp_acc", "lp_train_acc"}`` and the
    test-set class probabilities (N, K).
    """
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    head = nn.Sequential(
        nn.BatchNorm1d(train_x.shape[1], affine=False, eps=1e-6),
        nn.Linear(train_x.shape[1], num_classes),
    )
    nn.init.trunc_normal_(head[1].weight, std=0.01)
    nn.init.zeros_(head[1].bias)
    optimizer = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    bs = min(cfg.batch_size, len(train_x))
    steps = cfg.epochs * math.ceil(len(train_x) / bs)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    loss_fn = nn.CrossEntropyLoss()
    head.train()
    for _ in range(cfg.epochs):
        for idx in index_batches(len(train_x), bs, generator=generator):
            if len(idx) < 2:  # BatchNorm needs two samples
                continue
            loss = loss_fn(head(train_x[idx]), train_y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    norm = head[0]
    norm.running_mean.copy_(train_x.mean(dim=0))
    norm.running_var.copy_(train_x.var(dim=0))
    head.eval()
    with torch.no_grad():
        train_acc = (head(train_x).argmax(1) == train_y).float().mean().item()
        probs = head(test_x).softmax(dim=1)
    test_acc = (probs.argmax(1) == test_y).float().mean().item()
    return {"lp_acc": test_acc, "lp_train_acc": train_acc}, probs


@torch.no_grad()
def knn_classify(
    train_x: Tensor,
    train_y: Tensor,
    test_x: Tensor,
    *,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    batch_size: int = 1024,
) -> Tensor:
    """Weighted k-NN (DINO): cosine similarity, votes weighted by exp(sim / T); probs (N, K).

    The weights are normalised over the k neighbours as a softmax of sim / T, which is the
    same vote without overflow at small temperatures.
    """
    train = F.normalize(train_x.float(), dim=1)
    k = min(k, len(train))
    out = []
    for chunk in F.normalize(test_x.float(), dim=1).split(batch_size):
        sim, idx = (chunk @ train.T).topk(k, dim=1)
        weights = (sim / temperature).softmax(dim=1)
        out.append(torch.zeros(len(chunk), num_classes).scatter_add_(1, train_y[idx], weights))
    return torch.cat(out)


def evaluation_sample(labels: Tensor, n: int, seed: int = 0) -> Tensor:
    """Sorted indices of a fixed-seed, class-stratified sample of ``n`` labelled images (all
    when ``n`` covers them): the same images for every variant, every class represented in
    proportion even when a dataset stores its images sorted by class."""
    if n >= len(labels):
        return torch.arange(len(labels))
    from sklearn.model_selection import train_test_split

    index = np.arange(len(labels))
    try:
        keep, _ = train_test_split(
            index, train_size=n, stratify=labels.numpy(), random_state=seed
        )
    except ValueError:  # a class too small to stratify: a plain fixed-seed sample
        keep = np.random.default_rng(seed).choice(len(labels), n, replace=False)
    return torch.from_numpy(np.sort(keep))


def fixed_masks(n: int, num_patches: int, cfg: ReconstructionConfig) -> Mask:
    """The evaluation masks: the same for every variant with the same patch grid."""
    generator = torch.Generator().manual_seed(cfg.mask_seed)
    return Mask(*random_mask(n, num_patches, cfg.mask_ratio, generator=generator))


def _psnr(mse: Tensor) -> Tensor:
    return 10.0 * torch.log10(1.0 / mse.clamp_min(1e-10))


@torch.no_grad()
def reconstruct(
    model: MaskedAutoencoder, x: Tensor, mask: Mask, decoder_loss: Loss | None
) -> Tensor:
    """The model's prediction of every patch of normalized ``x``, as a normalized image
    (B, C, H, W): mapped back from the loss's prediction space (``to_input_space``), which
    may use the visible patches of ``x`` only."""
    with autocast(x.device):
        pred = model(x, mask).pred.float()
    if decoder_loss is not None:
        pred = decoder_loss.to_input_space(pred, patchify(x, model.patch_size), mask.mask)
    return unpatchify(pred, model.patch_size, x.shape[1])


@torch.no_grad()
def reconstruction_quality(
    model: MaskedAutoencoder,
    images: Tensor,
    feeder: ImageFeeder,
    cfg: ReconstructionConfig,
    *,
    decoder_loss: Loss | None,
    mean_image: Tensor,
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
    masks = fixed_masks(len(images), model.num_patches, cfg)
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
