"""Fine-tuning protocol: the pretrained encoder plus a linear head, trained end to end."""

from __future__ import annotations

import contextlib
import math
import random
from collections.abc import Iterator
from typing import Annotated, Any, Literal

import numpy as np
import pandas as pd
import torch
from pydantic import Field, NonNegativeFloat, PositiveFloat, PositiveInt, model_validator
from timm.optim import param_groups_weight_decay
from torch import Tensor, nn

from mae_bench import EvalContext, EvalResult, Evaluator, Metric, Params, hookimpl, resume
from mae_bench.contract import ImageData, MaskedAutoencoder, Pool, TablePlot
from mae_bench.data import ImageFeeder, index_batches
from mae_bench.device import autocast, optimizer_options
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
    (``util/datasets.py:build_transform``): random resized crop and horizontal flip
    (batched on the device; bilinear resampling where the official uses bicubic), timm's
    RandAugment (``randaugment``: its config string; per image, PIL, on the CPU), the
    normalisation, then timm's RandomErasing in ``pixel`` mode, one box, with probability
    ``reprob`` (batched on the device). Every random draw comes from the cell's generator.
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
            from timm.data.auto_augment import rand_augment_transform

            try:
                rand_augment_transform(self.randaugment, {})
            except (AssertionError, ValueError, KeyError, IndexError):
                raise ValueError(
                    f"randaugment {self.randaugment!r} is not a timm RandAugment config "
                    f"(e.g. {OFFICIAL_RANDAUGMENT!r})"
                ) from None
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
    # torchvision's RandAugment (2 ops, magnitude 9) on the stored images, before any crop
    # (this project's earlier option; the official one is ``augment.randaugment``)
    randaugment: bool = False

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


def _randaugment(images: Tensor, generator: torch.Generator) -> Tensor:
    """torchvision's RandAugment (2 ops, magnitude 9) on each uint8 image of a batch, seeded
    from ``generator`` through the CPU generator alone (saved and restored; no other device's
    generator is touched)."""
    from torchvision.transforms import v2

    augment = v2.RandAugment(num_ops=2, magnitude=9)
    state = torch.get_rng_state()
    torch.default_generator.manual_seed(int(torch.randint(2**31, (1,), generator=generator)))
    try:
        return torch.stack([augment(img) for img in images])
    finally:
        torch.set_rng_state(state)


def rand_augment(
    pixels: Tensor, config: str, fill: tuple[float, ...], generator: torch.Generator
) -> Tensor:
    """timm's RandAugment ``config`` (e.g. ``rand-m9-mstd0.5-inc1``) on each image of a
    [0, 1] batch (B, C, H, W), as the official recipe applies it: on 8-bit PIL images,
    translations up to 45% of the side, bicubic, ``fill`` (the per-channel mean in [0, 1])
    where geometric ops uncover the image. timm draws from Python's and numpy's global
    generators: both are seeded from ``generator`` for the call and restored after."""
    from PIL import Image
    from timm.data import auto_augment
    from timm.data.auto_augment import rand_augment_transform

    channels = pixels.shape[1]
    mean = tuple(min(255, round(255 * v)) for v in fill)
    hparams = {
        "translate_const": int(min(pixels.shape[-2:]) * 0.45),
        "img_mean": mean if channels == 3 else mean[0],
        "interpolation": Image.BICUBIC,
    }
    transform = rand_augment_transform(config, hparams)
    for op in transform.ops:  # keeping 0 bits: black, as with the Pillow the official ran
        if op.aug_fn is auto_augment.posterize:
            op.aug_fn = _posterize
    stored = pixels.mul(255).round_().clamp_(0, 255).to(torch.uint8).cpu()
    seed = int(torch.randint(2**31, (1,), generator=generator))
    python_state, numpy_state_ = random.getstate(), np.random.get_state()
    random.seed(seed)
    np.random.seed(seed)
    try:
        out = []
        for img in stored:
            array = img.permute(1, 2, 0).numpy() if channels == 3 else img[0].numpy()
            result = np.asarray(transform(Image.fromarray(array)))
            out.append(torch.from_numpy(result.copy()).view(*img.shape[1:], -1).permute(2, 0, 1))
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state_)
    return torch.stack(out).to(pixels.device).to(pixels.dtype).div_(255)


def _posterize(img: Any, bits_to_keep: int, **kwargs: Any) -> Any:
    """timm's posterize, where keeping 0 bits gives a black image (recent Pillow refuses
    0 bits; the Pillow of the official recipe made every pixel 0)."""
    from PIL import Image
    from timm.data import auto_augment

    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return auto_augment.posterize(img, bits_to_keep, **kwargs)


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
    torchvision's RandAugment to the stored images)."""
    aug = cfg.augment
    if cfg.randaugment:
        images = _randaugment(images, generator)
    crop = aug.crop if aug.crop_scale or aug.hflip else None
    if aug.randaugment:
        pixels = feeder.augment(images, crop, generator) if crop else feeder.pixels(images)
        pixels = rand_augment(pixels, aug.randaugment, feeder.mean, generator)
        mean = pixels.new_tensor(feeder.mean).view(1, -1, 1, 1)
        std = pixels.new_tensor(feeder.std).view(1, -1, 1, 1)
        x = pixels.sub_(mean).div_(std)
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
    with resume.training():
        for epoch in range(first, epochs):
            step = _epoch(
                classifier, optimizer, images, labels, feeder, cfg, generator, mixer, mix_rng,
                loss_fn, step, total, warmup, bs, history, epoch,
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
) -> int:
    """One fine-tuning epoch; appends its row to ``history`` and returns the step count."""
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
                logits = classifier(x)
            loss = torch.sum(-soft * logits.float().log_softmax(dim=-1), dim=-1).mean()
        else:
            with autocast(device):
                logits = classifier(x)
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


class FinetuneEvaluator(Evaluator):
    """The encoder plus a linear head trained end to end on a fraction of the labels."""

    name = "finetune"
    Params = FinetuneParams
    trains_encoder = True
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
