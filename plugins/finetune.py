"""Fine-tuning protocol: the pretrained encoder plus a linear head, trained end to end."""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import numpy as np
import pandas as pd
import torch
from pydantic import Field, NonNegativeFloat, PositiveFloat, PositiveInt, model_validator
from timm.optim import param_groups_weight_decay
from torch import Tensor, nn
from torch.nn import functional as F
from torchvision.transforms.v2 import functional as tvF

from mae_bench import EvalContext, EvalResult, Evaluator, Metric, Params, hookimpl, resume
from mae_bench.contract import ImageData, MaskedAutoencoder, Pool, TablePlot, TrainingStep
from mae_bench.data import ImageFeeder, index_batches, to_device
from mae_bench.device import Compiled, autocast, optimizer_options
from mae_bench.evaluate import classifier_sanity
from mae_bench.layers import LayerNorm
from mae_bench.metrics import classification_metric_info, classification_metrics, confusion
from mae_bench.resume import Checkpoint, numpy_state, rng_state, set_numpy_state, set_rng_state
from mae_bench.suite import AugmentConfig
from mae_bench.train import lr_at

FINETUNE_TABLE = "finetune"  # per epoch: training loss, validation and test scores


OFFICIAL_RANDAUGMENT = "rand-m9-mstd0.5-inc1"
"""timm's RandAugment as the official MAE fine-tuning uses it (``--aa``)."""
Head = Literal["extra_norm", "official"]
UnitInterval = Annotated[float, Field(gt=0, le=1)]


class FinetuneAugment(Params):
    """Per-image augmentation of fine-tuning batches, in the official recipe's order
    (``util/datasets.py:build_transform``), each batched on the device: random resized crop
    and horizontal flip (bilinear resampling where the official uses bicubic), timm's
    RandAugment (``randaugment``: its config string; :func:`rand_augment`), the
    normalisation, then timm's RandomErasing in ``pixel`` mode, one box, with probability
    ``reprob``. Every random draw comes from the cell's generator.
    """

    crop_scale: tuple[UnitInterval, UnitInterval] | None = None  # area fraction; None: no crop
    crop_ratio: tuple[PositiveFloat, PositiveFloat] = (3 / 4, 4 / 3)
    hflip: bool = False
    randaugment: str | None = None  # e.g. "rand-m9-mstd0.5-inc1" (timm's config string)
    reprob: Annotated[float, Field(ge=0, lt=1)] = 0.0

    @model_validator(mode="after")
    def _valid(self) -> FinetuneAugment:
        if self.crop_scale and self.crop_scale[0] > self.crop_scale[1]:
            raise ValueError("crop_scale must be (min, max)")
        if self.crop_ratio[0] > self.crop_ratio[1]:
            raise ValueError("crop_ratio must be (min, max)")
        if self.randaugment is not None:
            try:
                timm_rand_augment(self.randaugment)
            except ValueError as exc:
                raise ValueError(f"randaugment {exc}") from None
        return self

    @property
    def crop(self) -> AugmentConfig:
        """The crop and flip part, as the feeder applies them."""
        return AugmentConfig(crop_scale=self.crop_scale, crop_ratio=self.crop_ratio,
                             hflip=self.hflip)  # fmt: skip


OFFICIAL_RECIPE: dict[str, Any] = {
    "augment": {
        "crop_scale": (0.08, 1.0),
        "crop_ratio": (3 / 4, 4 / 3),
        "hflip": True,
        "randaugment": OFFICIAL_RANDAUGMENT,
        "reprob": 0.25,
    },
    "mixup": 0.8,
    "cutmix": 1.0,
    "label_smoothing": 0.1,
    "drop_path": 0.1,
    "layer_decay": 0.75,
    "blr": 5e-4,
    "weight_decay": 0.05,
    "warmup_epochs": 5.0,
    "min_lr": 1e-6,
    "head": "official",
    "pool": "mean",
}
"""``recipe: official``: the defaults of facebookresearch/mae ``main_finetune.py`` (ViT-B)."""


class FinetuneParams(Params):
    """End-to-end fine-tuning with a linear head on a (stratified, per-seed) label fraction.

    AdamW, linear warmup then cosine; ``layer_decay`` < 1 scales the lr of each encoder
    layer as the official MAE does (the last block ``layer_decay``, the final norm and the
    head 1); ``drop_path`` is the stochastic-depth rate of the last block (linearly
    increasing from 0). ``blr`` sets the lr by the official rule, lr = blr x batch_size / 256.

    ``recipe: official`` fills every setting the suite leaves out with the official MAE
    recipe (:data:`OFFICIAL_RECIPE`: crop 0.08-1, flip, RandAugment m9, erasing 0.25, mixup
    0.8, cutmix 1.0, smoothing 0.1, drop path 0.1, layer decay 0.75, blr 5e-4, weight decay
    0.05, 5 warmup epochs, the official head); the budget and batch size stay the suite's.
    ``head: official`` is the official classifier: with mean pooling the encoder's final
    norm is replaced by ``fc_norm`` (LayerNorm, eps 1e-6) on the mean of the patch tokens;
    with cls pooling the encoder's norm, the cls token, no other norm. ``head: extra_norm``
    (this project's earlier head) adds a LayerNorm (eps 1e-5) after the encoder's norm.
    """

    recipe: Literal["custom", "official"] = "custom"
    epochs: PositiveInt = 30
    batch_size: PositiveInt = 64
    lr: PositiveFloat = 1e-3
    blr: PositiveFloat | None = None
    min_lr: NonNegativeFloat = 1e-6
    weight_decay: NonNegativeFloat = 0.05
    warmup_epochs: NonNegativeFloat = 3.0
    layer_decay: UnitInterval = 1.0
    drop_path: Annotated[float, Field(ge=0, lt=1)] = 0.0
    label_fraction: UnitInterval = 1.0
    pool: Literal["cls", "mean"] = "mean"
    head: Head = "extra_norm"
    eval_every: PositiveInt = 1  # epochs between test-set scores in the per-epoch history
    steps: PositiveInt | None = None  # a budget in optimizer steps (overrides epochs)
    scratch_epochs: PositiveInt | None = None  # the scratch baseline's own budget
    scratch_steps: PositiveInt | None = None
    val_fraction: Annotated[float, Field(ge=0, lt=1)] = 0.2  # of the labelled subset
    converge_tolerance: NonNegativeFloat = 0.01
    label_smoothing: Annotated[float, Field(ge=0, lt=1)] = 0.0
    mixup: NonNegativeFloat = 0.0  # timm Mixup alpha (0: off)
    cutmix: NonNegativeFloat = 0.0  # timm CutMix alpha (0: off)
    augment: FinetuneAugment = FinetuneAugment()
    # torchvision's RandAugment (2 ops, magnitude 9) on the stored images, before any crop,
    # batched on the device (this project's earlier option; the official one is
    # ``augment.randaugment``)
    randaugment: bool = False
    compile: bool = False  # the training step through torch.compile (run-only: not in the key)

    @model_validator(mode="before")
    @classmethod
    def _recipe_and_lr_rule(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        if data.get("recipe") == "official":
            for key, value in OFFICIAL_RECIPE.items():
                if key == "blr" and data.get("lr") is not None:
                    continue  # the suite's own lr
                if key == "augment" and isinstance(data.get("augment"), dict):
                    data["augment"] = {**value, **data["augment"]}
                else:
                    data.setdefault(key, value)
        if data.get("blr") is not None:
            try:
                lr_rule = float(data["blr"]) * float(data.get("batch_size", 64)) / 256
            except (TypeError, ValueError):
                return data  # the field's own validation names it
            if data.get("lr") is not None and not math.isclose(float(data["lr"]), lr_rule):
                raise ValueError("set lr or blr (lr = blr x batch_size / 256), not both")
            data["lr"] = lr_rule
        return data

    @model_validator(mode="after")
    def _one_randaugment(self) -> FinetuneParams:
        if self.randaugment and self.augment.randaugment:
            raise ValueError("randaugment: true and augment.randaugment both set: choose one")
        return self


class Classifier(nn.Module):
    """An MAE's encoder (all patches visible, pooled), a norm, and a linear head.

    Holds the encoder only (``model.without_decoder()``); the head is created on the
    encoder's device. ``head`` says which norm (see :class:`FinetuneParams`): ``official``
    with mean pooling (or an encoder without a cls token) drops the encoder's final norm
    (``drop_final_norm``) and normalizes the pooled mean with ``fc_norm`` (eps 1e-6), with
    cls pooling it adds none; ``extra_norm`` adds a LayerNorm (eps 1e-5) after the
    encoder's norm. The head's weights start as the official ones (trunc normal, std 2e-5).
    """

    def __init__(
        self, model: MaskedAutoencoder, num_classes: int, pool: Pool, head: Head = "extra_norm"
    ) -> None:
        super().__init__()
        self.model = model.without_decoder()
        self.pool = pool
        device = next(self.model.parameters()).device
        global_pool = pool == "mean" or model.num_prefix_tokens == 0
        self.norm: nn.Module
        if head == "official" and global_pool:
            self.model.drop_final_norm()
            self.norm = LayerNorm(model.embed_dim, device=device)  # the official fc_norm
        elif head == "official":
            self.norm = nn.Identity()
        else:
            self.norm = nn.LayerNorm(model.embed_dim, device=device)
        self.head = nn.Linear(model.embed_dim, num_classes, device=device)
        nn.init.trunc_normal_(self.head.weight, std=2e-5)
        nn.init.zeros_(self.head.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.norm(self.model.forward_features(x, self.pool)))

    def param_groups(self, weight_decay: float, layer_decay: float) -> list[dict[str, object]]:
        """The encoder's own groups (layer-wise lr decay, as the model defines them) and the
        head and its norm at the full lr (no weight decay on 1-D parameters)."""
        head = nn.ModuleDict({"norm": self.norm, "head": self.head})
        top = [{**g, "lr_scale": 1.0} for g in param_groups_weight_decay(head, weight_decay)]
        return [*self.model.encoder_param_groups(weight_decay, layer_decay), *top]


def label_subset(labels: Tensor, fraction: float, seed: int) -> Tensor:
    """Indices of a stratified ``fraction`` of the labelled images, different per seed."""
    if fraction >= 1.0:
        return torch.arange(len(labels))
    from sklearn.model_selection import train_test_split

    y = labels.numpy()
    n_keep = max(round(fraction * len(y)), len(np.unique(y)))
    try:
        keep, _ = train_test_split(
            np.arange(len(y)), train_size=n_keep, stratify=y, random_state=seed
        )
    except ValueError:  # a class too small to stratify
        keep = np.random.default_rng(seed).choice(len(y), n_keep, replace=False)
    return torch.from_numpy(np.sort(keep))


@torch.no_grad()
def predict(classifier: Classifier, images, feeder: ImageFeeder, batch_size: int = 256) -> Tensor:
    """Class probabilities (N, K) on the CPU."""
    classifier.eval()
    out = []
    for idx in index_batches(len(images), batch_size):
        with autocast(feeder.device):
            out.append(classifier(feeder(images[idx])).float().softmax(1).cpu())
    return torch.cat(out)


def split_validation(labels: Tensor, fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """Positions (train, validation) of a ``fraction`` held out of ``labels``, stratified
    when every class can give one; no validation when ``fraction`` is 0 or the subset is too
    small to spare an image."""
    positions = torch.arange(len(labels))
    y = labels.numpy()
    n_val = round(fraction * len(y))
    if n_val < 1 or len(y) - n_val < 1:
        return positions, positions[:0]
    from sklearn.model_selection import train_test_split

    try:
        train, val = train_test_split(positions.numpy(), test_size=n_val, stratify=y,
                                      random_state=seed)  # fmt: skip
    except ValueError:  # too few images to stratify: a plain split
        order = np.random.default_rng(seed).permutation(len(y))
        train, val = order[n_val:], order[:n_val]
    return torch.from_numpy(np.sort(train)), torch.from_numpy(np.sort(val))


def still_rising(scores: list[float], tolerance: float) -> bool | None:
    """True when the held-out score (e.g. validation images right) is still climbing at the
    end: the best of the last quarter of the evaluations beats the best before it by more
    than ``tolerance`` (None with fewer than 4 evaluations)."""
    if len(scores) < 4:
        return None
    q = max(1, len(scores) // 4)
    return max(scores[-q:]) - max(scores[:-q]) > tolerance


def convergence(
    val_scores: list[float], val_labels: Tensor, tolerance: float
) -> tuple[float, float]:
    """(converged, learned) from per-epoch validation accuracies, as 0/1 or NaN.

    Counted in validation images right, so no float rounding decides a one-image gain; a
    gain counts only above ``tolerance`` (a fraction of the split) and above one image.
    ``learned`` is 0 when the best epoch never beat always answering the split's most
    frequent class by that margin; such a run has not converged either (NaN)."""
    n_val = len(val_labels)
    if not val_scores or not n_val:
        return float("nan"), float("nan")
    correct = [round(score * n_val) for score in val_scores]
    margin = max(tolerance * n_val, 1.0)
    majority = int(torch.bincount(val_labels).max())
    if max(correct) <= majority + margin:
        return float("nan"), 0.0
    rising = still_rising(correct, margin)
    return float("nan") if rising is None else float(not rising), 1.0


def _augmenter(cfg: FinetuneParams, num_classes: int):
    """timm's Mixup/CutMix (with label smoothing) on batches, or None."""
    if not (cfg.mixup or cfg.cutmix):
        return None
    from timm.data import Mixup

    return Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix,
                 label_smoothing=cfg.label_smoothing, num_classes=num_classes)  # fmt: skip


# ----------------------------------------------------------------- RandAugment, batched
Argument = Callable[[Tensor, Tensor, tuple[int, int]], Tensor]
"""An op's argument per image and layer from its magnitude level and a random sign ((B,
num_ops) tensors on the CPU, float64 and bool) and the images' (height, width)."""


@dataclass(frozen=True)
class RandAugmentOp:
    """One RandAugment operation: ``kind`` says what it does (a key of ``_KINDS`` or, for a
    geometric one, of ``_AFFINE``), ``argument`` its per-image argument (None: it takes
    none)."""

    name: str
    kind: str
    argument: Argument | None = None


def _signed(value: Tensor, negate: Tensor) -> Tensor:
    return torch.where(negate, -value, value)


def _timm_ops(hparams: dict[str, Any]) -> dict[str, RandAugmentOp]:
    """timm's RandAugment operations (``timm.data.auto_augment.LEVEL_TO_ARG``), their
    arguments written out for per-image levels: level / 10 is the fraction of each range."""
    pct = float(hparams.get("translate_pct", 0.45))
    const = float(hparams.get("translate_const", 250))

    def enhance(kind: str) -> RandAugmentOp:
        return RandAugmentOp(kind.capitalize(), kind, lambda m, neg, hw: m / 10 * 1.8 + 0.1)

    def enhance_increasing(kind: str) -> RandAugmentOp:
        return RandAugmentOp(
            f"{kind.capitalize()}Increasing",
            kind,
            lambda m, neg, hw: (1 + _signed(m / 10 * 0.9, neg)).clamp(min=0.1),
        )

    ops = [
        RandAugmentOp("AutoContrast", "autocontrast"),
        RandAugmentOp("Equalize", "equalize"),
        RandAugmentOp("Invert", "invert"),
        RandAugmentOp("Rotate", "rotate", lambda m, neg, hw: _signed(m / 10 * 30, neg)),
        RandAugmentOp("Posterize", "posterize", lambda m, neg, hw: (m / 10 * 4).floor()),
        RandAugmentOp(
            "PosterizeIncreasing", "posterize", lambda m, neg, hw: 4 - (m / 10 * 4).floor()
        ),
        RandAugmentOp(
            "PosterizeOriginal", "posterize", lambda m, neg, hw: (m / 10 * 4).floor() + 4
        ),
        RandAugmentOp(
            "Solarize", "solarize", lambda m, neg, hw: (m / 10 * 256).floor().clamp(max=256)
        ),
        RandAugmentOp(
            "SolarizeIncreasing",
            "solarize",
            lambda m, neg, hw: 256 - (m / 10 * 256).floor().clamp(max=256),
        ),
        RandAugmentOp(
            "SolarizeAdd", "solarize_add", lambda m, neg, hw: (m / 10 * 110).floor().clamp(max=128)
        ),
        *(enhance(kind) for kind in ("color", "contrast", "brightness", "sharpness")),
        *(enhance_increasing(kind) for kind in ("color", "contrast", "brightness", "sharpness")),
        RandAugmentOp("ShearX", "shear_x", lambda m, neg, hw: _signed(m / 10 * 0.3, neg)),
        RandAugmentOp("ShearY", "shear_y", lambda m, neg, hw: _signed(m / 10 * 0.3, neg)),
        RandAugmentOp("TranslateX", "translate_x", lambda m, neg, hw: _signed(m / 10 * const, neg)),
        RandAugmentOp("TranslateY", "translate_y", lambda m, neg, hw: _signed(m / 10 * const, neg)),
        RandAugmentOp(
            "TranslateXRel", "translate_x", lambda m, neg, hw: _signed(m / 10 * pct, neg) * hw[1]
        ),
        RandAugmentOp(
            "TranslateYRel", "translate_y", lambda m, neg, hw: _signed(m / 10 * pct, neg) * hw[0]
        ),
        RandAugmentOp(  # timm's desaturate: Color with factor 1 - (0.5 to 1)
            "Desaturate", "color", lambda m, neg, hw: 1 - (0.5 + 0.5 * m / 10).clamp(0.5, 1.0)
        ),
    ]
    return {op.name: op for op in ops}


def _torchvision_ops(num_bins: int) -> list[RandAugmentOp]:
    """torchvision's ``RandAugment`` operations (``v2.RandAugment._AUGMENTATION_SPACE``): the
    level is the magnitude bin of ``num_bins``; a translation by t pixels takes the input at
    x - t, as torchvision's ``affine`` does."""
    top = num_bins - 1

    def enhance(kind: str) -> RandAugmentOp:
        return RandAugmentOp(
            kind.capitalize(), kind, lambda b, neg, hw: 1 + _signed(0.9 * b / top, neg)
        )

    return [
        RandAugmentOp("Identity", "identity"),
        RandAugmentOp("ShearX", "shear_x", lambda b, neg, hw: _signed(0.3 * b / top, neg)),
        RandAugmentOp("ShearY", "shear_y", lambda b, neg, hw: _signed(0.3 * b / top, neg)),
        RandAugmentOp(
            "TranslateX",
            "translate_x",
            lambda b, neg, hw: -_signed(150 / 331 * hw[1] * b / top, neg).trunc(),
        ),
        RandAugmentOp(
            "TranslateY",
            "translate_y",
            lambda b, neg, hw: -_signed(150 / 331 * hw[0] * b / top, neg).trunc(),
        ),
        RandAugmentOp("Rotate", "rotate", lambda b, neg, hw: _signed(30 * b / top, neg)),
        *(enhance(kind) for kind in ("brightness", "color", "contrast", "sharpness")),
        RandAugmentOp("Posterize", "posterize", lambda b, neg, hw: 8 - (b / (top / 4)).round()),
        RandAugmentOp("Solarize", "solarize", lambda b, neg, hw: 255 * (1 - b / top)),
        RandAugmentOp("AutoContrast", "autocontrast"),
        RandAugmentOp("Equalize", "equalize"),
    ]


@dataclass(frozen=True)
class BatchRandAugment:
    """RandAugment of a whole batch at once, on the batch's device, from a CPU generator.

    Per image, as timm's ``RandAugment`` draws them: ``num_ops`` operations chosen uniformly
    with replacement (or by ``weights`` without), each applied with probability ``prob`` at
    a magnitude level drawn around ``magnitude`` (``magnitude_std``: Gaussian noise, inf:
    uniform in [0, magnitude]; clipped to [0, ``magnitude_max``]) with a random sign for the
    signed ones. Every random number comes from the caller's CPU generator (the same count
    for every batch of a size; never a global generator); they travel to the device in one
    copy, and each kind of operation then runs there at once on the images that drew it,
    on 8-bit values as PIL's operations compute them (each result clipped to 0-255 and
    truncated). Geometric operations are PIL's affine transforms (pixel centres, edge
    pixels extended, its bilinear and bicubic kernels), sampled with ``interpolation``,
    ``fill`` (per channel, 0-255) where they uncover the image.
    """

    ops: tuple[RandAugmentOp, ...]
    num_ops: int = 2
    magnitude: float = 9.0
    magnitude_std: float = 0.0
    magnitude_max: float = 10.0
    prob: float = 1.0
    weights: tuple[float, ...] | None = None
    interpolation: Literal["nearest", "bilinear", "bicubic"] = "nearest"
    fill: tuple[float, ...] = (0.0,)

    @functools.cached_property
    def groups(self) -> tuple[str, ...]:
        """What runs at once: each kind of operation; the geometric ones as one resampling
        along x (shear and translation in x), one along y, one in both (rotation)."""
        return tuple(dict.fromkeys(_GROUP.get(op.kind, op.kind) for op in self.ops))

    def draw(
        self, batch: int, size: tuple[int, int], generator: torch.Generator
    ) -> tuple[Tensor, Tensor, list[list[int]]]:
        """The random part, on the CPU, for ``batch`` images of ``size`` (height, width): per
        layer (an operation per image), the images ordered by :attr:`groups` (``order``,
        (num_ops, B) int64), their parameters in that order (``params``, (num_ops, B, 6)
        float32: the argument, or a geometric operation's affine coefficients) and each
        group's size (``counts``: one per group, then the images left unchanged)."""
        k, n = len(self.ops), self.num_ops
        if self.weights is None:
            choice = torch.randint(k, (batch, n), generator=generator)
        else:
            weights = torch.tensor(self.weights, dtype=torch.float64).expand(batch, k)
            choice = torch.multinomial(weights, n, replacement=False, generator=generator)
        applied = torch.rand(batch, n, generator=generator, dtype=torch.float64) <= self.prob
        noise = torch.randn(batch, n, generator=generator, dtype=torch.float64)
        uniform = torch.rand(batch, n, generator=generator, dtype=torch.float64)
        negate = torch.rand(batch, n, generator=generator) < 0.5
        if math.isinf(self.magnitude_std):
            level = uniform * self.magnitude
        else:
            level = self.magnitude + self.magnitude_std * noise
        level = level.clamp(0.0, self.magnitude_max)
        params = torch.zeros(batch, n, 6, dtype=torch.float64)
        group = torch.full((batch, n), len(self.groups))  # the last: left as it is
        for i, op in enumerate(self.ops):
            chosen = (choice == i) & applied
            if op.argument is None:
                param = torch.zeros(batch, n, 6, dtype=torch.float64)
            elif op.kind in _AFFINE:
                param = _AFFINE[op.kind](op.argument(level, negate, size), size)
            else:
                param = F.pad(op.argument(level, negate, size).unsqueeze(-1), (0, 5))
            params = torch.where(chosen.unsqueeze(-1), param, params)
            group[chosen] = self.groups.index(_GROUP.get(op.kind, op.kind))
        group = group.T
        order = group.argsort(dim=1, stable=True)
        counts = [torch.bincount(row, minlength=len(self.groups) + 1).tolist() for row in group]
        params = params.transpose(0, 1).gather(1, order.unsqueeze(-1).expand(-1, -1, 6))
        return order, params.float(), counts

    def apply(
        self, images: Tensor, order: Tensor, params: Tensor, counts: list[list[int]]
    ) -> Tensor:
        """``images`` (B, C, H, W) of 8-bit values (uint8, or floats 0-255) augmented as
        :meth:`draw` drew, where they are (``order`` and ``params`` there too); the same
        dtype, values in 0-255."""
        x = images.to(torch.float32, copy=True)
        for layer, sizes in enumerate(counts):
            start = 0
            for kind, count in zip(self.groups, sizes, strict=False):  # the last: unchanged
                if count and kind != "identity":
                    rows = order[layer, start : start + count]
                    param = params[layer, start : start + count]
                    x.index_copy_(0, rows, self._run(kind, x.index_select(0, rows), param))
                start += count
        return x.to(images.dtype) if images.dtype == torch.uint8 else x

    def __call__(self, images: Tensor, generator: torch.Generator) -> Tensor:
        """``images`` (B, C, H, W) of 8-bit values augmented on their device; the draws are
        made on the CPU from ``generator`` and copied there at once (not blocking)."""
        order, params, counts = self.draw(len(images), images.shape[-2:], generator)
        order, params = to_device([order, params], images.device)
        return self.apply(images, order, params, counts)

    def _run(self, kind: str, x: Tensor, params: Tensor) -> Tensor:
        """Operation ``kind`` (a group) on ``x`` (n, C, H, W), floats holding 8-bit values,
        with each image's ``params`` (n, 6)."""
        if kind in _MOVES:
            return _affine(x, params, self.interpolation, self.fill, _MOVES[kind])
        return _KINDS[kind](x, params[:, 0].view(-1, 1, 1, 1))


def _blend(degenerate: Tensor, x: Tensor, factor: Tensor) -> Tensor:
    """PIL's ``Image.blend(degenerate, x, factor)`` on 8-bit values: clipped, truncated."""
    return (degenerate + factor * (x - degenerate)).clamp_(0, 255).floor_()


def _gray(x: Tensor) -> Tensor:
    """PIL's conversion to ``L`` (ITU-R 601-2 luma, its fixed-point rounding), (n, 1, H, W);
    a one-channel image as it is. Exact in float32: every sum stays below 2**24."""
    if x.shape[1] == 1:
        return x
    r, g, b = x.unbind(1)
    return ((r * 19595 + g * 38470 + b * 7471 + 32768) / 65536).floor_().unsqueeze(1)


def _smooth(x: Tensor) -> Tensor:
    """PIL's ``ImageFilter.SMOOTH`` (3x3, centre 5, others 1, over 13), rounded; the border
    pixels kept, as PIL keeps them. The 3x3 sum as two sums of three shifted views."""
    rows = x[..., :-2, :] + x[..., 1:-1, :] + x[..., 2:, :]
    box = rows[..., :-2] + rows[..., 1:-1] + rows[..., 2:]
    out = x.clone()
    out[..., 1:-1, 1:-1] = box.add_(x[..., 1:-1, 1:-1], alpha=4).div_(13).round_()
    return out


def _posterize(x: Tensor, bits: Tensor) -> Tensor:
    """The ``bits`` highest bits of each value kept (0 bits: black, as the official recipe's
    Pillow made it; 8 or more: unchanged)."""
    step = torch.pow(2.0, 8 - bits.clamp(0, 8))
    return x.div(step).floor_().mul_(step)


def _uint8_op(op: Callable[[Tensor], Tensor]) -> Callable[[Tensor, Tensor], Tensor]:
    """A torchvision operation on uint8 images, for floats holding 8-bit values."""
    return lambda x, arg: op(x.to(torch.uint8)).float()


_KINDS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "identity": lambda x, arg: x,
    "autocontrast": _uint8_op(tvF.autocontrast),
    "equalize": _uint8_op(tvF.equalize),
    "invert": lambda x, arg: 255 - x,
    "posterize": lambda x, arg: _posterize(x, arg),
    "solarize": lambda x, arg: torch.where(x >= arg, 255 - x, x),
    "solarize_add": lambda x, arg: torch.where(x < 128, (x + arg).clamp_(max=255), x),
    "color": lambda x, arg: _blend(_gray(x), x, arg),  # one channel: unchanged
    "contrast": lambda x, arg: _blend(
        _gray(x).mean(dim=(1, 2, 3), keepdim=True).add_(0.5).floor_(), x, arg
    ),
    "brightness": lambda x, arg: _blend(torch.zeros_like(x), x, arg),
    "sharpness": lambda x, arg: _blend(_smooth(x), x, arg),
}


def _shear_x(factor: Tensor, size: tuple[int, int]) -> Tensor:
    one, zero = torch.ones_like(factor), torch.zeros_like(factor)
    return torch.stack([one, factor, zero, zero, one, zero], dim=-1)


def _shear_y(factor: Tensor, size: tuple[int, int]) -> Tensor:
    one, zero = torch.ones_like(factor), torch.zeros_like(factor)
    return torch.stack([one, zero, zero, factor, one, zero], dim=-1)


def _translate_x(pixels: Tensor, size: tuple[int, int]) -> Tensor:
    one, zero = torch.ones_like(pixels), torch.zeros_like(pixels)
    return torch.stack([one, zero, pixels, zero, one, zero], dim=-1)


def _translate_y(pixels: Tensor, size: tuple[int, int]) -> Tensor:
    one, zero = torch.ones_like(pixels), torch.zeros_like(pixels)
    return torch.stack([one, zero, zero, zero, one, pixels], dim=-1)


def _rotate(degrees: Tensor, size: tuple[int, int]) -> Tensor:
    """PIL's ``rotate(degrees)`` (counter-clockwise about the image's centre)."""
    angle = torch.deg2rad(-degrees)
    cos, sin = angle.cos(), angle.sin()
    cx, cy = size[1] / 2, size[0] / 2
    return torch.stack(
        [cos, sin, cx - cos * cx - sin * cy, -sin, cos, cy + sin * cx - cos * cy], dim=-1
    )


_AFFINE: dict[str, Callable[[Tensor, tuple[int, int]], Tensor]] = {
    "shear_x": _shear_x,
    "shear_y": _shear_y,
    "translate_x": _translate_x,
    "translate_y": _translate_y,
    "rotate": _rotate,
}
"""Per image, the (n, 6) coefficients ``a, b, c, d, e, f`` of PIL's affine transform: the
output pixel at (x, y) takes the input at (a x + b y + c, d x + e y + f)."""

_GROUP = {"shear_x": "affine_x", "translate_x": "affine_x", "shear_y": "affine_y",
          "translate_y": "affine_y", "rotate": "affine"}  # fmt: skip
"""The resampling each geometric operation runs in: ``affine_x`` moves each row along x as
a whole (coefficients 1, b, c, 0, 1, 0: 4 bicubic taps per row, not 16 per pixel),
``affine_y`` each column along y."""
_MOVES = {"affine_x": "x", "affine_y": "y", "affine": "xy"}


def _kernel(fraction: Tensor, interpolation: str) -> list[tuple[int, Tensor | None]]:
    """(offset from the pixel before the sample, weight) of each tap of PIL's affine filters,
    for samples ``fraction`` of a pixel past that one's centre: ``bilinear`` the two nearest
    centres, ``bicubic`` four with PIL's cubic (``Geometry.c``: the cubic convolution with
    a = -1, not the -0.5 of its resize nor the -0.75 of ``grid_sample``)."""
    t = fraction
    if interpolation == "bilinear":
        return [(0, 1 - t), (1, t)]
    t2, t3 = t * t, t * t * t
    weights = (-t + 2 * t2 - t3, 1 - 2 * t2 + t3, t + t2 - t3, t3 - t2)
    return list(zip((-1, 0, 1, 2), weights, strict=True))


def _taps(position: Tensor, size: int, interpolation: str) -> list[tuple[Tensor, Tensor | None]]:
    """(source index, weight) pairs along one axis for samples at ``position`` (pixel
    coordinates, centres at i + 0.5): ``nearest`` the pixel the position falls in, else
    :func:`_kernel`'s taps; indices clamped to the image (PIL extends its edges), weight
    None for 1."""
    if interpolation == "nearest":
        return [(position.floor().clamp_(0, size - 1).long(), None)]
    before = (position - 0.5).floor()
    return [
        ((before + offset).clamp_(0, size - 1).long(), weight)
        for offset, weight in _kernel(position - 0.5 - before, interpolation)
    ]


def _fill_like(x: Tensor, fill: tuple[float, ...]) -> Tensor:
    """``fill`` (one value, or one per channel) as a (1, C, 1, ...) tensor where ``x`` is,
    made there from scalars (no copy from the host)."""
    c = x.shape[1]
    value = torch.zeros_like(x[:1, :, :1])
    for channel in range(c):
        value[:, channel] = fill[channel] if len(fill) == c else fill[0]
    return value


def _shift_rows(x: Tensor, offset: Tensor, interpolation: str, fill: tuple[float, ...]) -> Tensor:
    """Each row of ``x`` (n, C, H, W) moved along its width: output column j takes the input
    at j + 0.5 + ``offset`` (n, 1, H, 1) (a shear or translation along x), with one kernel
    per row; ``fill`` outside, clipped and truncated as :func:`_affine`."""
    n, c, h, w = x.shape
    col = torch.arange(w, device=x.device).view(1, 1, 1, w)
    if interpolation == "nearest":
        taps: list[tuple[Tensor, Tensor | None]] = [((offset + 0.5).floor().long(), None)]
    else:
        before = offset.floor()
        taps = [
            (before.long() + shift, weight)
            for shift, weight in _kernel(offset - before, interpolation)
        ]
    out: Tensor | None = None
    for start, weight in taps:
        value = x.gather(3, (col + start).clamp_(0, w - 1).expand(n, c, h, w))
        if weight is not None:
            value.mul_(weight)
        out = value if out is None else out.add_(value)
    source = col + 0.5 + offset
    inside = (source >= 0) & (source < w)
    return torch.where(inside, out, _fill_like(x, fill)).clamp_(0, 255).floor_()


def _affine(
    x: Tensor, coefficients: Tensor, interpolation: str, fill: tuple[float, ...], moves: str
) -> Tensor:
    """``x`` (n, C, H, W) transformed per image as PIL's ``Image.transform(AFFINE)`` does:
    output pixel centre (x, y) takes the input at (a x + b y + c, d x + e y + f) (pixel
    centres at i + 0.5; ``coefficients`` (n, 6)), sampled by ``interpolation`` with the edge
    pixels extended, ``fill`` where that point is outside the image; clipped and truncated
    to 8-bit values as PIL does. ``moves``: ``x`` when every image's map is x + b y + c
    along x alone (a shear or translation: each row moves as a whole, see
    :func:`_shift_rows`), ``y`` likewise along y, else ``xy``."""
    n, c, h, w = x.shape
    a, b, cc, d, e, f = (t.view(n, 1, 1) for t in coefficients.unbind(1))
    row = torch.arange(h, device=x.device, dtype=x.dtype).add_(0.5).view(1, h, 1)
    col = torch.arange(w, device=x.device, dtype=x.dtype).add_(0.5).view(1, 1, w)
    if moves == "x":
        return _shift_rows(x, (b * row + cc).unsqueeze(1), interpolation, fill)
    if moves == "y":  # the columns are the rows of the transposed images
        offset = (d * col + f).transpose(1, 2).unsqueeze(1)  # (n, 1, W, 1)
        return _shift_rows(x.transpose(2, 3), offset, interpolation, fill).transpose(2, 3)
    source_x, source_y = a * col + b * row + cc, d * col + e * row + f  # (n, H, W)
    inside = (source_x >= 0) & (source_x < w) & (source_y >= 0) & (source_y < h)
    flat, pixels = x.reshape(n, c, h * w), (n, 1, h * w)
    out: Tensor | None = None
    for index_y, weight_y in _taps(source_y, h, interpolation):  # per row tap: the column taps
        row_start = (index_y * w).view(pixels)
        along_x: Tensor | None = None
        for index_x, weight_x in _taps(source_x, w, interpolation):
            value = flat.gather(2, (row_start + index_x.view(pixels)).expand(n, c, h * w))
            if weight_x is not None:
                value.mul_(weight_x.view(pixels))
            along_x = value if along_x is None else along_x.add_(value)
        if weight_y is not None:
            along_x.mul_(weight_y.view(pixels))
        out = along_x if out is None else out.add_(along_x)
    out = torch.where(inside.view(pixels), out, _fill_like(flat, fill))
    return out.clamp_(0, 255).floor_().view(n, c, h, w)


@functools.lru_cache(maxsize=16)
def timm_rand_augment(config: str, fill: tuple[float, ...] = (0.5,)) -> BatchRandAugment:
    """timm's RandAugment ``config`` (``rand-m9-mstd0.5-inc1``: its parser reads it) as a
    :class:`BatchRandAugment`, bicubic, ``fill`` (per channel, [0, 1]) where geometric
    operations uncover the image. ValueError for a config timm refuses, or that names an
    operation this batched version lacks (``GaussianBlur``)."""
    from timm.data.auto_augment import rand_augment_transform

    try:
        transform = rand_augment_transform(config, {})
    except (AssertionError, ValueError, KeyError, IndexError):
        raise ValueError(
            f"{config!r} is not a timm RandAugment config (e.g. {OFFICIAL_RANDAUGMENT!r})"
        ) from None
    first = transform.ops[0]
    known = _timm_ops(first.hparams)
    missing = [op.name for op in transform.ops if op.name not in known]
    if missing:
        raise ValueError(
            f"{config!r}: the batched RandAugment has no {', '.join(missing)} (it has "
            f"{', '.join(known)})"
        )
    weights = transform.choice_weights
    return BatchRandAugment(
        ops=tuple(known[op.name] for op in transform.ops),
        num_ops=transform.num_layers,
        magnitude=float(first.magnitude),
        magnitude_std=float(first.magnitude_std),
        magnitude_max=float(first.magnitude_max or 10),
        prob=float(first.prob),
        weights=None if weights is None else tuple(float(v) for v in weights),
        interpolation="bicubic",
        fill=tuple(min(255, round(255 * v)) for v in fill),
    )


@functools.lru_cache(maxsize=4)
def torchvision_rand_augment(num_ops: int = 2, magnitude: int = 9) -> BatchRandAugment:
    """torchvision's ``v2.RandAugment(num_ops, magnitude)`` (31 magnitude bins, every chosen
    operation applied, nearest, black fill) as a :class:`BatchRandAugment`."""
    return BatchRandAugment(
        ops=tuple(_torchvision_ops(31)),
        num_ops=num_ops,
        magnitude=float(magnitude),
        magnitude_max=30.0,
        prob=1.0,
        interpolation="nearest",
        fill=(0.0,),
    )


def rand_augment(
    pixels: Tensor, config: str, fill: tuple[float, ...], generator: torch.Generator
) -> Tensor:
    """timm's RandAugment ``config`` (e.g. ``rand-m9-mstd0.5-inc1``) on a [0, 1] batch (B, C,
    H, W), batched where it is (:func:`timm_rand_augment`): 8-bit values as the official
    recipe's PIL images, translations up to 45% of the side, bicubic, ``fill`` (the
    per-channel mean in [0, 1]) where geometric ops uncover the image. Every draw comes from
    ``generator``; no global generator is read or reseeded."""
    stored = pixels.mul(255).round_().clamp_(0, 255)
    return timm_rand_augment(config, tuple(fill))(stored, generator).div_(255).to(pixels.dtype)


def random_erasing(x: Tensor, probability: float, generator: torch.Generator) -> Tensor:
    """timm's ``RandomErasing(probability, mode="pixel")`` with one box, on a normalized
    batch (B, C, H, W) at once: per image, with ``probability``, up to 10 tries of an area
    uniform in 2%-33% of the image and an aspect ratio log-uniform in (0.3, 1 / 0.3); the
    first box smaller than the image is placed uniformly and filled with standard normal
    noise per pixel and channel. Boxes come from ``generator`` (CPU); the noise from a
    generator on ``x``'s device seeded from it, so the global generators are left alone."""
    b, _, height, width = x.shape
    tries = 10
    erase = torch.rand(b, generator=generator) < probability
    area = height * width * (0.02 + (1 / 3 - 0.02) * torch.rand(b, tries, generator=generator))
    log_lo, log_hi = math.log(0.3), math.log(1 / 0.3)
    aspect = torch.exp(log_lo + (log_hi - log_lo) * torch.rand(b, tries, generator=generator))
    box_h, box_w = (area * aspect).sqrt().round(), (area / aspect).sqrt().round()
    fits = (box_h < height) & (box_w < width)
    first = fits.float().argmax(dim=1, keepdim=True)
    erase &= fits.any(dim=1)
    box_h, box_w = box_h.gather(1, first).squeeze(1), box_w.gather(1, first).squeeze(1)
    corner = torch.rand(b, 2, generator=generator)
    top = (corner[:, 0] * (height - box_h + 1)).floor()
    left = (corner[:, 1] * (width - box_w + 1)).floor()
    noise_seed = int(torch.randint(2**62, (1,), generator=generator))
    if not erase.any():
        return x
    rows, cols = torch.arange(height), torch.arange(width)
    in_rows = (rows >= top[:, None]) & (rows < (top + box_h)[:, None])  # (B, H)
    in_cols = (cols >= left[:, None]) & (cols < (left + box_w)[:, None])  # (B, W)
    box = (in_rows[:, :, None] & in_cols[:, None, :] & erase[:, None, None]).to(x.device)
    noise_generator = torch.Generator(device=x.device).manual_seed(noise_seed)
    noise = torch.randn(x.shape, generator=noise_generator, device=x.device, dtype=x.dtype)
    return torch.where(box[:, None], noise, x)


def training_input(
    images: Tensor, feeder: ImageFeeder, cfg: FinetuneParams, generator: torch.Generator
) -> Tensor:
    """A batch of stored training images as normalized, augmented model input on the
    feeder's device (see :class:`FinetuneAugment`; ``randaugment: true`` first applies
    torchvision's RandAugment to the stored images, :func:`torchvision_rand_augment`).
    Everything runs on the device; random numbers are drawn on the CPU from ``generator``
    and reach the device with the images (one copy, and one for the crops)."""
    aug = cfg.augment
    if cfg.randaugment:  # on the stored images, moved to the device with their draws
        augment = torchvision_rand_augment()
        order, params, counts = augment.draw(len(images), images.shape[-2:], generator)
        images, order, params = to_device([images, order, params], feeder.device)
        images = augment.apply(images, order, params, counts)
    crop = aug.crop if aug.crop_scale or aug.hflip else None
    if aug.randaugment:
        pixels = feeder.augment(images, crop, generator) if crop else feeder.pixels(images)
        x = rand_augment(pixels, aug.randaugment, feeder.mean, generator)
        for channel, (mean, std) in enumerate(zip(feeder.mean, feeder.std, strict=True)):
            x[:, channel].sub_(mean).div_(std)  # no constant tensors copied to the device
    else:
        x = feeder(images, crop, generator)
    if aug.reprob:
        x = random_erasing(x, aug.reprob, generator)
    return x


def finetune(
    model: MaskedAutoencoder,
    data: ImageData,
    feeder: ImageFeeder,
    cfg: FinetuneParams,
    *,
    seed: int,
    baseline: bool = False,
    checkpoint: Checkpoint | None = None,
) -> tuple[dict[str, float], list[dict[str, float]], Tensor]:
    """Fine-tune a copy of ``model``'s encoder (on ``feeder.device``) on a label fraction;
    returns (ft_* metrics, history, test probs); ``model`` itself is left untouched.

    ``val_fraction`` of the labelled subset is held out: the checkpoint kept is the epoch
    with the best validation accuracy (never chosen on the test set); ``ft_converged`` is 0
    when validation accuracy was still rising at the end of the budget, and ``ft_learned``
    0 when it never beat the majority class (then ``ft_converged`` is NaN). Each training
    batch is augmented as ``cfg.augment`` says (:func:`training_input`). With mixup or
    cutmix every batch is mixed (even batches, the last partial one dropped, as the official
    recipe does). The budget is ``steps`` (exactly) or ``epochs`` (``scratch_steps`` /
    ``scratch_epochs`` for a ``baseline`` cell trained from scratch). The history has the
    training loss, the steps so far, the validation accuracy, and the test accuracy and
    macro F1 every ``eval_every`` epochs (for curves only).

    With ``checkpoint``, the run resumes from its saved state and saves one after epochs (by
    its policy, and when SIGTERM or SIGUSR1 asks): on CPU a resumed run ends exactly as an
    uninterrupted one.
    """
    device = feeder.device
    torch.manual_seed(seed)
    subset = label_subset(data.train_labels, cfg.label_fraction, seed)
    fit, val = split_validation(data.train_labels[subset], cfg.val_fraction, seed)
    images, labels = data.train_images[subset[fit]], data.train_labels[subset[fit]]
    val_images, val_labels = data.train_images[subset[val]], data.train_labels[subset[val]]
    classifier = Classifier(model, data.num_classes, cfg.pool, cfg.head)
    classifier.model.set_drop_path(cfg.drop_path)
    groups = classifier.param_groups(cfg.weight_decay, cfg.layer_decay)
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, **optimizer_options(device))
    mixer = _augmenter(cfg, data.num_classes) if len(images) >= 2 else None
    bs = min(cfg.batch_size, len(images))
    if mixer is not None:  # mixing pairs images: even batches, the last partial one dropped
        bs = max(2, bs - bs % 2)  # (as the official recipe's loader does)
        steps_per_epoch = len(images) // bs
    else:
        steps_per_epoch = math.ceil(len(images) / bs)
    if baseline and (cfg.scratch_steps or cfg.scratch_epochs):  # scratch's own budget
        steps, epochs = cfg.scratch_steps, cfg.scratch_epochs or cfg.epochs
    else:
        steps, epochs = cfg.steps, cfg.epochs
    if steps:  # exactly that many optimizer steps; the last epoch may be partial
        epochs = math.ceil(steps / steps_per_epoch)
    total = steps or steps_per_epoch * epochs
    warmup = round(cfg.warmup_epochs * steps_per_epoch)
    generator = torch.Generator().manual_seed(seed)
    mix_rng = np.random.RandomState(seed)  # timm's Mixup draws from numpy's global generator
    loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    history, step, val_scores = [], 0, []
    best: tuple[float, int, dict[str, Tensor]] | None = None
    test_y = data.test_labels.numpy()
    first = 0
    saved = checkpoint.load() if checkpoint else None
    if saved is not None:
        classifier.load_state_dict(saved["classifier"])
        optimizer.load_state_dict(saved["optimizer"])
        generator.set_state(saved["generator"])
        set_numpy_state(mix_rng, saved["mix_rng"])
        set_rng_state(saved["rng"], device)
        first, step = saved["epoch"], saved["step"]
        history, val_scores = saved["history"], saved["val_scores"]
        best = tuple(saved["best"]) if saved["best"] is not None else None

    def state() -> dict[str, object]:
        return {
            "classifier": classifier.state_dict(),
            "optimizer": optimizer.state_dict(),
            "generator": generator.get_state(),
            "mix_rng": numpy_state(mix_rng),
            "rng": rng_state(device),
            "epoch": epoch + 1,
            "step": step,
            "history": history,
            "val_scores": val_scores,
            "best": list(best) if best is not None else None,
        }

    epoch = first
    forward = Compiled(classifier) if cfg.compile else classifier  # training steps only
    with resume.training():
        for epoch in range(first, epochs):
            step = _epoch(
                classifier, optimizer, images, labels, feeder, cfg, generator, mixer, mix_rng,
                loss_fn, step, total, warmup, bs, history, epoch, forward,
            )  # fmt: skip
            row = history[-1]
            if len(val_labels):
                val_acc = float((predict(classifier, val_images, feeder).argmax(1) == val_labels)
                                .float().mean())  # fmt: skip
                val_scores.append(val_acc)
                row["val_acc"] = val_acc
                if best is None or val_acc > best[0]:
                    weights = {k: v.detach().clone() for k, v in classifier.state_dict().items()}
                    best = (val_acc, epoch + 1, weights)
            if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == epochs:
                scores = classification_metrics(test_y, predict(classifier, data.test_images,
                                                                feeder).numpy())  # fmt: skip
                row.update(test_acc=scores["acc"], test_f1_macro=scores["f1_macro"])
            if checkpoint:
                checkpoint.epoch_end(epoch + 1, state, last=epoch + 1 == epochs)
    chosen = epochs
    if best is not None:
        classifier.load_state_dict(best[2])
        chosen = best[1]
    probs = predict(classifier, data.test_images, feeder)
    metrics = classification_metrics(test_y, probs.numpy(), "ft_")
    converged, learned = convergence(val_scores, val_labels, cfg.converge_tolerance)
    metrics.update(
        ft_train_images=float(len(images)),
        ft_val_images=float(len(val_labels)),
        ft_val_acc=best[0] if best is not None else float("nan"),
        ft_epoch=float(chosen),
        ft_epochs=float(epochs),
        ft_converged=converged,
        ft_learned=learned,
    )
    return metrics, history, probs


def _epoch(
    classifier: Classifier,
    optimizer: torch.optim.Optimizer,
    images: Tensor,
    labels: Tensor,
    feeder: ImageFeeder,
    cfg: FinetuneParams,
    generator: torch.Generator,
    mixer: Any,
    mix_rng: np.random.RandomState,
    loss_fn: nn.Module,
    step: int,
    total: int,
    warmup: int,
    bs: int,
    history: list[dict[str, float]],
    epoch: int,
    forward: nn.Module | None = None,
) -> int:
    """One fine-tuning epoch; appends its row to ``history`` and returns the step count.
    ``forward``: the module to call instead of ``classifier`` (its compiled version)."""
    net = forward if forward is not None else classifier
    device = feeder.device
    classifier.train()
    total_loss = torch.zeros((), device=device)
    steps = 0
    batches = index_batches(len(images), bs, generator=generator, drop_last=mixer is not None)
    for idx in batches:
        if step >= total:  # a budget in steps ends inside its last epoch
            break
        lr = lr_at(step, total, warmup, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr * group["lr_scale"]
        x, y = training_input(images[idx], feeder, cfg, generator), labels[idx].to(device)
        if mixer is not None:
            with _numpy_global(mix_rng):
                x, soft = mixer(x, y)
            with autocast(device):
                logits = net(x)
            loss = torch.sum(-soft * logits.float().log_softmax(dim=-1), dim=-1).mean()
        else:
            with autocast(device):
                logits = net(x)
            loss = loss_fn(logits.float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total_loss += loss.detach()
        step += 1
        steps += 1
    history.append({"epoch": epoch + 1, "step": step, "loss": float(total_loss) / max(1, steps)})
    return step


@contextlib.contextmanager
def _numpy_global(rng: np.random.RandomState) -> Iterator[None]:
    """Make ``rng`` numpy's global generator for a block (timm's Mixup draws from it), so
    mixing is seeded and checkpointed, and the caller's global state is left as it was."""
    outer = np.random.get_state()
    np.random.set_state(rng.get_state())
    try:
        yield
    finally:
        rng.set_state(np.random.get_state())
        np.random.set_state(outer)


MIN_VAL_PER_CLASS = 10  # fewer validation images per class make the epoch choice noisy


def finetune_sanity(metrics: dict[str, float], data: ImageData) -> dict[str, Any]:
    """How far a fine-tuning result can be trusted: :func:`classifier_sanity` of its test set
    (chance, resolution, a small test set, ``ft_acc`` at or below chance), with ``n_train``
    the images fine-tuned on and ``n_val`` those held out to choose the epoch, and warnings
    about a validation split under ``MIN_VAL_PER_CLASS`` images per class (or none) and a
    run that never learned."""
    facts = classifier_sanity(
        data.train_labels,
        data.test_labels,
        data.num_classes,
        class_names=data.class_names,
        accuracy=("ft_acc", metrics["ft_acc"]),
    )
    n_val = int(metrics["ft_val_images"])
    per_class = n_val / len(torch.unique(data.train_labels))
    warnings = facts.pop("warnings")
    if n_val == 0:
        warnings.append(
            "no validation split (val_fraction 0, or too few labelled images): the last epoch "
            "is kept and convergence is unknown"
        )
    elif per_class < MIN_VAL_PER_CLASS:
        warnings.append(
            f"validation split of {n_val} images, about {per_class:.1f} per class (under "
            f"{MIN_VAL_PER_CLASS}): the epoch kept is chosen on a noisy accuracy"
        )
    if metrics.get("ft_learned") == 0:
        warnings.append(
            "fine-tuning never beat the majority class on its validation split: it did not learn"
        )
    return {**facts, "n_train": int(metrics["ft_train_images"]), "n_val": n_val,
            "warnings": warnings}  # fmt: skip


def _cross_entropy_bound(logits: Tensor) -> Tensor:
    """A scalar that needs what cross-entropy needs for its backward pass (the logits)."""
    return logits.float().log_softmax(dim=-1).mean()


class FinetuneEvaluator(Evaluator):
    """The encoder plus a linear head trained end to end on a fraction of the labels."""

    name = "finetune"
    Params = FinetuneParams
    trains_encoder = True
    run_only = frozenset({"compile"})
    summary_priority = 0

    def metrics(self) -> dict[str, Metric]:
        return {
            **classification_metric_info("ft_", "the fine-tuned model", ("acc", "f1_macro")),
            "ft_train_images": Metric("labelled images fine-tuned on", fmt="{:.0f}", compare=False),
            "ft_val_images": Metric(
                "labelled images held out to choose the epoch", fmt="{:.0f}", compare=False
            ),
            "ft_val_acc": Metric("best validation accuracy (the epoch kept)", bounds=(0, 1)),
            "ft_epoch": Metric(
                "epoch kept (best validation accuracy)", fmt="{:.0f}", compare=False
            ),
            "ft_epochs": Metric("epochs trained", fmt="{:.0f}", compare=False),
            "ft_converged": Metric(
                "1 when validation accuracy had stopped rising at the end of the budget",
                fmt="{:.2f}",
                compare=False,
                bounds=(0, 1),
                flag="fine-tuning still improving on its validation split at the end of its "
                "budget: not converged, give it more epochs",
            ),
            "ft_learned": Metric(
                "1 when the best validation accuracy beat always answering the most frequent "
                "class by more than the convergence tolerance",
                fmt="{:.2f}",
                compare=False,
                bounds=(0, 1),
                flag="fine-tuning never beat the majority class on its validation split: it "
                "did not learn (check lr and budget)",
            ),
        }

    def training_step(self, model: MaskedAutoencoder, num_classes: int) -> TrainingStep:
        """The encoder (every patch visible) with its head, on a batch of ``batch_size``,
        trained with cross-entropy: what the memory pre-check counts."""
        p = self.params
        classifier = Classifier(model, num_classes, p.pool, p.head)
        classifier.model.set_drop_path(p.drop_path)
        return TrainingStep(classifier, p.batch_size, _cross_entropy_bound)

    def evaluate(self, ctx: EvalContext) -> EvalResult:
        data, p = ctx.data, self.params
        scores, history, probs = finetune(
            ctx.model,
            data,
            ctx.feeder,
            p,
            seed=ctx.seed,
            baseline=ctx.baseline,
            checkpoint=ctx.checkpoint,
        )
        return EvalResult(
            scores,
            tables={FINETUNE_TABLE: pd.DataFrame(history)},
            confusion=confusion(data.test_labels.numpy(), probs.numpy()),
            sanity=finetune_sanity(scores, data),
        )

    def plots(self) -> list[TablePlot]:
        return [FinetuneCurves()]


class FinetuneCurves(TablePlot):
    """Test accuracy and macro F1 per epoch, pretrained variants vs scratch (band: spread
    over seeds); per variant, validation and test accuracy of each seed."""

    name = "finetune_curves"
    table = FINETUNE_TABLE
    seeds = "all"
    variant_panel = True

    def figure(self, tables: dict[str, pd.DataFrame], **also: dict[str, pd.DataFrame]) -> Any:
        import seaborn as sns

        frames = [table.assign(variant=name) for name, table in tables.items()]
        data = pd.concat(frames, ignore_index=True).dropna(subset=["test_acc"])
        long = data.melt(["variant", "seed", "epoch"], ["test_acc", "test_f1_macro"], "score")
        grid = sns.relplot(
            data=long,
            x="epoch",
            y="value",
            hue="variant",
            col="score",
            kind="line",
            errorbar="sd",
            marker="o",  # a curve of one evaluation point is a point
            height=3.5,
            aspect=1.2,
        )
        grid.set_titles("fine-tuning: {col_name}")
        return grid.figure

    def draw_variant(self, ax: Any, table: pd.DataFrame) -> None:
        for seed, finetune in table.groupby("seed", sort=False):
            if "val_acc" in finetune and finetune["val_acc"].notna().any():
                ax.plot(finetune["epoch"], finetune["val_acc"], ".-", label=f"val, seed {seed}")
            tested = finetune.dropna(subset=["test_acc"]) if "test_acc" in finetune else None
            if tested is not None and len(tested):
                ax.plot(tested["epoch"], tested["test_acc"], "o--", label=f"test, seed {seed}")
        ax.set(title="fine-tuning accuracy", xlabel="epoch")
        ax.legend(fontsize=6)


@hookimpl
def register_evaluators(register):
    register(FinetuneEvaluator)
