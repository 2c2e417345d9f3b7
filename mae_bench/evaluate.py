"""Evaluation helpers shared by the core and the evaluator plugins: frozen features (extracted
once per cell), the fixed evaluation sample and masks, and reconstructions mapped to pixels."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from mae_bench.contract import ImageData, Loss, Mask, MaskedAutoencoder, Pool
from mae_bench.data import ImageFeeder, index_batches
from mae_bench.device import autocast
from mae_bench.layers import (
    patchify,
    random_mask,
    unpatchify,
)


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


class FeatureCache:
    """Frozen train/test features of a cell, extracted once per pooling and shared."""

    def __init__(self, model: MaskedAutoencoder, data: ImageData, feeder: ImageFeeder) -> None:
        self.model, self.data, self.feeder = model, data, feeder
        self._cache: dict[str, tuple[Tensor, Tensor]] = {}

    def get(self, pool: Pool) -> tuple[Tensor, Tensor]:
        """(train, test) features with ``pool`` pooling."""
        if pool not in self._cache:
            self._cache[pool] = (
                extract_features(self.model, self.data.train_images, self.feeder, pool),
                extract_features(self.model, self.data.test_images, self.feeder, pool),
            )
        return self._cache[pool]


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


def fixed_masks(n: int, num_patches: int, ratio: float, seed: int) -> Mask:
    """The evaluation masks: the same for every variant with the same patch grid."""
    generator = torch.Generator().manual_seed(seed)
    return Mask(*random_mask(n, num_patches, ratio, generator=generator))


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


