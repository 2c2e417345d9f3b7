"""The small public contract every component implements, and the types they exchange.

Components plug into mae-bench by kind: encoders (whole masked autoencoders), masking
strategies, losses, datasets, evaluators, loggers and launchers (the launcher interface
lives with the runner, :mod:`mae_bench.runner`). Each is a :class:`Component`:

- ``kind``: which kind it is (set by its base class: ``"encoder"``, ``"loss"``, ...),
- ``name``: the string a suite uses to select it (``encoder: {name: vit}``),
- ``Params``: a pydantic model (subclass of :class:`Params`) validating its YAML parameters,
- a constructor taking the validated params (plus context, for encoders),
- ``summary()``: a short description for leaderboards.

This module imports nothing of mae-bench but :mod:`mae_bench.layers` and
:mod:`mae_bench.errors`; plugins depend on it, and the core never imports a plugin.
"""

from __future__ import annotations

import copy
import inspect
import math
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal, Protocol

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from mae_bench.errors import MaeBenchWarning
from mae_bench.layers import (
    layer_decay_param_groups,
    patchify,
    random_mask,
    set_block_drop_path,
    weight_decay_param_groups,
)

if TYPE_CHECKING:
    import pandas as pd

Pool = Literal["cls", "mean"]
Seed = Annotated[int, Field(ge=0, lt=2**32)]
"""A random seed: what torch, numpy and scikit-learn all accept."""


class Params(BaseModel):
    """Base of every component's parameter model: unknown keys are errors, values immutable,
    infinities and NaN refused."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class Component:
    """Base of every plugin component: its kind, suite name, validated parameters and a
    short description. A component class sets ``name`` and, if it has parameters, ``Params``."""

    kind: ClassVar[str]  # set by each kind's base class; the registry checks it
    name: ClassVar[str]
    Params: ClassVar[type[Params]] = Params
    version: ClassVar[str | None] = None
    """The component's own version, part of every result key it affects: bump it when a
    change outside its own modules (a helper it imports) changes its results."""

    def __init__(self, params: Params) -> None:
        self.params = params

    def summary(self) -> str:
        """Short human-readable description for leaderboards."""
        return self.name


# --------------------------------------------------------------------------- masking
@dataclass(frozen=True)
class Mask:
    """Which patches each sample hides. ``mask`` is 1 where a patch is masked (hidden).

    ``ids_keep`` lists the visible patches first in the order the encoder sees them;
    ``ids_restore`` is the inverse of the permutation ``[visible..., masked...]``, so
    gathering ``[visible tokens, mask tokens]`` with it restores patch order.
    """

    ids_keep: Tensor  # (B, K) int64 indices of visible patches, in encoder order
    ids_restore: Tensor  # (B, L) int64 inverse permutation, to put tokens back in patch order
    mask: Tensor  # (B, L) float, 1 = masked, 0 = visible

    def rows(self, index: slice) -> Mask:
        """The masks of some rows of the batch (a data-parallel rank's share)."""
        return Mask(self.ids_keep[index], self.ids_restore[index], self.mask[index])

    def validate(self, batch_size: int, num_patches: int, full: bool = True) -> None:
        """Raise ``ValueError`` saying what is wrong unless this is a consistent mask for
        ``batch_size`` images of ``num_patches`` patches (``full``: check values too)."""
        b, n = batch_size, num_patches
        for name, t, dtypes in (
            ("ids_keep", self.ids_keep, (torch.int64,)),
            ("ids_restore", self.ids_restore, (torch.int64,)),
            ("mask", self.mask, (torch.float32, torch.float16, torch.bfloat16, torch.float64)),
        ):
            if not isinstance(t, Tensor) or t.ndim != 2 or t.dtype not in dtypes:
                shown = f"{tuple(t.shape)} {t.dtype}" if isinstance(t, Tensor) else type(t)
                raise ValueError(f"Mask.{name} must be a 2-D {dtypes[0]} tensor, got {shown}")
        k = self.ids_keep.shape[1]
        if self.ids_keep.shape[0] != b or {self.ids_restore.shape, self.mask.shape} != {(b, n)}:
            raise ValueError(
                f"Mask shapes ids_keep {tuple(self.ids_keep.shape)}, ids_restore "
                f"{tuple(self.ids_restore.shape)}, mask {tuple(self.mask.shape)} do not fit "
                f"{b} images of {n} patches: expected (B, K), (B, L), (B, L)"
            )
        if not 0 < k <= n:
            raise ValueError(f"Mask keeps {k} of {n} patches: at least one must stay visible")
        if not full:
            return
        patches = torch.arange(n, device=self.ids_restore.device).expand(b, n)
        if not torch.equal(self.ids_restore.sort(dim=1).values, patches):
            raise ValueError("Mask.ids_restore is not a permutation of the patches in every row")
        if not torch.all((self.mask == 0) | (self.mask == 1)) or not torch.all(
            self.mask.sum(dim=1) == n - k
        ):
            raise ValueError(f"Mask.mask must hold exactly {n - k} ones (masked) per row")
        if torch.any(self.mask.gather(1, self.ids_keep) != 0):
            raise ValueError("Mask.ids_keep lists patches that Mask.mask marks as masked")
        order = torch.argsort(self.ids_restore, dim=1)  # [visible..., masked...] in patch ids
        if not torch.equal(order[:, :k], self.ids_keep):
            raise ValueError("Mask.ids_restore does not put the ids_keep patches first")


class MaskingStrategy(Component, ABC):
    """Chooses which patches to hide, possibly depending on training progress in [0, 1]."""

    kind: ClassVar[str] = "masking"

    @abstractmethod
    def ratio_at(self, progress: float) -> float:
        """Mask ratio at ``progress`` (0 = start of pretraining, 1 = end)."""

    def check_grid(self, grid: tuple[int, int]) -> None:
        """Raise ``ValueError`` if this strategy cannot mask a ``(rows, cols)`` patch grid
        (e.g. blocks larger than the grid); called at validation with each model's grid."""
        return  # any grid: uniform masking fits every geometry

    def __call__(
        self,
        batch_size: int,
        grid: tuple[int, int],
        *,
        progress: float = 1.0,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> Mask:
        """Draw masks for ``batch_size`` images of a ``(rows, cols)`` patch grid (patches in
        row-major order); the default hides a uniformly random ``ratio_at(progress)``.

        ``grid`` may also be a patch count, as the previous contract passed it (a subclass
        written then may still hand its count on to this default)."""
        num_patches = grid if isinstance(grid, int) else grid[0] * grid[1]
        ratio = _mask_ratio(self, progress)
        ids_keep, ids_restore, mask = random_mask(
            batch_size, num_patches, ratio, generator=generator, device=device
        )
        return Mask(ids_keep, ids_restore, mask)


def _mask_ratio(masking: MaskingStrategy, progress: float) -> float:
    """``masking.ratio_at(progress)`` as a float in [0, 1]; a ``ValueError`` naming the
    strategy for anything else (NaN included)."""
    ratio = masking.ratio_at(progress)
    try:
        value = float(ratio)
    except (TypeError, ValueError):
        value = math.nan
    if not 0 <= value <= 1:
        raise ValueError(
            f"masking {masking.name!r}: ratio_at({progress:g}) returned {ratio!r}, "
            "not a mask ratio in [0, 1]"
        )
    return value


_TAKES_PATCH_COUNT: dict[type, bool] = {}  # strategy class -> follows the previous contract


def _takes_patch_count(cls: type) -> bool:
    """True when ``cls.__call__`` follows the previous masking contract,
    ``__call__(batch_size, num_patches, *, progress, generator, device)``: its second
    argument is named ``num_patches`` or annotated ``int``."""
    try:
        parameters = list(inspect.signature(cls.__call__).parameters.values())[1:]  # no self
    except (TypeError, ValueError):  # no signature to read: call it as documented now
        return False
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    arguments = [p for p in parameters if p.kind in positional]
    if len(arguments) < 2:
        return False
    second = arguments[1]
    return second.name == "num_patches" or second.annotation in (int, "int")


def call_masking(
    masking: MaskingStrategy,
    batch_size: int,
    grid: tuple[int, int],
    *,
    progress: float,
    generator: torch.Generator | None,
    device: torch.device | str | None,
) -> Any:
    """What ``masking`` returns for ``batch_size`` images of a ``(rows, cols)`` ``grid``: the
    one place the core calls a masking strategy (unchecked: see ``mae_bench.train.draw_mask``).

    A strategy written against the previous contract, ``__call__(batch_size, num_patches,
    *, progress, generator, device)``, is given the patch count it expects, with one
    deprecation warning (a :class:`MaeBenchWarning`) per class naming it and what to change.
    """
    cls = type(masking)
    if cls not in _TAKES_PATCH_COUNT:
        _TAKES_PATCH_COUNT[cls] = _takes_patch_count(cls)
        if _TAKES_PATCH_COUNT[cls]:
            warnings.warn(
                f"masking {masking.name!r} ({cls.__module__}.{cls.__qualname__}) follows the "
                "previous masking contract, __call__(batch_size, num_patches, ...) taking a "
                "patch count; it is deprecated and still called that way for now: change it to "
                "__call__(self, batch_size, grid, *, progress, generator, device), where grid "
                "is the (rows, cols) patch grid (rows * cols patches, row-major; see "
                "docs/plugins.md, Masking strategies)",
                MaeBenchWarning,
                stacklevel=2,
            )
    shape: tuple[int, int] | int = grid[0] * grid[1] if _TAKES_PATCH_COUNT[cls] else grid
    return masking(batch_size, shape, progress=progress, generator=generator, device=device)


# --------------------------------------------------------------------------- encoders
@dataclass(frozen=True)
class MAEOutput:
    """What one masked-autoencoder forward pass returns.

    ``predicted``: for a model that predicts only some of the masked patches (CrossMAE's
    partial reconstruction), 1 where ``pred`` holds a prediction the loss reads; None (the
    default) means every masked patch. Losses average over ``predicted`` instead of the mask.
    """

    pred: Tensor  # (B, L, pred_dim) a prediction per patch: p*p*C pixels, or the target's
    latent: Tensor  # (B, prefix + K, D) encoder tokens (of every patch, for an encoder that
    # sees mask tokens)
    predicted: Tensor | None = None  # (B, L) float, 1 = a prediction the loss reads


class MaskedAutoencoder(nn.Module, Component, ABC):
    """A masked autoencoder: ``encoder`` sees only visible patches, ``decoder`` fills the rest.

    Subclasses set ``patch_size``, ``embed_dim``, ``num_prefix_tokens`` (1 with a cls token)
    and the ``encoder`` / ``decoder`` submodules (saved as separate weight files). By default
    they are called as ``encoder(imgs, ids_keep)`` and ``decoder(latent, ids_restore)``;
    override :meth:`forward_encoder` / :meth:`forward_decoder` for other signatures.
    """

    kind: ClassVar[str] = "encoder"

    patch_size: int
    embed_dim: int
    num_prefix_tokens: int = 0
    encoder: nn.Module
    decoder: nn.Module

    def __init__(self, params: Params, *, image_size: int, in_chans: int) -> None:
        nn.Module.__init__(self)
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

    @property
    def grid(self) -> tuple[int, int]:
        """The patch grid, (rows, cols)."""
        return self.grid_size, self.grid_size

    def forward_encoder(self, imgs: Tensor, ids_keep: Tensor) -> Tensor:
        """Encode only the patches ``ids_keep`` of ``imgs``: (B, prefix + K, D)."""
        return self.encoder(imgs, ids_keep)

    def forward_decoder(self, latent: Tensor, ids_restore: Tensor) -> Tensor:
        """Predict every patch from the visible tokens: (B, L, pred_dim)."""
        return self.decoder(latent, ids_restore)

    # ----------------------------------------------------------- the prediction head
    @property
    def pred_dim(self) -> int:
        """Values predicted per patch: p*p*C pixels, unless :meth:`reset_head` set another
        width (a target's, e.g. HOG histograms or a teacher's features)."""
        return getattr(self, "_pred_dim", None) or self.patch_size**2 * self.in_chans

    def reset_head(self, dim: int) -> None:
        """Predict ``dim`` values per patch: the head is replaced by a freshly initialised one
        (as timm's ``reset_classifier``). By default the decoder's ``pred`` linear layer
        (the built-in decoders'); override for a head built otherwise. ``ValueError`` when
        there is none to replace (the model can then only predict pixels)."""
        head = getattr(self.decoder, "pred", None)
        if not isinstance(head, nn.Linear):
            raise ValueError(
                f"encoder {self.name!r} ({type(self).__module__}.{type(self).__qualname__}) "
                f"predicts {self.pred_dim} pixel values per patch and has no decoder.pred linear "
                f"layer to predict {dim} target values instead: override reset_head(dim)"
            )
        new = nn.Linear(head.in_features, dim, bias=head.bias is not None)
        nn.init.xavier_uniform_(new.weight)
        if new.bias is not None:
            nn.init.zeros_(new.bias)
        self.decoder.pred = new.to(head.weight.device)
        self._pred_dim = dim

    def size_head(self, target: Target) -> None:
        """Predict ``target``'s width (:meth:`Target.dim`): a fresh head
        (:meth:`reset_head`) only when it differs from the head's."""
        dim = target.dim(self)
        if dim != self.pred_dim:
            self.reset_head(dim)

    def pool(self, latent: Tensor, pool: Pool = "cls") -> Tensor:
        """One vector per sample: the cls token if there is one and asked for, else the mean."""
        if pool == "cls" and self.num_prefix_tokens > 0:
            return latent[:, 0]
        return latent[:, self.num_prefix_tokens :].mean(dim=1)

    def forward(self, imgs: Tensor, mask: Mask) -> MAEOutput:
        """Encode the visible patches, decode all of them: ``MAEOutput(pred, latent)``."""
        latent = self.forward_encoder(imgs, mask.ids_keep)
        if latent.ndim != 3 or latent.shape[-1] != self.embed_dim:
            raise ValueError(
                f"encoder {self.name!r} ({type(self).__module__}.{type(self).__qualname__}) "
                f"returned tokens of shape {tuple(latent.shape)}, expected (B, prefix + K, "
                f"{self.embed_dim}) (its embed_dim)"
            )
        pred = self.forward_decoder(latent, mask.ids_restore)
        return MAEOutput(pred=pred, latent=latent)

    # ----------------------------------------------------------- what the model knows of itself
    def no_weight_decay(self) -> set[str]:
        """Qualified names of the parameters trained without weight decay (tokens, positions).

        By default the union of ``encoder.no_weight_decay()`` and ``decoder.no_weight_decay()``
        (timm's convention, names relative to the submodule) where they define it; 1-D
        parameters (biases, norms) never get weight decay anyway.
        """
        names = set()
        for part in ("encoder", "decoder"):
            module = getattr(self, part, None)
            if module is not None and hasattr(module, "no_weight_decay"):
                names |= {f"{part}.{n}" for n in module.no_weight_decay()}
        return names

    def param_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        """AdamW groups of the whole model for pretraining: weight decay except on
        ``no_weight_decay()`` and 1-D parameters."""
        return weight_decay_param_groups(self, weight_decay, self.no_weight_decay())

    def encoder_param_groups(self, weight_decay: float, layer_decay: float) -> list[dict[str, Any]]:
        """AdamW groups of the encoder alone for fine-tuning, each with an ``lr_scale``:
        the official MAE's layer-wise decay over the stem and blocks of the encoder's
        timm-style ``group_matcher``, its final norm at scale 1 (see
        :func:`mae_bench.layers.layer_decay_param_groups`; one scale, 1, without one)."""
        return layer_decay_param_groups(self.encoder, weight_decay, layer_decay)

    def drop_final_norm(self) -> bool:
        """Remove, in place, the normalisation the encoder applies to its output tokens, so
        ``forward_encoder`` returns them unnormalized; True when there was one.

        For the official MAE's global-pool fine-tuning head, which replaces that norm with
        its own ``fc_norm`` on the mean of the patch tokens; call it on a copy
        (``without_decoder()``). By default an encoder's ``norm`` submodule (timm's ViTs
        and the built-in ``vit``) becomes an identity; override for encoders built
        otherwise (return False when yours has no final norm).
        """
        norm = getattr(self.encoder, "norm", None)
        if not isinstance(norm, nn.Module) or isinstance(norm, nn.Identity):
            return False
        self.encoder.norm = nn.Identity()
        return True

    def set_drop_path(self, rate: float) -> None:
        """Stochastic depth on the encoder's timm ``Block``s, rising linearly to ``rate`` at the
        last block; override for encoders built from other blocks."""
        set_block_drop_path(self.encoder, rate)

    def without_decoder(self) -> MaskedAutoencoder:
        """A deep copy holding the encoder only (for fine-tuning: the decoder is not trained)."""
        clone = copy.deepcopy(self)
        clone.decoder = None
        return clone

    def adapt_state_dict(self, state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
        """Map a checkpoint of another layout (e.g. an official release) to this model's
        ``state_dict`` keys; by default the keys are taken as they are."""
        return state_dict

    def export_state_dict(self, fmt: str) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """The encoder's weights in another library's layout, and the keyword arguments that
        build the matching model there (``timm.create_model(**kwargs)`` for ``timm``).

        Raise ``ValueError`` for a format the model cannot be exported to.
        """
        raise ValueError(f"the {self.name!r} encoder cannot be exported to {fmt!r}")

    def forward_features(self, imgs: Tensor, pool: Pool = "cls") -> Tensor:
        """Frozen-feature extraction for probes: every patch visible, pooled to (B, D)."""
        ids_all = torch.arange(self.num_patches, device=imgs.device).expand(imgs.shape[0], -1)
        return self.pool(self.forward_encoder(imgs, ids_all), pool)


# --------------------------------------------------------------------------- losses
def _mean_pool(latent: Tensor, pool: Pool) -> Tensor:
    return latent.mean(dim=1)


@dataclass(frozen=True)
class LossInputs:
    """Everything a loss may look at for one batch.

    ``mask`` is what the loss averages over: the masked patches, or those of them the model
    predicted (``MAEOutput.predicted``). ``target`` is what ``pred`` is compared with: the
    variant's :class:`Target` (computed once per batch), by default the input's patches."""

    imgs: Tensor  # (B, C, H, W) normalized model input
    pred: Tensor  # (B, L, pred_dim)
    mask: Tensor  # (B, L), 1 = masked (and predicted)
    latent: Tensor  # (B, prefix + K, D) encoder tokens of the visible patches
    patch_size: int
    pooler: Callable[[Tensor, Pool], Tensor] = _mean_pool  # the model's ``pool``
    given_target: Tensor | None = None  # (B, L, pred_dim) the variant's target, if it has one
    partial: bool = False  # the model predicted only the patches of ``mask``: ``pred`` holds
    # nothing elsewhere (a loss over "every patch" then means every predicted one)

    @cached_property
    def target(self) -> Tensor:
        """What ``pred`` is trained to be, (B, L, pred_dim): the variant's target, or the
        input cut into patches, (B, L, p*p*C) (the default: pixels)."""
        if self.given_target is not None:
            return self.given_target
        return patchify(self.imgs, self.patch_size)

    def embedding(self, pool: Pool = "mean") -> Tensor:
        """(B, D) encoder embedding of the visible patches, pooled as the model pools."""
        return self.pooler(self.latent, pool)


class Loss(Component, ABC):
    """A training objective term; a variant sums several, each with a ``weight``."""

    kind: ClassVar[str] = "loss"
    depends_on_batch: ClassVar[bool] = False
    """True for a statistic of the whole batch (e.g. ``uniformity``'s pairs): its objective
    changes with what changes the batch it sees (``accum_iter``, data-parallel processes)."""
    reads_images: ClassVar[bool] = False
    """True for a term that reads ``pred`` as an image (unpatchifies it, e.g. a Laplacian
    filter): it needs pixel predictions, and a variant whose target is not pixels is refused."""

    @property
    def prediction_space(self) -> str | None:
        """What this loss trains ``pred`` to be: ``"pixels"`` (the patches of the normalized
        input, the default), another name (``"norm_pix"``: per-patch normalized pixels), or
        None for a term that does not read ``pred`` (a regularizer). The losses of one variant
        must agree; a suite mixing spaces is refused at validation."""
        return "pixels"

    def to_input_space(self, pred: Tensor, target: Tensor, mask: Tensor) -> Tensor:
        """Map ``pred`` (B, L, p*p*C) to the normalized input space, for reconstruction
        metrics and pictures. ``target`` is the input patchified; only its visible patches
        (``mask`` 0) may be used: a masked patch's content is what is being predicted."""
        return pred

    @abstractmethod
    def __call__(self, inputs: LossInputs) -> Tensor:
        """A scalar loss for the batch."""


def prediction_loss(losses: list[Loss]) -> Loss | None:
    """The first of a variant's losses that reads ``pred``: it says what predictions mean and
    maps them back to the input space. ``ValueError`` if the losses disagree on it."""
    readers = [loss for loss in losses if loss.prediction_space is not None]
    spaces = {loss.summary(): loss.prediction_space for loss in readers}
    if len(set(spaces.values())) > 1:
        described = ", ".join(f"{name} trains them as {space}" for name, space in spaces.items())
        raise ValueError(
            f"the loss terms disagree on what the model predicts ({described}); "
            "use terms of one prediction space"
        )
    return readers[0] if readers else None


# --------------------------------------------------------------------------- targets
class Target(Component, ABC):
    """What the model predicts for each patch (``target:`` on a variant): normalised pixels,
    HOG histograms (MaskFeat), a teacher's features (data2vec), ... Without one a variant
    predicts the input's pixels (``LossInputs.target``).

    The model's head is sized by :meth:`dim` (``MaskedAutoencoder.reset_head``); losses
    compare ``pred`` with what :meth:`__call__` returns. A target with per-step state (an
    exponential moving average of the student) builds it in :meth:`setup`, updates it in
    :meth:`after_step` (after each optimizer step) and saves it with the pretraining
    checkpoint through :meth:`state_dict` / :meth:`load_state_dict`, so a cell resumes
    exactly.
    """

    kind: ClassVar[str] = "target"
    predicts_pixels: ClassVar[bool] = False
    """True when predictions are the input's patches, maybe normalised (:meth:`to_input_space`
    maps them back): reconstruction PSNR applies."""

    @property
    def prediction_space(self) -> str:
        """What predictions are, as losses name it: ``"pixels"`` only for the input's patches
        as they are (a loss that reads ``pred`` as an image needs that); by default the
        target's name."""
        return self.name

    def dim(self, model: MaskedAutoencoder) -> int:
        """Values per patch the model predicts (its head's width); by default p*p*C pixels."""
        return model.patch_size**2 * model.in_chans

    def setup(self, model: MaskedAutoencoder) -> None:
        """Called once per pretraining run with the student, built, initialised and on its
        device, before training starts or resumes (a teacher copies it here)."""

    @abstractmethod
    def __call__(self, imgs: Tensor, mask: Mask, model: MaskedAutoencoder) -> Tensor:
        """The target of every patch, (B, L, dim), for the normalized input ``imgs``
        (B, C, H, W) and its ``mask``; no gradient flows into it."""

    def to_input_space(self, pred: Tensor, patches: Tensor, mask: Tensor) -> Tensor | None:
        """``pred`` mapped to the normalized input's patches (B, L, p*p*C) for reconstruction
        metrics and pictures (only the visible patches of ``patches`` may be used), or None
        when predictions are not pixels (no PSNR then: :meth:`reconstruction_metrics`)."""
        return None

    def metrics(self) -> dict[str, Metric]:
        """The metrics :meth:`reconstruction_metrics` reports, by name (none by default)."""
        return {}

    def reconstruction_metrics(
        self, pred: Tensor, target: Tensor, mask: Tensor
    ) -> dict[str, float]:
        """A target's own measure of the held-out reconstruction: ``pred`` and ``target``
        (B, L, dim) on the reconstruction evaluator's fixed images and masks (``mask``
        (B, L), 1 = masked); named as in :meth:`metrics`."""
        return {}

    def after_step(self, model: MaskedAutoencoder, progress: float) -> None:
        """Called after each optimizer step of pretraining, ``progress`` in (0, 1] the share
        of steps done (an EMA teacher follows the student here)."""

    def state_dict(self) -> dict[str, Any]:
        """Per-run state to checkpoint (tensors and numbers); none by default."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""


# --------------------------------------------------------------------------- datasets
class Images(Protocol):
    """Stored images as the core reads them: a uint8 (N, C, H, W) tensor, a memory-mapped one,
    or anything with this interface (e.g. :class:`mae_bench.data.ConcatImages`)."""

    dtype: torch.dtype
    ndim: int
    shape: torch.Size

    def __len__(self) -> int: ...

    def __getitem__(self, index: Any) -> Tensor: ...


@dataclass
class ImageData:
    """A dataset's splits as uint8 images (N, C, H, W) and int64 labels.

    Images may be memory-mapped tensors (``torch.from_numpy(np.memmap(...))``) or a
    :class:`mae_bench.data.ConcatImages`; the core only takes ``len()`` and index-tensor
    batches of them.
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
                raise ValueError(
                    f"{split} must be a uint8 (N, C, H, W) tensor, got {images.dtype} of shape "
                    f"{tuple(images.shape)}"
                )
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


class Dataset(Component, ABC):
    """Loads a dataset's pretraining and labelled splits."""

    kind: ClassVar[str] = "dataset"

    @property
    def pretrain_sees_test(self) -> bool:
        """True when the pretraining images (which also fit the normalisation) include the
        test images: results are then optimistic, warned about and marked in leaderboards."""
        return False

    @abstractmethod
    def load(self) -> ImageData:
        """Read the data; raise ``mae_bench.UserError`` naming the file if it is missing."""


# --------------------------------------------------------------------------- evaluators
@dataclass(frozen=True)
class Metric:
    """How a metric an evaluator reports is shown and ranked."""

    description: str
    higher_is_better: bool = True
    fmt: str = "{:.3f}"  # display format of its mean and std
    headline: bool = False  # a column of the Markdown leaderboard
    summary: str | None = None  # an unprefixed summary column it can fill (e.g. "f1_macro")
    compare: bool = True  # its best value is marked in leaderboards
    flag: str | None = None  # a 0/1 metric: variants below 1 are marked, with this note
    bounds: tuple[float | None, float | None] = (None, None)  # its range, e.g. (0, 1): drawn
    # intervals are clipped to it

    def as_dict(self) -> dict[str, Any]:
        """Plain data, stored with each result so tables render without the plugin."""
        return {
            "description": self.description,
            "higher_is_better": self.higher_is_better,
            "fmt": self.fmt,
            "headline": self.headline,
            "summary": self.summary,
            "compare": self.compare,
            "flag": self.flag,
            "bounds": list(self.bounds),
        }


class Feeder(Protocol):
    """Turns stored uint8 images into model input on ``device`` (``mae_bench.data.ImageFeeder``)."""

    device: torch.device
    image_size: int
    channels: int

    def __call__(self, images: Tensor) -> Tensor:
        """A batch of stored images as normalized model input (B, C, H, W) on ``device``."""
        ...

    def to_pixels(self, x: Tensor) -> Tensor:
        """Normalized input back to [0, 1] pixels."""
        ...


class Features(Protocol):
    """A cell's frozen features, extracted once per pooling
    (``mae_bench.evaluate.FeatureCache``)."""

    def get(self, pool: Pool) -> tuple[Tensor, Tensor]:
        """(train, test) features with ``pool`` pooling, (N, D) each."""
        ...


@dataclass
class EvalContext:
    """What an evaluator receives for one cell.

    ``model`` is on ``feeder.device`` in eval mode: evaluate it as it is, and train only a copy
    (``model.without_decoder()``), so the stored pretrained weights stay untouched.
    ``features`` gives the frozen (train, test) features by pooling, extracted once per cell
    and shared by every evaluator.
    """

    model: MaskedAutoencoder
    data: ImageData
    feeder: Feeder
    features: Features
    seed: int
    baseline: bool  # a no-pretraining cell: the model is at its random init
    decoder_loss: Loss | None  # maps the model's predictions to pixels (reconstruction)
    masking: MaskingStrategy | None  # the variant's own masking (None on baselines)
    mean_image: Tensor  # mean pretraining image in [0, 1] pixels, (C, H, W)
    thresholds: list[float]  # the suite's decision thresholds for threshold tables
    # this evaluation's checkpoint file (mae_bench.resume.Checkpoint), for evaluators that
    # train long: load() at the start, epoch_end() after each epoch (see docs/plugins.md)
    checkpoint: Any = None
    # the variant's target (None: the model predicts pixels); when it does not predict
    # pixels (``predicts_pixels`` False) there is no PSNR, only the target's own metrics.
    # It is not set up (no teacher): a target with per-run state cannot be called here
    target: Target | None = None

    @property
    def device(self) -> torch.device:
        """Where the model is."""
        return self.feeder.device


@dataclass
class EvalResult:
    """What an evaluator returns: metrics named as in ``Evaluator.metrics()``, tables written
    as ``<name>.csv`` beside the cell's result, an optional confusion matrix, and ``sanity``:
    plain facts that say how far its figures can be trusted (split sizes, chance level, an
    accuracy's resolution ``1 / n_test``, and ``warnings``: sentences about a figure below its
    floor or a test set too small to separate variants), stored with the result and shown
    on the page."""

    metrics: dict[str, float]
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    confusion: list[list[int]] | None = None
    sanity: dict[str, Any] = field(default_factory=dict)


class TablePlot:
    """A figure an evaluator draws from one of its tables across a suite's variants, written
    to ``plots/<name>.png`` and shown in ``report.html`` (see ``Evaluator.plots``).

    ``draw`` receives ``tables``: per leaderboard row (variant name, in result order) its
    ``table``, from the cell of its lowest seed (``seeds = "lowest"``) or from every seed,
    stacked with a ``seed`` column (``seeds = "all"``). A no-pretraining cell's table is
    under its ``scratch`` row when the evaluator trains the encoder, else under the variant.
    The tables named in ``also`` (others of the same evaluation) come as keyword arguments,
    ``{row: table}`` from the same cells. Matplotlib and seaborn are imported by the caller;
    override ``figure`` instead of ``draw`` for a figure of several panels.
    """

    name: str = ""  # file stem: plots/<name>.png
    table: str = ""  # the evaluator's table it reads (a key of ``EvalResult.tables``)
    title: str = ""
    also: tuple[str, ...] = ()
    seeds: Literal["lowest", "all"] = "lowest"
    size: tuple[float, float] = (7.0, 4.0)  # inches
    variant_panel: bool = False  # also a small panel per variant in report.html

    def draw(
        self, ax: Any, tables: dict[str, pd.DataFrame], **also: dict[str, pd.DataFrame]
    ) -> bool | None:
        """Draw on ``ax`` (a matplotlib ``Axes``, titled); False: nothing to draw, no file."""
        raise NotImplementedError(f"{type(self).__name__} draws nothing: define draw()")

    def figure(self, tables: dict[str, pd.DataFrame], **also: dict[str, pd.DataFrame]) -> Any:
        """The whole matplotlib ``Figure`` (one ``size`` axes, ``draw`` on it), or None."""
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=self.size)
        ax.set_title(self.title)
        if self.draw(ax, tables, **also) is False:
            plt.close(fig)
            return None
        return fig

    def draw_variant(self, ax: Any, table: pd.DataFrame) -> None:
        """With ``variant_panel``: one variant's small panel in report.html, from ``table``
        (each of its seeds' tables, stacked, with a ``seed`` column)."""
        raise NotImplementedError(f"{type(self).__name__}: define draw_variant()")


@dataclass(frozen=True)
class TrainingStep:
    """One training step of an evaluator that trains (fine-tuning), for the memory pre-check:
    ``module`` is what it trains (its weights, their gradients and AdamW's two moments are
    counted), called on a batch of ``batch_size`` normalized images; ``loss`` turns its
    output into the scalar whose backward pass the step runs."""

    module: nn.Module
    batch_size: int
    loss: Callable[[Tensor], Tensor]


class Evaluator(Component, ABC):
    """An evaluation protocol run on every cell (linear probe, k-NN, fine-tuning, ...).

    A suite enables it as ``eval: {<name>: {<params>}}`` (``enabled: false`` turns a default
    one off). ``metrics()`` names and describes everything ``evaluate`` returns; leaderboards
    take names, directions and formats from there.
    """

    kind: ClassVar[str] = "evaluator"
    enabled_by_default: ClassVar[bool] = False  # runs on suites that do not mention it
    needs_pretraining: ClassVar[bool] = False  # skipped on no-pretraining baselines
    trains_encoder: ClassVar[bool] = False  # measures a trained copy: baselines' `scratch` row
    summary_priority: ClassVar[int] = 100  # lower fills the unprefixed summary columns first
    run_only: ClassVar[frozenset[str]] = frozenset()
    """Params that change how an evaluation runs, not what it computes (``compile``): left
    out of its key, so switching them reuses stored results."""

    @abstractmethod
    def metrics(self) -> dict[str, Metric]:
        """The metrics ``evaluate`` reports with these params, by name (e.g. ``knn_acc``)."""

    @abstractmethod
    def evaluate(self, ctx: EvalContext) -> EvalResult:
        """Evaluate one cell's model."""

    def plots(self) -> list[TablePlot]:
        """Figures drawn from this evaluator's tables (``plots/``, report.html); none by default."""
        return []

    def training_step(self, model: MaskedAutoencoder, num_classes: int) -> TrainingStep | None:
        """For the memory pre-check, the step this evaluator trains with, built around
        ``model`` (on the meta device: shapes only), or None (the default) for one that
        trains nothing big (a probe on cached features)."""
        return None


# --------------------------------------------------------------------------- loggers
class Logger(Component):
    """Observes a run (TensorBoard, Weights & Biases, ...): told of the run's start, each
    cell, each pretraining epoch, each evaluation and the end. Every method is optional.

    Raise ``ValueError`` in the constructor when the logger cannot work (a missing package):
    validation reports it against the suite's ``loggers`` entry before anything runs. An
    exception in a method is reported once and that logger is switched off; the run goes on.
    """

    kind: ClassVar[str] = "logger"

    def start_run(self, suite: str, root: Any, config: dict[str, Any]) -> None:
        """A suite run starts, writing under ``root`` (a ``pathlib.Path``)."""

    def start_cell(self, cell_id: str, config: dict[str, Any]) -> None:
        """A cell starts: its id and resolved config."""

    def log_epoch(self, cell_id: str, epoch: int, row: dict[str, float]) -> None:
        """One pretraining epoch of a cell: its loss terms, mask ratio and learning rate."""

    def log_evaluation(self, cell_id: str, evaluator: str, metrics: dict[str, float]) -> None:
        """One evaluation of a cell finished with these metrics."""

    def end_cell(self, cell_id: str, metrics: dict[str, float]) -> None:
        """A cell finished, with all its metrics."""

    def end_run(self) -> None:
        """The run ends (also after a failure or an interruption)."""
