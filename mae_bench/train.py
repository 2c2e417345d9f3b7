"""The pretraining loop: masked reconstruction with AdamW, warmup + cosine, per-step masking."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import Tensor

from mae_bench.contract import Loss, LossInputs, Mask, MaskedAutoencoder, MaskingStrategy
from mae_bench.data import ImageFeeder, index_batches
from mae_bench.device import autocast, optimizer_options
from mae_bench.suite import PretrainConfig

EpochCallback = Callable[[int, dict[str, float]], None]


@dataclass
class PretrainResult:
    """Per-epoch history and timings of one pretraining run."""

    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0
    images_seen: int = 0

    @property
    def images_per_second(self) -> float:
        """Pretraining throughput."""
        return self.images_seen / self.seconds if self.seconds > 0 else float("nan")


class Schedule(Protocol):
    """Settings with a peak and a final learning rate."""

    lr: float
    min_lr: float


def lr_at(step: int, total: int, warmup: int, cfg: Schedule) -> float:
    """Linear warmup for ``warmup`` steps, then half-cosine decay from ``lr`` to ``min_lr``."""
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return cfg.min_lr + (cfg.lr - cfg.min_lr) * 0.5 * (1.0 + math.cos(math.pi * t))


def loss_terms(
    losses: list[tuple[Loss, float]], inputs: LossInputs
) -> tuple[Tensor, dict[str, Tensor]]:
    """Weighted sum of the loss terms, and each term on its own (named, made unique)."""
    total = inputs.pred.new_zeros(())
    terms: dict[str, Tensor] = {}
    for loss, weight in losses:
        value = loss(inputs)
        key = loss.name if loss.name not in terms else f"{loss.name}_{len(terms)}"
        terms[key] = value.detach()
        total = total + weight * value
    return total, terms


def forward_loss(
    model: MaskedAutoencoder, x: Tensor, mask: Mask, losses: list[tuple[Loss, float]]
) -> tuple[Tensor, dict[str, Tensor]]:
    """The model's forward pass on a masked batch (bf16 autocast on CUDA) and the weighted
    loss, computed in float32 outside autocast."""
    with autocast(x.device):
        out = model(x, mask)
    inputs = LossInputs(
        x, out.pred.float(), mask.mask, out.latent.float(), model.patch_size, model.pool
    )
    return loss_terms(losses, inputs)


def make_optimizer(
    model: MaskedAutoencoder, cfg: PretrainConfig, device: torch.device
) -> torch.optim.AdamW:
    """AdamW without weight decay on biases, norms and the model's ``no_weight_decay()``
    tokens; fused on CUDA."""
    groups = model.param_groups(cfg.weight_decay)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, **optimizer_options(device))


def train_step(
    model: MaskedAutoencoder,
    x: Tensor,
    mask: Mask,
    losses: list[tuple[Loss, float]],
    optimizer: torch.optim.Optimizer,
    grad_clip: float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """One optimisation step on a batch; returns the detached loss and its terms."""
    loss, terms = forward_loss(model, x, mask, losses)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    return loss.detach(), terms


def draw_mask(
    masking: MaskingStrategy,
    batch_size: int,
    model: MaskedAutoencoder,
    progress: float,
    generator: torch.Generator | None,
    *,
    full_check: bool = True,
) -> Mask:
    """A masking strategy's masks for a batch, checked: shapes always, values (which need a
    device sync) when ``full_check``; a bad mask is a ``ValueError`` naming the strategy."""
    device = next(model.parameters()).device
    mask = masking(batch_size, model.grid, progress=progress, generator=generator, device=device)
    try:
        if not isinstance(mask, Mask):
            raise ValueError(f"returned a {type(mask).__name__}, not a mae_bench.Mask")
        # values are checked where they exist (the meta device, used to plan memory, has none)
        mask.validate(batch_size, model.num_patches, full=full_check and not mask.mask.is_meta)
    except ValueError as exc:
        cls = type(masking)
        raise ValueError(
            f"masking {masking.name!r} ({cls.__module__}.{cls.__name__}) returned an invalid "
            f"mask for {batch_size} images of a {model.grid[0]}x{model.grid[1]} patch grid: {exc}"
        ) from None
    return mask


def pretrain(
    model: MaskedAutoencoder,
    images: Tensor,
    feeder: ImageFeeder,
    masking: MaskingStrategy,
    losses: list[tuple[Loss, float]],
    cfg: PretrainConfig,
    *,
    seed: int,
    on_epoch: EpochCallback | None = None,
) -> PretrainResult:
    """Pretrain ``model`` (already on ``feeder.device``) on uint8 ``images``; deterministic on
    CPU for a given seed. The logged ``mask_ratio`` is the fraction of patches actually masked."""
    device = feeder.device
    model.train()
    optimizer = make_optimizer(model, cfg, device)
    order_gen = torch.Generator().manual_seed(seed)
    mask_gen = torch.Generator().manual_seed(seed + 1_000_003)
    aug_gen = torch.Generator().manual_seed(seed + 2_000_003)
    bs = min(cfg.batch_size, len(images))
    steps_per_epoch = len(images) // bs
    total = steps_per_epoch * cfg.epochs
    warmup = round(cfg.warmup_epochs * steps_per_epoch)
    result = PretrainResult()
    step = 0
    start = time.perf_counter()
    for epoch in range(cfg.epochs):
        sums: dict[str, Tensor] = {}
        for idx in index_batches(len(images), bs, generator=order_gen, drop_last=True):
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, total, warmup, cfg)
            x = feeder(images[idx], cfg.augment, aug_gen)
            progress = step / total
            mask = draw_mask(masking, len(x), model, progress, mask_gen, full_check=step == 0)
            loss, terms = train_step(model, x, mask, losses, optimizer, cfg.grad_clip)
            step += 1
            result.images_seen += len(x)
            drawn = mask.mask.detach().float().mean()
            for key, value in {"loss": loss, **terms, "mask_ratio": drawn}.items():
                sums[key] = sums[key] + value if key in sums else value  # no sync per step
        if not math.isfinite(float(sums["loss"])):
            raise FloatingPointError(f"the pretraining loss diverged in epoch {epoch + 1}")
        row = {"epoch": epoch + 1, **{k: float(v) / steps_per_epoch for k, v in sums.items()}}
        row["lr"] = optimizer.param_groups[0]["lr"]
        result.history.append(row)
        if on_epoch:
            on_epoch(epoch + 1, row)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    result.seconds = time.perf_counter() - start
    return result
