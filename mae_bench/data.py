"""Feeding uint8 image tensors to models: batched resize, channel conversion, normalisation."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

_LUMA = (0.299, 0.587, 0.114)


@dataclass(frozen=True)
class ImageFeeder:
    """Turns uint8 (B, C, H, W) batches into normalized float model input on ``device``."""

    image_size: int
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    device: torch.device

    @classmethod
    def fit(
        cls,
        images: Tensor,
        *,
        image_size: int,
        channels: int,
        device: torch.device,
        max_images: int = 10_000,
    ) -> ImageFeeder:
        """A feeder whose per-channel mean/std are measured on (up to ``max_images``) images."""
        step = max(1, len(images) // max_images)
        unit = cls(image_size, channels, (0.0,) * channels, (1.0,) * channels, torch.device("cpu"))
        sample = torch.cat([unit.pixels(b) for b in images[::step].split(1024)])
        mean = sample.mean(dim=(0, 2, 3))
        std = sample.std(dim=(0, 2, 3)).clamp_min(1e-3)
        return cls(image_size, channels, tuple(mean.tolist()), tuple(std.tolist()), device)

    def _stats(self, x: Tensor) -> tuple[Tensor, Tensor]:
        mean = torch.tensor(self.mean, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
        return mean, std

    def pixels(self, batch: Tensor) -> Tensor:
        """uint8 batch -> float [0, 1] at ``image_size`` with ``channels``, on the device."""
        x = batch.to(self.device, non_blocking=True).float().div_(255.0)
        if x.shape[1] == 1 and self.channels == 3:
            x = x.expand(-1, 3, -1, -1)
        elif x.shape[1] == 3 and self.channels == 1:
            x = (x * x.new_tensor(_LUMA).view(1, 3, 1, 1)).sum(dim=1, keepdim=True)
        if x.shape[-2:] != (self.image_size, self.image_size):
            x = F.interpolate(
                x, size=(self.image_size, self.image_size), mode="bilinear", antialias=True
            ).clamp_(0.0, 1.0)
        return x.contiguous()

    def __call__(self, batch: Tensor) -> Tensor:
        """uint8 batch -> normalized model input."""
        x = self.pixels(batch)
        mean, std = self._stats(x)
        return (x - mean) / std

    def to_pixels(self, x: Tensor) -> Tensor:
        """Normalized model-space images -> [0, 1] pixels (clamped)."""
        mean, std = self._stats(x)
        return (x * std + mean).clamp(0.0, 1.0)


def index_batches(
    n: int, batch_size: int, *, generator: torch.Generator | None = None, drop_last: bool = False
) -> Iterator[Tensor]:
    """Index batches over ``range(n)``, shuffled when a generator is given."""
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    stop = n - n % batch_size if drop_last and n >= batch_size else n
    for start in range(0, stop, batch_size):
        yield order[start : start + batch_size]
