"""Evaluation helpers shared by the core and the evaluator plugins: frozen features (extracted
once per cell), the fixed evaluation sample and masks, reconstructions mapped to pixels, and
the sanity facts a classifier's result carries."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mae_bench.contract import (
    ImageData,
    Loss,
    Mask,
    MaskedAutoencoder,
    MaskingStrategy,
    Pool,
    Target,
)
from mae_bench.data import ImageFeeder, index_batches
from mae_bench.device import autocast
from mae_bench.layers import (
    patchify,
    random_mask,
    unpatchify,
)
from mae_bench.train import draw_mask


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
        keep, _ = train_test_split(index, train_size=n, stratify=labels.numpy(), random_state=seed)
    except ValueError:  # a class too small to stratify: a plain fixed-seed sample
        keep = np.random.default_rng(seed).choice(len(labels), n, replace=False)
    return torch.from_numpy(np.sort(keep))


def fixed_masks(n: int, num_patches: int, ratio: float, seed: int) -> Mask:
    """The evaluation masks: the same for every variant with the same patch grid."""
    generator = torch.Generator().manual_seed(seed)
    return Mask(*random_mask(n, num_patches, ratio, generator=generator))


def evaluation_masks(
    model: MaskedAutoencoder,
    n: int,
    *,
    ratio: float,
    seed: int,
    masking: MaskingStrategy | None = None,
    progress: float = 1.0,
) -> Mask:
    """The masks of ``n`` evaluation images of ``model``'s patch grid, on the CPU, drawn from
    ``seed``: :func:`fixed_masks` at ``ratio`` when ``masking`` is None (the same for every
    variant), else the variant's own ``masking`` at ``progress`` (1: the end of its
    schedule), checked as in pretraining. The reconstruction metrics and pictures both take
    their masks from here, so a picture shows the masks its metrics were measured on."""
    if masking is None:
        return fixed_masks(n, model.num_patches, ratio, seed)
    generator = torch.Generator().manual_seed(seed)
    return draw_mask(masking, n, model, progress, generator, device=torch.device("cpu"))


def _psnr(mse: Tensor) -> Tensor:
    return 10.0 * torch.log10(1.0 / mse.clamp_min(1e-10))


@torch.no_grad()
def reconstruct(
    model: MaskedAutoencoder,
    x: Tensor,
    mask: Mask,
    decoder_loss: Loss | None,
    target: Target | None = None,
) -> Tensor:
    """The model's prediction of every patch of normalized ``x``, as a normalized image
    (B, C, H, W): mapped back from the target's or the loss's prediction space
    (``to_input_space``), which may use the visible patches of ``x`` only. ``ValueError``
    for a target whose predictions are not pixels."""
    with autocast(x.device):
        pred = model(x, mask).pred.float()
    patches = patchify(x, model.patch_size)
    if target is not None:
        mapped = target.to_input_space(pred, patches, mask.mask)
        if mapped is None:
            raise ValueError(f"the {target.name!r} target's predictions are not pixels")
        pred = mapped
    elif decoder_loss is not None:
        pred = decoder_loss.to_input_space(pred, patches, mask.mask)
    return unpatchify(pred, model.patch_size, x.shape[1])


SMALL_TEST_SET = 100
"""Fewer test images than this: one image moves an accuracy by more than 0.01, too coarse to
separate variants closer than that (a warning in the result's sanity)."""
SMALL_TEST_CLASS = 10
"""A class with fewer test images than this: one image moves its recall, and so the macro
averages, by a tenth or more (a warning in the result's sanity)."""


def _listed(names: Sequence[str]) -> str:
    """``a``, ``a and b``, ``a, b and c``."""
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"


def classifier_sanity(
    train_labels: Tensor,
    test_labels: Tensor,
    num_classes: int,
    *,
    class_names: Sequence[str] | None = None,
    accuracy: tuple[str, float] | None = None,
) -> dict[str, Any]:
    """What says how far a classifier's test figures can be trusted, for its result's
    ``sanity``: ``n_train``, ``n_test``, ``num_classes``, ``chance`` (the share of the test
    set's majority class: what always predicting it scores), ``resolution`` (1 / n_test, the
    smallest step of an accuracy) and ``warnings``, sentences about

    - a test set of fewer than :data:`SMALL_TEST_SET` images (resolution above 0.01),
    - classes present with fewer than :data:`SMALL_TEST_CLASS` test images,
    - classes absent from the test set (left out of the macro averages),
    - ``accuracy`` (its metric name and value) at or below chance.
    """
    names = list(class_names or [str(k) for k in range(num_classes)])
    counts = np.bincount(test_labels.numpy(), minlength=num_classes)
    n_test = int(counts.sum())
    chance = float(counts.max() / n_test)
    warnings: list[str] = []
    if n_test < SMALL_TEST_SET:
        warnings.append(
            f"only {n_test} test images: one image moves an accuracy by 1/{n_test} = "
            f"{1 / n_test:.3f}, too coarse to separate variants closer than that"
        )
    small = [k for k in range(num_classes) if 0 < counts[k] < SMALL_TEST_CLASS]
    if small:
        sizes = sorted({int(counts[k]) for k in small})
        each = f"{sizes[0]} test images" + (" each" if len(small) > 1 else "")
        if len(sizes) > 1:
            each = f"{_listed([str(int(counts[k])) for k in small])} test images"
        verb = "has" if len(small) == 1 else "have"
        warnings.append(
            f"{_listed([names[k] for k in small])} {verb} {each} (fewer than "
            f"{SMALL_TEST_CLASS}): one image moves a class's recall by 1/{max(sizes)} or more"
        )
    absent = [names[k] for k in range(num_classes) if counts[k] == 0]
    if absent:
        verb = "has" if len(absent) == 1 else "have"
        warnings.append(f"{_listed(absent)} {verb} no test images: left out of the macro averages")
    if accuracy is not None and accuracy[1] <= chance:
        warnings.append(
            f"{accuracy[0]} {accuracy[1]:.3f} is no better than chance {chance:.3f} "
            "(always predicting the test set's majority class)"
        )
    return {
        "n_train": len(train_labels),
        "n_test": n_test,
        "num_classes": num_classes,
        "chance": chance,
        "resolution": 1 / n_test,
        "warnings": warnings,
    }
