"""Evaluation of a pretrained cell: reconstruction PSNR and a linear probe on cached features."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mae_bench.contract import Mask, MaskedAutoencoder, Pool
from mae_bench.data import ImageFeeder, index_batches
from mae_bench.device import autocast
from mae_bench.layers import laplacian, patch_mask_to_pixels, patchify, random_mask, unpatchify
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

    Returns ``{"lp_acc", "lp_train_acc"}`` and the test-set class probabilities (N, K).
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
    """Weighted k-NN (DINO): cosine similarity, votes weighted by exp(sim / T); probs (N, K)."""
    train = F.normalize(train_x.float(), dim=1)
    k = min(k, len(train))
    out = []
    for chunk in F.normalize(test_x.float(), dim=1).split(batch_size):
        sim, idx = (chunk @ train.T).topk(k, dim=1)
        votes = torch.zeros(len(chunk), num_classes).scatter_add_(
            1, train_y[idx], (sim / temperature).exp()
        )
        out.append(votes / votes.sum(dim=1, keepdim=True))
    return torch.cat(out)


def fixed_masks(n: int, num_patches: int, cfg: ReconstructionConfig) -> Mask:
    """The evaluation masks: the same for every variant with the same patch grid."""
    generator = torch.Generator().manual_seed(cfg.mask_seed)
    return Mask(*random_mask(n, num_patches, cfg.mask_ratio, generator=generator))


def _psnr(mse: Tensor) -> Tensor:
    return 10.0 * torch.log10(1.0 / mse.clamp_min(1e-10))


@torch.no_grad()
def reconstruction_quality(
    model: MaskedAutoencoder,
    images: Tensor,
    feeder: ImageFeeder,
    cfg: ReconstructionConfig,
    *,
    normalized_target: bool,
    mean_image: Tensor,
) -> dict[str, float]:
    """Reconstruction quality on held-out images, pixels in [0, 1], means over images.

    ``psnr_masked``: PSNR over the masked patches. ``psnr_full``: PSNR of the raw prediction of
    every patch, visible ones included. ``hf_error``: mean squared difference of the Laplacian
    (high-frequency content) of the reconstruction (visible patches from the input, masked
    ones predicted) and of the input, over the masked pixels.

    ``normalized_target``: the model predicts per-patch normalized pixels (``norm_pix``); its
    output is mapped back with each target patch's mean and std, as the MAE authors do to
    visualise such models. ``mean_image`` ([0, 1], C x H x W) gives the PSNR of predicting the
    mean training image, a floor every useful model must clear.
    """
    model.eval()
    images = images[: cfg.num_images]
    masks = fixed_masks(len(images), model.num_patches, cfg)
    p = model.patch_size
    psnr_model, psnr_mean, psnr_full, hf_error = [], [], [], []
    for idx in index_batches(len(images), cfg.batch_size):
        x = feeder(images[idx])
        mask = Mask(*(t[idx].to(x.device) for t in (masks.ids_keep, masks.ids_restore, masks.mask)))
        with autocast(feeder.device):
            pred = model(x, mask).pred.float()
        if normalized_target:
            target = patchify(x, p)
            mean = target.mean(dim=-1, keepdim=True)
            std = (target.var(dim=-1, keepdim=True) + 1e-6) ** 0.5
            pred = pred * std + mean
        recon = feeder.to_pixels(unpatchify(pred, p, x.shape[1]))
        truth = feeder.to_pixels(x)
        pixel_mask = patch_mask_to_pixels(mask.mask, p)
        denom = pixel_mask.sum(dim=(1, 2, 3)) * x.shape[1]
        for guess, out in ((recon, psnr_model), (mean_image.to(x.device)[None], psnr_mean)):
            mse = (((guess - truth) ** 2) * pixel_mask).sum(dim=(1, 2, 3)) / denom
            out.append(_psnr(mse).cpu())
        psnr_full.append(_psnr(((recon - truth) ** 2).mean(dim=(1, 2, 3))).cpu())
        composite = recon * pixel_mask + truth * (1 - pixel_mask)
        hf = (laplacian(composite) - laplacian(truth)) ** 2
        hf_error.append(((hf * pixel_mask).sum(dim=(1, 2, 3)) / denom).cpu())
    return {
        "psnr_masked": torch.cat(psnr_model).mean().item(),
        "psnr_full": torch.cat(psnr_full).mean().item(),
        "hf_error": torch.cat(hf_error).mean().item(),
        "psnr_mean_image": torch.cat(psnr_mean).mean().item(),
    }
