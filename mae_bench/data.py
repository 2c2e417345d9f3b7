"""Images as tensors: stored uint8 images (memory-mapped files, several files seen as one) for
dataset plugins, and feeding them to models (batched resize, channel conversion,
normalisation, crops)."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from mae_bench.contract import Images
from mae_bench.errors import UserError
from mae_bench.files import require_file
from mae_bench.suite import AugmentConfig


def memmap_uint8(path: Path, item_shape: tuple[int, ...], dataset: str, hint: str) -> np.ndarray:
    """Memory-map a raw uint8 file as (N, *item_shape), checking its size first."""
    require_file(path, dataset, hint)
    item = int(np.prod(item_shape))
    size = path.stat().st_size
    if size == 0 or size % item:
        raise UserError(
            f"{dataset}: {path} has {size} bytes, not a whole number of {item}-byte images "
            f"({'x'.join(map(str, item_shape))} uint8): the file is truncated or not this "
            f"format. {hint}"
        )
    # copy-on-write: writable for torch.from_numpy, never written back to the file
    return np.memmap(path, dtype=np.uint8, mode="c", shape=(size // item, *item_shape))


def as_uint8_images(array: np.ndarray) -> torch.Tensor:
    """A (N, C, H, W) uint8 tensor sharing memory with ``array`` (memory maps included)."""
    return torch.from_numpy(array)


class ConcatImages:
    """Several uint8 (N_i, C, H, W) tensors, e.g. memory-mapped files, seen as one; no copy."""

    def __init__(self, *parts: torch.Tensor) -> None:
        if not parts or len({p.shape[1:] for p in parts}) != 1:
            raise ValueError("ConcatImages needs one or more tensors of the same image shape")
        self.parts = parts
        self.offsets = torch.tensor([0, *torch.cumsum(torch.tensor([len(p) for p in parts]), 0)])
        self.dtype = parts[0].dtype
        self.ndim = parts[0].ndim
        self.shape = torch.Size([int(self.offsets[-1]), *parts[0].shape[1:]])

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index: torch.Tensor | slice) -> torch.Tensor:
        """Images at ``index`` (a slice or a 1-D index tensor), read only from their parts."""
        idx = torch.arange(len(self))[index] if isinstance(index, slice) else index.long()
        part = torch.searchsorted(self.offsets, idx, right=True) - 1
        out = torch.empty((len(idx), *self.shape[1:]), dtype=self.dtype)
        for k in part.unique().tolist():
            where = part == k
            out[where] = self.parts[k][idx[where] - self.offsets[k]]
        return out


# ------------------------------------------------------------ host to device, without blocking
PackLayout = list[tuple[int, torch.dtype, torch.Size]]
"""Where :func:`pack_bytes` put each tensor: (byte offset, dtype, shape)."""

_ALIGN = 16  # bytes: every packed tensor starts where any dtype may be viewed


def pack_bytes(tensors: Sequence[Tensor], *, pin: bool = False) -> tuple[Tensor, PackLayout]:
    """Tensors of any dtypes and shapes (on the CPU) as one 1-D uint8 buffer, each at an
    aligned offset, so one copy moves them all; ``pin``: the buffer in pinned memory."""
    layout: PackLayout = []
    size = 0
    for t in tensors:
        layout.append((size, t.dtype, t.shape))
        size += -(-t.numel() * t.element_size() // _ALIGN) * _ALIGN
    buffer = torch.empty(size, dtype=torch.uint8, pin_memory=pin)
    for t, (offset, _, _) in zip(tensors, layout, strict=True):
        raw = t.contiguous().reshape(-1).view(torch.uint8)
        buffer[offset : offset + raw.numel()].copy_(raw)
    return buffer, layout


def unpack_bytes(buffer: Tensor, layout: PackLayout) -> list[Tensor]:
    """The tensors :func:`pack_bytes` packed into ``buffer`` (views of it, bit for bit)."""
    out = []
    for offset, dtype, shape in layout:
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        out.append(buffer[offset : offset + nbytes].view(dtype).view(shape))
    return out


def to_device(tensors: Sequence[Tensor], device: torch.device) -> list[Tensor]:
    """``tensors`` on ``device`` with at most one copy from the host that does not block it:
    those not there yet go in one buffer (pinned on CUDA), copied with ``non_blocking``; a
    single one is copied as it is. Tensors already on ``device`` (and everything when it is
    the CPU) are returned unchanged."""
    device = torch.device(device)
    moving = [i for i, t in enumerate(tensors) if t.device != device and device.type != "cpu"]
    out = list(tensors)
    if not moving:
        return out
    pin = device.type == "cuda"
    if len(moving) == 1:
        host = tensors[moving[0]]
        if pin and host.device.type == "cpu" and not host.is_pinned():
            host = host.pin_memory()
        out[moving[0]] = host.to(device, non_blocking=True)
        return out
    buffer, layout = pack_bytes([tensors[i] for i in moving], pin=pin)
    arrived = unpack_bytes(buffer.to(device, non_blocking=True), layout)
    for i, t in zip(moving, arrived, strict=True):
        out[i] = t
    return out


_LUMA = (0.299, 0.587, 0.114)


@dataclass(frozen=True)
class ImageFeeder:
    """Turns uint8 (B, C, H, W) batches into normalized float model input on ``device``."""

    image_size: int
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    device: torch.device
    _constants: dict[tuple[torch.device, torch.dtype], tuple[Tensor, Tensor, Tensor]] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )  # the mean, std and luma weights per device and dtype, made once

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
        unit = cls(image_size, channels, (0.0,) * channels, (1.0,) * channels, torch.device("cpu"))
        total = torch.zeros(channels, dtype=torch.float64)
        squares = torch.zeros(channels, dtype=torch.float64)
        count = 0
        for idx in sample_indices(len(images), max_images).split(unit.chunk(images)):
            x = unit.pixels(images[idx]).double()
            total += x.sum(dim=(0, 2, 3))
            squares += x.pow(2).sum(dim=(0, 2, 3))
            count += x.numel() // channels
        mean = total / count
        std = (squares / count - mean.pow(2)).clamp_min(0).sqrt().clamp_min(1e-3)
        return cls(image_size, channels, tuple(mean.tolist()), tuple(std.tolist()), device)

    def mean_image(self, images: Images, max_images: int = 10_000) -> Tensor:
        """Mean of (up to ``max_images``) images in [0, 1] pixels, (C, H, W) on the CPU."""
        total = torch.zeros(self.channels, self.image_size, self.image_size, dtype=torch.float64)
        idx_all = sample_indices(len(images), max_images)
        for idx in idx_all.split(self.chunk(images)):
            total += self.pixels(images[idx]).double().sum(dim=0).cpu()
        return (total / len(idx_all)).float()

    def chunk(self, images: Images, budget: int = 256 << 20) -> int:
        """Images per chunk of a statistics pass: at most 1024, within ``budget`` bytes of
        float64 pixels (stored and resized sizes), so large images never exhaust memory."""
        side = max(self.image_size, *images.shape[-2:])
        per_image = 8 * max(self.channels, images.shape[1]) * side * side
        return max(1, min(1024, budget // per_image))

    def _constants_for(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The (1, C, 1, 1) mean and std and the (1, 3, 1, 1) luma weights on ``x``'s device
        in its dtype, made (one copy) the first time they are asked for there."""
        key = (x.device, x.dtype)
        if key not in self._constants:
            with torch.inference_mode(False):  # usable by autograd whatever the caller's mode
                host = [torch.tensor(v, dtype=x.dtype) for v in (self.mean, self.std, _LUMA)]
                mean, std, luma = to_device(host, x.device)
            self._constants[key] = tuple(t.view(1, -1, 1, 1) for t in (mean, std, luma))
        return self._constants[key]

    def _stats(self, x: Tensor) -> tuple[Tensor, Tensor]:
        mean, std, _ = self._constants_for(x)
        return mean, std

    def pixels(self, batch: Tensor) -> Tensor:
        """uint8 batch -> float [0, 1] at ``image_size`` with ``channels``, on the device."""
        (on_device,) = to_device([batch], self.device)
        x = self._convert_channels(on_device.float().div_(255.0))
        if x.shape[-2:] != (self.image_size, self.image_size):
            x = self._resize(x)
        return x.contiguous()

    def __call__(
        self,
        batch: Tensor,
        augment: AugmentConfig | None = None,
        generator: torch.Generator | None = None,
        rows: slice | Tensor | None = None,
        *,
        batch_size: int | None = None,
    ) -> Tensor:
        """uint8 batch -> normalized model input, optionally augmented (in batch, on device).

        ``rows``: feed only these rows of the batch (a data-parallel rank's share: a slice or
        an index tensor); random augmentation is still drawn for the whole batch, so every
        image is augmented as in a single-process run. ``batch_size``: ``batch`` holds only
        the images of ``rows`` (the rank read no others) of a batch of that many."""
        if augment is not None and (augment.crop_scale or augment.hflip):
            x = self.augment(batch, augment, generator, rows, batch_size=batch_size)
        else:
            x = self.pixels(batch if rows is None or batch_size is not None else batch[rows])
        mean, std = self._stats(x)
        return x.sub_(mean).div_(std)  # x is a fresh tensor: normalize in place

    def augment(
        self,
        batch: Tensor,
        cfg: AugmentConfig,
        generator: torch.Generator | None = None,
        rows: slice | Tensor | None = None,
        *,
        batch_size: int | None = None,
    ) -> Tensor:
        """Random resized crop and horizontal flip of a whole batch at once, to [0, 1] pixels.

        Crops are drawn as torchvision's RandomResizedCrop draws them (:func:`sample_crops`).
        Crop, resize to ``image_size`` (PIL's
        bilinear filter: linear when enlarging, an antialiasing triangle when shrinking) and
        flip are one linear map per axis, applied to the whole batch as two matrix products.
        Random numbers come from ``generator`` on the CPU, so runs are reproducible; they are
        drawn for the whole batch (``batch_size`` images when ``batch`` holds only ``rows``),
        then only ``rows`` of it are made: the rows' crops go to the device with the images
        (one copy) and their resize weights are made there.
        """
        _, _, h, w = batch.shape
        b = batch_size if batch_size is not None else len(batch)
        x0, y0 = torch.zeros(b), torch.zeros(b)
        cw, ch = torch.full((b,), float(w)), torch.full((b,), float(h))
        if cfg.crop_scale:
            x0, y0, cw, ch = sample_crops(b, h, w, cfg.crop_scale, cfg.crop_ratio, generator)
        flip = torch.rand(b, generator=generator) < 0.5 if cfg.hflip else torch.zeros(b, dtype=bool)
        if rows is not None:
            x0, y0, cw, ch, flip = (t[rows] for t in (x0, y0, cw, ch, flip))
            batch = batch if batch_size is not None else batch[rows]
            b = len(batch)
        crops = torch.stack([x0, y0, cw, ch, flip.float()])  # (5, B)
        batch, crops = to_device([batch, crops], self.device)
        x0, y0, cw, ch, flip = crops[0], crops[1], crops[2], crops[3], crops[4] > 0.5
        x = self._convert_channels(batch.float().div_(255.0))
        rows_w = resample_weights(y0, ch, h, self.image_size)
        cols = resample_weights(x0, cw, w, self.image_size)
        cols = torch.where(flip[:, None, None], cols.flip(1), cols)  # no sync on the device
        c, s = x.shape[1], self.image_size
        x = torch.bmm(x.reshape(b, c * h, w), cols.transpose(1, 2)).view(b, c, h, s)
        x = torch.einsum("boh,bchp->bcop", rows_w, x)
        return x.clamp_(0.0, 1.0).contiguous()

    def _convert_channels(self, x: Tensor) -> Tensor:
        if x.shape[1] == 1 and self.channels == 3:
            return x.expand(-1, 3, -1, -1)
        if x.shape[1] == 3 and self.channels == 1:
            _, _, luma = self._constants_for(x)
            return (x * luma).sum(dim=1, keepdim=True)
        return x

    def _resize(self, x: Tensor) -> Tensor:
        size = (self.image_size, self.image_size)
        return F.interpolate(x, size=size, mode="bilinear", antialias=True).clamp_(0.0, 1.0)

    def to_pixels(self, x: Tensor) -> Tensor:
        """Normalized model-space images -> [0, 1] pixels (clamped)."""
        mean, std = self._stats(x)
        return (x * std + mean).clamp(0.0, 1.0)


def sample_crops(
    n: int,
    height: int,
    width: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    generator: torch.Generator | None = None,
    tries: int = 10,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``n`` crop boxes ``(x0, y0, w, h)`` drawn as torchvision's ``RandomResizedCrop``.

    Per crop: up to ``tries`` draws of an area fraction (uniform in ``scale``) and a
    log-uniform aspect ratio, sides rounded to whole pixels; the first that fits the image is
    placed uniformly at random (whole-pixel offsets). When none fits, the fallback centre
    crop: the whole image, narrowed to the nearest allowed aspect ratio. Vectorised: all
    tries are drawn at once from ``generator`` (CPU).
    """
    area = height * width
    target = area * (scale[0] + (scale[1] - scale[0]) * torch.rand(n, tries, generator=generator))
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * torch.rand(n, tries, generator=generator))
    cand_w = (target * aspect).sqrt().round()
    cand_h = (target / aspect).sqrt().round()
    fits = (cand_w > 0) & (cand_w <= width) & (cand_h > 0) & (cand_h <= height)
    first = fits.float().argmax(dim=1, keepdim=True)  # first fitting try (0 when none fits)
    found = fits.any(dim=1)
    cw = cand_w.gather(1, first).squeeze(1)
    ch = cand_h.gather(1, first).squeeze(1)
    in_ratio = width / height
    if in_ratio < ratio[0]:
        fallback_w, fallback_h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        fallback_w, fallback_h = round(height * ratio[1]), height
    else:
        fallback_w, fallback_h = width, height
    cw = torch.where(found, cw, torch.full_like(cw, fallback_w))
    ch = torch.where(found, ch, torch.full_like(ch, fallback_h))
    # torch.randint's upper bound is per call: draw uniforms and floor them per crop
    u = torch.rand(n, 2, generator=generator)
    x0 = torch.where(found, (u[:, 0] * (width - cw + 1)).floor(), (width - cw) // 2)
    y0 = torch.where(found, (u[:, 1] * (height - ch + 1)).floor(), (height - ch) // 2)
    return x0, y0, cw, ch


def resample_weights(start: Tensor, length: Tensor, in_size: int, out_size: int) -> Tensor:
    """(B, out, in) weights taking the span [start, start + length) of each row to ``out_size``.

    Triangle (bilinear) filter, widened to the input footprint when shrinking, as PIL does;
    each output pixel's weights sum to 1. Made on ``start``'s device.
    """
    device = start.device
    scale = length / out_size
    centers = start[:, None] + (torch.arange(out_size, device=device) + 0.5) * scale[:, None] - 0.5
    support = scale.clamp(min=1.0)[:, None, None]
    distance = (torch.arange(in_size, device=device)[None, None, :] - centers[:, :, None]).abs()
    weights = (1.0 - distance / support).clamp_min(0.0)
    return weights / weights.sum(dim=-1, keepdim=True)


def sample_indices(n: int, max_images: int) -> Tensor:
    """Evenly spaced indices of at most ``max_images`` of ``n`` images."""
    return torch.arange(0, n, max(1, -(-n // max_images)))


def index_batches(
    n: int, batch_size: int, *, generator: torch.Generator | None = None, drop_last: bool = False
) -> Iterator[Tensor]:
    """Index batches over ``range(n)``, shuffled when a generator is given."""
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    stop = n - n % batch_size if drop_last and n >= batch_size else n
    for start in range(0, stop, batch_size):
        yield order[start : start + batch_size]
