"""Datasets that need no download: scikit-learn's digits and procedural synthetic images."""

from __future__ import annotations

import math
from typing import Annotated, Literal

import torch
from pydantic import Field, PositiveInt

from mae_bench import Dataset, ImageData, Params, hookimpl
from mae_bench.contract import Seed

Fraction = Annotated[float, Field(gt=0, lt=1)]


class DigitsParams(Params):
    """Stratified train/test split of the 1,797 images; pretraining on the train images."""

    test_fraction: Fraction = 0.2
    split_seed: Seed = 0
    pretrain_split: Literal["train", "all"] = "train"


class DigitsDataset(Dataset):
    """scikit-learn's bundled handwritten digits (8x8 grey, 10 classes): real, no download."""

    name = "digits"
    Params = DigitsParams

    @property
    def pretrain_sees_test(self) -> bool:
        return self.params.pretrain_split == "all"

    def load(self) -> ImageData:
        from sklearn.datasets import load_digits  # imported here: slow, and only needed here
        from sklearn.model_selection import train_test_split

        p = self.params
        digits = load_digits()
        images = torch.from_numpy(digits.images * (255.0 / 16.0)).round().to(torch.uint8)
        images = images.unsqueeze(1)  # (N, 1, 8, 8)
        labels = torch.from_numpy(digits.target).long()
        train_idx, test_idx = train_test_split(
            range(len(labels)),
            test_size=p.test_fraction,
            random_state=p.split_seed,
            stratify=digits.target,
        )
        train_idx, test_idx = torch.tensor(train_idx), torch.tensor(test_idx)
        return ImageData(
            pretrain=images if p.pretrain_split == "all" else images[train_idx],
            train_images=images[train_idx],
            train_labels=labels[train_idx],
            test_images=images[test_idx],
            test_labels=labels[test_idx],
            class_names=[str(d) for d in digits.target_names],
        )


class SyntheticParams(Params):
    """Sizes of the procedural splits; the class is the orientation of a noisy grating."""

    num_classes: Annotated[int, Field(ge=2, le=64)] = 4
    size: PositiveInt = 32
    color: bool = True  # 3 channels with a random tint per image, else 1 grey channel
    n_pretrain: PositiveInt = 512
    n_train: PositiveInt = 256
    n_test: PositiveInt = 128
    noise: Annotated[float, Field(ge=0, le=1)] = 0.1
    seed: Seed = 0


class SyntheticDataset(Dataset):
    """Procedural labelled images of any size: oriented gratings with colour and noise."""

    name = "synthetic"
    Params = SyntheticParams

    def _make(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        p = self.params
        labels = torch.randint(p.num_classes, (n,), generator=generator)
        jitter = (torch.rand(n, generator=generator) - 0.5) * (math.pi / p.num_classes) * 0.5
        theta = labels * (math.pi / p.num_classes) + jitter
        freq = 2 + 3 * torch.rand(n, generator=generator)  # cycles per image
        phase = 2 * math.pi * torch.rand(n, generator=generator)
        coords = torch.linspace(0, 1, p.size)
        yy, xx = torch.meshgrid(coords, coords, indexing="ij")
        proj = xx * torch.cos(theta)[:, None, None] + yy * torch.sin(theta)[:, None, None]
        wave = torch.sin(2 * math.pi * freq[:, None, None] * proj + phase[:, None, None])
        channels = 3 if p.color else 1
        colour = 0.3 + 0.7 * torch.rand(n, channels, 1, 1, generator=generator)
        img = 0.5 + 0.5 * wave[:, None] * colour
        img = img + p.noise * torch.randn(img.shape, generator=generator)
        return (img.clamp(0, 1) * 255).round().to(torch.uint8), labels

    def load(self) -> ImageData:
        p = self.params
        generator = torch.Generator().manual_seed(p.seed)
        pretrain, _ = self._make(p.n_pretrain, generator)
        train_images, train_labels = self._make(p.n_train, generator)
        test_images, test_labels = self._make(p.n_test, generator)
        return ImageData(
            pretrain=pretrain,
            train_images=train_images,
            train_labels=train_labels,
            test_images=test_images,
            test_labels=test_labels,
            class_names=[f"{180 * k / p.num_classes:g}deg" for k in range(p.num_classes)],
        )


@hookimpl
def register_datasets(register):
    register(DigitsDataset)
    register(SyntheticDataset)
