"""The pretraining loop: masked reconstruction with AdamW, warmup + cosine, per-step masking."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Protocol

import torch
from torch import Tensor

from mae_bench import resume
from mae_bench.contract import (
    Loss,
    LossInputs,
    Mask,
    MaskedAutoencoder,
    MaskingStrategy,
    Target,
    call_masking,
)
from mae_bench.data import ImageFeeder, index_batches, to_device
from mae_bench.device import Compiled, autocast, optimizer_options
from mae_bench.distributed import SINGLE, Dist
from mae_bench.resume import Checkpoint, rng_state, set_rng_state
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
        if not isinstance(value, Tensor) or value.numel() != 1:
            what = (
                f"a tensor of shape {tuple(value.shape)}"
                if isinstance(value, Tensor)
                else (type(value).__name__)
            )
            raise TypeError(
                f"loss {loss.name!r} ({type(loss).__module__}.{type(loss).__qualname__}) "
                f"returned {what}, not a scalar tensor"
            )
        key = loss.name if loss.name not in terms else f"{loss.name}_{len(terms)}"
        terms[key] = value.detach()
        total = total + weight * value
    return total, terms


def forward_loss(
    model: MaskedAutoencoder,
    x: Tensor,
    mask: Mask,
    losses: list[tuple[Loss, float]],
    forward: torch.nn.Module | None = None,
    before_loss: Callable[[], None] | None = None,
    target: Target | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The model's forward pass on a masked batch (bf16 autocast on CUDA) and the weighted
    loss, computed in float32 outside autocast. ``forward``: the module to call instead of
    ``model`` (its DistributedDataParallel wrapper); ``before_loss``: called between the
    two (where data-parallel ranks agree, before a loss may gather the batch); ``target``:
    the variant's target (None: the input's pixels), computed without gradient."""
    with autocast(x.device):
        net = forward if forward is not None else model  # a compiled module has no truth value
        out = net(x, mask)  # pred (B, L, pred_dim), latent (B, prefix + K, D)
    if before_loss is not None:
        before_loss()
    expected = (len(x), mask.mask.shape[1], model.pred_dim)
    if tuple(out.pred.shape) != expected:
        what = "p*p*C" if target is None else f"the {target.name!r} target's width"
        raise ValueError(
            f"encoder {model.name!r} predicted a tensor of shape {tuple(out.pred.shape)}, "
            f"expected (B, L, {what}) = {expected}"
        )
    given = None
    if target is not None:
        with torch.no_grad():
            given = target(x, mask, model).float()
        if tuple(given.shape) != expected:
            raise ValueError(
                f"target {target.name!r} returned a tensor of shape {tuple(given.shape)}, "
                f"expected (B, L, dim) = {expected}"
            )
    # the loss averages over the predicted patches: every masked one, unless the model
    # predicts only some of them (MAEOutput.predicted)
    loss_mask = mask.mask if out.predicted is None else out.predicted.to(mask.mask.dtype)
    inputs = LossInputs(
        x, out.pred.float(), loss_mask, out.latent.float(), model.patch_size, model.pool, given,
        partial=out.predicted is not None,
    )  # fmt: skip
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
    *,
    micro: int | None = None,
    forward: torch.nn.Module | None = None,
    before_loss: Callable[[bool], None] | None = None,
    target: Target | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """One optimizer step on ``x`` (a batch, or this process's share of it); returns the
    detached loss and terms, averaged over its micro-batches.

    ``micro``: micro-batches of that many images whose gradients add up (default: one);
    ``forward``: the model's DistributedDataParallel wrapper, whose gradients are then
    synchronised across processes once, on the last micro-batch; ``before_loss(last)``:
    called after each micro-batch's forward pass, before its loss (``last``: the one whose
    backward pass synchronises); ``target``: the variant's target (None: pixels)."""
    net = forward if forward is not None else model
    optimizer.zero_grad(set_to_none=True)
    parts = range(0, len(x), micro or len(x))
    loss_sum: Tensor | None = None
    term_sums: dict[str, Tensor] = {}
    for i, begin in enumerate(parts):
        rows = slice(begin, begin + (micro or len(x)))
        last = i == len(parts) - 1
        unsynced = getattr(net, "no_sync", None)  # a DDP wrapper (compiled or not)
        sync = contextlib.nullcontext() if last or unsynced is None else unsynced()
        with sync:
            agree = partial(before_loss, last) if before_loss is not None else None
            loss, terms = forward_loss(
                model, x[rows], mask.rows(rows), losses, forward=net, before_loss=agree,
                target=target,
            )  # fmt: skip
            (loss / len(parts)).backward()
        loss_sum = loss.detach() if loss_sum is None else loss_sum + loss.detach()
        for k, v in terms.items():
            term_sums[k] = term_sums[k] + v if k in term_sums else v
    if grad_clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    assert loss_sum is not None
    return loss_sum / len(parts), {k: v / len(parts) for k, v in term_sums.items()}


MASKS_DRAWN = 2
"""Images whose masks :func:`meta_masks` really draws; the others only take their shape."""


def meta_masks(
    masking: MaskingStrategy, model: MaskedAutoencoder, images: int, progress: float
) -> Mask:
    """Masks for ``images`` images on the meta device (to plan memory or count FLOPs): drawn
    and checked for at most ``MASKS_DRAWN`` images on the CPU (as training draws them), the
    rest shapes alike; nothing allocated grows with ``images``."""
    drawn = draw_mask(
        masking, min(images, MASKS_DRAWN), model, progress, torch.Generator().manual_seed(0),
        device=torch.device("cpu"),
    )  # fmt: skip
    return Mask(
        *(
            torch.empty((images, *t.shape[1:]), dtype=t.dtype, device="meta")
            for t in (drawn.ids_keep, drawn.ids_restore, drawn.mask)
        )
    )


def draw_mask(
    masking: MaskingStrategy,
    batch_size: int,
    model: MaskedAutoencoder,
    progress: float,
    generator: torch.Generator | None,
    *,
    full_check: bool = True,
    device: torch.device | None = None,
) -> Mask:
    """A masking strategy's masks for a batch, on ``device`` (default: the model's), checked:
    shapes always, values when ``full_check``; a bad mask is a ``ValueError`` naming the
    strategy. The strategy draws them on the CPU (from the CPU ``generator``, and checked
    there: no device sync); they reach another device in one copy that does not block."""
    device = torch.device(device or next(model.parameters()).device)
    cpu = torch.device("cpu")
    drawn = call_masking(
        masking, batch_size, model.grid, progress=progress, generator=generator, device=cpu
    )
    try:
        if not isinstance(drawn, Mask):
            raise ValueError(f"returned a {type(drawn).__name__}, not a mae_bench.Mask")
        # values are checked where they exist (the meta device, used to plan memory, has none)
        parts = (drawn.ids_keep, drawn.ids_restore, drawn.mask)
        has_values = not any(getattr(t, "is_meta", False) for t in parts)
        drawn.validate(batch_size, model.num_patches, full=full_check and has_values)
    except ValueError as exc:
        cls = type(masking)
        raise ValueError(
            f"masking {masking.name!r} ({cls.__module__}.{cls.__name__}) returned an invalid "
            f"mask for {batch_size} images of a {model.grid[0]}x{model.grid[1]} patch grid: {exc}"
        ) from None
    return Mask(*to_device([drawn.ids_keep, drawn.ids_restore, drawn.mask], device))


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
    checkpoint: Checkpoint | None = None,
    world: Dist = SINGLE,
    on_resume: Callable[[int], None] | None = None,
    target: Target | None = None,
) -> PretrainResult:
    """Pretrain ``model`` (already on ``feeder.device``) on uint8 ``images``; deterministic on
    CPU for a given seed. The logged ``mask_ratio`` is the fraction of patches actually masked.

    Every optimizer step takes ``cfg.batch_size`` images, whatever runs it: with ``world``
    (data parallel) each process reads, masks and augments only its share of every batch,
    drawn as in one process, and with ``cfg.accum_iter`` that share is split into
    micro-batches (the ranks' i-th micro-batches together are one process's i-th). The ranks
    agree once per step, on the host, before the step's last loss (any stop signal or
    checkpoint request, and whether a rank failed: see :mod:`mae_bench.distributed`), and
    before each loss when a loss is a statistic of the batch (it gathers the whole batch).
    With ``checkpoint``, the run resumes from its saved state (``on_resume(epoch)`` is told)
    and saves one after epochs (by its policy, on the epoch-end path fine-tuning takes too:
    :func:`resume.epoch_boundary`) and at the next step on SIGTERM/SIGUSR1 (see
    :mod:`mae_bench.resume`); a stop signal raises :class:`resume.Terminated` after saving.
    ``target``: the variant's target (None: pixels), set up here on the model, called after
    every optimizer step and checkpointed with the model (a teacher's state resumes too).
    """
    with world.stage(feeder.device):
        return _pretrain(
            model, images, feeder, masking, losses, cfg, seed=seed, on_epoch=on_epoch,
            checkpoint=checkpoint, world=world, on_resume=on_resume, target=target,
        )  # fmt: skip


def _pretrain(
    model: MaskedAutoencoder,
    images: Tensor,
    feeder: ImageFeeder,
    masking: MaskingStrategy,
    losses: list[tuple[Loss, float]],
    cfg: PretrainConfig,
    *,
    seed: int,
    on_epoch: EpochCallback | None,
    checkpoint: Checkpoint | None,
    world: Dist,
    on_resume: Callable[[int], None] | None,
    target: Target | None,
) -> PretrainResult:
    device = feeder.device
    model.train()
    if target is not None:
        target.setup(model)
    optimizer = make_optimizer(model, cfg, device)
    gens = {
        "order": torch.Generator().manual_seed(seed),
        "mask": torch.Generator().manual_seed(seed + 1_000_003),
        "aug": torch.Generator().manual_seed(seed + 2_000_003),
    }
    bs = min(cfg.batch_size, len(images))
    shard = world.shard(bs)
    micro = (shard.stop - shard.start) // cfg.accum_iter
    if micro == 0 or (shard.stop - shard.start) % cfg.accum_iter:
        raise ValueError(
            f"a batch of {bs} images on {world.world_size} processes does not split into "
            f"accum_iter={cfg.accum_iter} equal micro-batches"
        )
    rows = world.rows(bs, cfg.accum_iter) if world.active else None  # this rank's share
    steps_per_epoch = len(images) // bs
    total = steps_per_epoch * cfg.epochs
    warmup = round(cfg.warmup_epochs * steps_per_epoch)
    result = PretrainResult()
    step, first_epoch, skip = 0, 0, 0
    sums: dict[str, Tensor] = {}
    epoch_order = gens["order"].get_state()
    saved = checkpoint.load() if checkpoint else None
    if saved is not None:
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        if target is not None:
            target.load_state_dict(saved.get("target") or {})
        for name, gen in gens.items():
            gen.set_state(saved["generators"][name])
        set_rng_state(saved["rng"], device)
        step, first_epoch, skip = saved["step"], saved["epoch"], saved["batch"]
        epoch_order = saved["epoch_order"]
        # the ranks' mean of the sums (see state()): each rank goes on from it, and the
        # epoch's mean over the ranks stays exact
        sums = {k: v.to(device) for k, v in saved["sums"].items()}
        result.history = saved["history"]
        result.images_seen, result.seconds = saved["images_seen"], saved["seconds"]
        if on_resume:
            on_resume(first_epoch)
    world.agree()  # every rank built its model and read the checkpoint: training starts
    net = world.wrap(model, device)
    if cfg.compile:  # (the checkpoint saves ``model`` itself: a compiled cell resumes alike)
        net = Compiled(net)

    def state(epoch: int, batch: int) -> dict[str, object]:
        """The checkpoint's state; in a data-parallel world, called by every rank together
        whenever ``sums`` is not empty (mid-epoch, on a request the ranks agreed on): the
        running sums saved are the ranks' mean, so a resume restores every rank's share."""
        return {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "target": target.state_dict() if target is not None else {},
            "generators": {name: gen.get_state() for name, gen in gens.items()},
            "rng": rng_state(device),
            "scaler": None,  # bf16 autocast needs no gradient scaler
            "step": step,
            "epoch": epoch,
            "batch": batch,
            "epoch_order": epoch_order,
            "sums": {k: v.detach().cpu() for k, v in world.means(sums).items()},
            "history": result.history,
            "images_seen": result.images_seen,
            "seconds": result.seconds + time.perf_counter() - start,
        }

    gathers = any(loss.depends_on_batch for loss, _ in losses)
    agreed_stop: int | None = None  # the step's stop signal and save request, as agreed
    agreed_save = False

    def agree(last: bool) -> None:
        """Before a micro-batch's loss: the ranks agree (the last one's carries the step's
        stop and save requests; the others are only needed when a loss gathers the batch)."""
        nonlocal agreed_stop, agreed_save
        if last:
            agreed_stop, agreed_save = world.agree(*resume.requested())
        elif gathers:
            world.agree()

    before_loss = agree if world.active else None
    start = time.perf_counter()
    with resume.training(), world.shared_batch():
        for epoch in range(first_epoch, cfg.epochs):
            if skip == 0:
                epoch_order = gens["order"].get_state()
                sums = {}
            else:  # resuming mid-epoch: the same order, from the batch after the saved one
                gens["order"].set_state(epoch_order)
            batches = list(index_batches(len(images), bs, generator=gens["order"], drop_last=True))
            for b, idx in enumerate(batches[skip:], start=skip):
                for group in optimizer.param_groups:
                    group["lr"] = lr_at(step, total, warmup, cfg)
                if rows is None:
                    x = feeder(images[idx], cfg.augment, gens["aug"])
                else:  # only this rank's images are read; augmentation drawn for all
                    x = feeder(images[idx[rows]], cfg.augment, gens["aug"], rows, batch_size=bs)
                mask = draw_mask(
                    masking, bs, model, step / total, gens["mask"], full_check=step == 0
                )
                if rows is not None:
                    mask = mask.rows(rows)
                loss, terms = train_step(
                    model, x, mask, losses, optimizer, cfg.grad_clip, micro=micro, forward=net,
                    before_loss=before_loss, target=target,
                )  # fmt: skip
                step += 1
                if target is not None:  # per-step state (an EMA teacher follows the student)
                    target.after_step(model, step / total)
                result.images_seen += bs
                drawn = mask.mask.detach().float().mean()
                for key, value in {"loss": loss, **terms, "mask_ratio": drawn}.items():
                    sums[key] = sums[key] + value if key in sums else value  # no sync per step
                if world.active:  # what every rank agreed on before the step's last loss
                    stop, save = agreed_stop, agreed_save
                else:
                    stop, save = resume.requested()
                if b + 1 < len(batches):  # the last step's request is the epoch end's
                    resume.step_boundary(
                        checkpoint, partial(state, epoch, b + 1), stop, save,
                        where=f"in epoch {epoch + 1}",
                    )  # fmt: skip
            skip = 0
            world.agree()  # every rank ended the epoch's steps (none failed after agreeing)
            means = world.means(sums)
            if not math.isfinite(float(means["loss"])):
                raise FloatingPointError(f"the pretraining loss diverged in epoch {epoch + 1}")
            row = {"epoch": epoch + 1, **{k: float(v) / steps_per_epoch for k, v in means.items()}}
            row["lr"] = optimizer.param_groups[0]["lr"]
            result.history.append(row)
            sums = {}
            resume.epoch_boundary(
                checkpoint, epoch + 1, partial(state, epoch + 1, 0), last=epoch + 1 == cfg.epochs,
                asked=(stop, save), then=partial(on_epoch, epoch + 1, row) if on_epoch else None,
            )  # fmt: skip
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    result.seconds += time.perf_counter() - start
    return result
