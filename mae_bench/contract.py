"""The small public contract every component implements.

Four kinds of component plug into mae-bench: encoders (whole masked autoencoders),
masking strategies, losses and datasets. Each is a class with

- ``name``: the string a suite uses to select it (``encoder: {name: vit}``),
- ``Params``: a pydantic model (subclass of :class:`Params`) validating its YAML parameters,
- a constructor taking the validated params (plus context, for encoders).

Plugins depend on this module and ``mae_bench.layers``; the core never imports a plugin.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from functools import cached_property
from typing import ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict
from torch import Tensor, nn

from mae_bench.layers import patchify, random_mask

Pool = Literal["cls", "mean"]


class Params(BaseModel):
    """Base of every component's parameter model: unknown keys are errors, values immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


# --------------------------------------------------------------------------- masking
@dataclass(frozen=True)
class Mask:
    """Which patches each sample hides. ``mask`` is 1 where a patch is masked (hidden)."""

    ids_keep: Tensor  # (B, K) indices of visible patches, in encoder order
    ids_restore: Tensor  # (B, L) inverse permutation, to put tokens back in patch order
    mask: Tensor  # (B, L) float, 1 = masked, 0 = visible

    @property
    def ratio(self) -> float:
        """Fraction of masked patches."""
        return float(self.mask.mean())


class MaskingStrategy(ABC):
    """Chooses which patches to hide, possibly depending on training progress in [0, 1]."""

    kind: ClassVar[str] = "masking"
    name: ClassVar[str]
    Params: ClassVar[type[Params]] = Params

    def __init__(self, params: Params) -> None:
        self.params = params

    @abstractmethod
    def ratio_at(self, progress: float) -> float:
        """Mask ratio at ``progress`` (0 = start of pretraining, 1 = end)."""

    def __call__(
        self,
        batch_size: int,
        num_patches: int,
        *,
        progress: float = 1.0,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> Mask:
        """Draw a mask; the default hides a uniformly random subset of ``ratio_at(progress)``."""
        ids_keep, ids_restore, mask = random_mask(
            batch_size, num_patches, self.ratio_at(progress), generator=generator, device=device
        )
        return Mask(ids_keep, ids_restore, mask)

    def summary(self) -> str:
        """Short human-readable description for leaderboards."""
        return self.name


# --------------------------------------------------------------------------- encoders
@dataclass(frozen=True)
class MAEOutput:
    """What one masked-autoencoder forward pass returns."""

    pred: Tensor  # (B, L, p*p*C) reconstruction of every patch
    latent: Tensor  # (B, prefix + K, D) encoder tokens of the visible patches
    embedding: Tensor  # (B, D) pooled encoder embedding of the visible patches


class MaskedAutoencoder(nn.Module, ABC):
    """A masked autoencoder: ``encoder`` sees only visible patches, ``decoder`` fills the rest.

    Subclasses set ``patch_size``, ``embed_dim``, ``num_prefix_tokens`` (1 with a cls token)
    and the ``encoder`` / ``decoder`` submodules (saved as separate weight files). By default
    they are called as ``encoder(imgs, ids_keep)`` and ``decoder(latent, ids_restore)``;
    override :meth:`forward_encoder` / :meth:`forward_decoder` for other signatures.
    """

    kind: ClassVar[str] = "encoder"
    name: ClassVar[str]
    Params: ClassVar[type[Params]] = Params

    patch_size: int
    embed_dim: int
    num_prefix_tokens: int = 0
    encoder: nn.Module
    decoder: nn.Module

    def __init__(self, params: Params, *, image_size: int, in_chans: int) -> None:
        super().__init__()
        self.params = params
        self.image_size = image_size
        self.in_chans = in_chans

    def check_patch_size(self, patch_size: int) -> None:
        """Raise ``ValueError`` unless ``patch_size`` tiles the image exactly."""
        if self.image_size % patch_size:
            raise ValueError(
                f"patch_size {patch_size} does not divide the dataset image_size {self.image_size}"
            )

    @property
    def grid_size(self) -> int:
        """Patches per image side."""
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        """Patches per image."""
        return self.grid_size**2

    def forward_encoder(self, imgs: Tensor, ids_keep: Tensor) -> Tensor:
        """Encode only the patches ``ids_keep`` of ``imgs``: (B, prefix + K, D)."""
        return self.encoder(imgs, ids_keep)

    def forward_decoder(self, latent: Tensor, ids_restore: Tensor) -> Tensor:
        """Predict every patch from the visible tokens: (B, L, p*p*C)."""
        return self.decoder(latent, ids_restore)

    def pool(self, latent: Tensor, pool: Pool = "cls") -> Tensor:
        """One vector per sample: the cls token if there is one and asked for, else the mean."""
        if pool == "cls" and self.num_prefix_tokens > 0:
            return latent[:, 0]
        return latent[:, self.num_prefix_tokens :].mean(dim=1)

    def forward(self, imgs: Tensor, mask: Mask) -> MAEOutput:
        """Encode the visible patches, decode all of them."""
        latent = self.forward_encoder(imgs, mask.ids_keep)
        pred = self.forward_decoder(latent, mask.ids_restore)
        return MAEOutput(pred=pred, latent=latent, embedding=self.pool(latent))

    def forward_features(self, imgs: Tensor, pool: Pool = "cls") -> Tensor:
        """Frozen-feature extraction for probes: every patch visible, pooled to (B, D)."""
        ids_all = torch.arange(self.num_patches, device=imgs.device).expand(imgs.shape[0], -1)
        return self.pool(self.forward_encoder(imgs, ids_all), pool)

    def summary(self) -> str:
        """Short human-readable description for leaderboards."""
        return self.name


# --------------------------------------------------------------------------- losses
@dataclass(frozen=True)
class LossInputs:
    """Everything a loss may look at for one batch."""

    imgs: Tensor  # (B, C, H, W) normalized model input
    pred: Tensor  # (B, L, p*p*C)
    mask: Tensor  # (B, L), 1 = masked
    embedding: Tensor  # (B, D) pooled encoder embedding of the visible patches
    patch_size: int

    @cached_property
    def target(self) -> Tensor:
        """The input cut into patches, (B, L, p*p*C), in the layout of ``pred``."""
        return patchify(self.imgs, self.patch_size)


class Loss(ABC):
    """A training objective term; a variant sums several, each with a ``weight``."""

    kind: ClassVar[str] = "loss"
    name: ClassVar[str]
    Params: ClassVar[type[Params]] = Params

    def __init__(self, params: Params) -> None:
        self.params = params

    @property
    def normalizes_target(self) -> bool:
        """True when the model learns per-patch normalized pixels rather than pixels."""
        return False

    @abstractmethod
    def __call__(self, inputs: LossInputs) -> Tensor:
        """A scalar loss for the batch."""

    def summary(self) -> str:
        """Short human-readable description for leaderboards."""
        return self.name


# --------------------------------------------------------------------------- datasets
class ConcatImages:
    """Several uint8 (N_i, C, H, W) tensors, e.g. memory-mapped files, seen as one; no copy."""

    def __init__(self, *parts: Tensor) -> None:
        if not parts or len({p.shape[1:] for p in parts}) != 1:
            raise ValueError("ConcatImages needs one or more tensors of the same image shape")
        self.parts = parts
        self.offsets = torch.tensor([0, *torch.cumsum(torch.tensor([len(p) for p in parts]), 0)])
        self.dtype = parts[0].dtype
        self.ndim = parts[0].ndim
        self.shape = torch.Size([int(self.offsets[-1]), *parts[0].shape[1:]])

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index: Tensor | slice) -> Tensor:
        """Images at ``index`` (a slice or a 1-D index tensor), read only from their parts."""
        idx = torch.arange(len(self))[index] if isinstance(index, slice) else index.long()
        part = torch.searchsorted(self.offsets, idx, right=True) - 1
        out = torch.empty((len(idx), *self.shape[1:]), dtype=self.dtype)
        for k in part.unique().tolist():
            where = part == k
            out[where] = self.parts[k][idx[where] - self.offsets[k]]
        return out


Images = Tensor | ConcatImages


@dataclass
class ImageData:
    """A dataset's splits as uint8 images (N, C, H, W) and int64 labels.

    Images may be memory-mapped tensors (``torch.from_numpy(np.memmap(...))``) or a
    :class:`ConcatImages`; the core only takes ``len()`` and index-tensor batches of them.
    ``positive_class`` names the positive label of a binary task (threshold analysis).
    """

    pretrain: Images  # unlabeled pretraining images
    train_images: Images
    train_labels: Tensor
    test_images: Images
    test_labels: Tensor
    class_names: list[str] = field(default_factory=list)
    positive_class: int | None = None

    def __post_init__(self) -> None:
        for split in ("pretrain", "train_images", "test_images"):
            images = getattr(self, split)
            if images.dtype != torch.uint8 or images.ndim != 4:
                raise ValueError(f"{split} must be a uint8 (N, C, H, W) tensor")
            if len(images) == 0:
                raise ValueError(f"{split} is empty")
        for split in ("train", "test"):
            images, labels = getattr(self, f"{split}_images"), getattr(self, f"{split}_labels")
            if labels.shape != (len(images),):
                raise ValueError(f"{split}_labels must have one label per image")
        top = int(max(self.train_labels.max(), self.test_labels.max()))
        if not self.class_names:
            self.class_names = [str(i) for i in range(top + 1)]
        if top >= len(self.class_names) or min(self.train_labels.min(), self.test_labels.min()) < 0:
            raise ValueError(f"labels must lie in [0, {len(self.class_names)})")
        if self.positive_class is not None and not 0 <= self.positive_class < self.num_classes:
            raise ValueError(f"positive_class {self.positive_class} is not a class index")

    @property
    def num_classes(self) -> int:
        """Number of classes of the labelled splits."""
        return len(self.class_names)

    @property
    def channels(self) -> int:
        """Channels of the stored images."""
        return self.pretrain.shape[1]


class Dataset(ABC):
    """Loads a dataset's pretraining and labelled splits."""

    kind: ClassVar[str] = "dataset"
    name: ClassVar[str]
    Params: ClassVar[type[Params]] = Params

    def __init__(self, params: Params) -> None:
        self.params = params

    @abstractmethod
    def load(self) -> ImageData:
        """Read the data; raise ``mae_bench.UserError`` naming the file if it is missing."""

    def summary(self) -> str:
        """Short human-readable description for leaderboards."""
        return self.name


COMPONENT_BASES: dict[str, type] = {
    "encoder": MaskedAutoencoder,
    "masking": MaskingStrategy,
    "loss": Loss,
    "dataset": Dataset,
}
