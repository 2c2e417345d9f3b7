"""What a suite's pretraining step needs in memory, measured without allocating it.

Each variant's model is built on PyTorch's ``meta`` device (shapes, no data) and one
pretraining step's forward pass and losses run there; autograd's saved-tensor hooks add up
what the backward pass would keep. With the weights, their gradients and AdamW's two moments,
and the input batch, that is the step's footprint. A suite that cannot fit in the memory of
the device it would run on is refused before anything is loaded.

The masks are drawn (and checked) for a few images on the CPU and stand for the whole
micro-batch on the meta device, so nothing allocated grows with the batch size. The check is
an estimate: a variant whose plugins fail on the meta device cannot be estimated and is not
refused; it is named with the reason (a warning), runs, and its own cells fail with the real
reason while every other variant runs.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field

import torch

from mae_bench.errors import MaeBenchWarning, UserError, exception_line
from mae_bench.resume import STOPS
from mae_bench.suite import Suite, Variant
from mae_bench.train import forward_loss, meta_masks


@dataclass(frozen=True)
class MemoryCheck:
    """What the memory pre-check found: why the suite cannot fit (with the figures) or None,
    and per variant it could not estimate, one line saying why."""

    problem: str | None = None
    unchecked: dict[str, str] = field(default_factory=dict)
    notes: tuple[str, ...] = ()  # one line per unchecked variant, naming its suite field

    def warn(self) -> None:
        """Each unchecked variant as a :class:`MaeBenchWarning` (one ``warning:`` line)."""
        for note in self.notes:
            warnings.warn(note, MaeBenchWarning, stacklevel=3)


def _bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def micro_batch(suite: Suite, processes: int = 1) -> int:
    """Images one process holds in one forward pass: the batch split over data-parallel
    ``processes`` and ``pretrain.accum_iter`` micro-batches."""
    cfg = suite.config.pretrain
    return max(1, cfg.batch_size // (processes * cfg.accum_iter))


def pretrain_step_bytes(variant: Variant, suite: Suite, processes: int = 1) -> int:
    """Bytes one process needs for a pretraining step of ``variant`` (weights x 4 for
    gradients and AdamW, its micro-batch, and the activations kept for backward), at the
    lowest mask ratio it uses. Raises whatever the variant's plugins raise on the way."""
    ds = suite.config.dataset
    with torch.device("meta"):
        model = variant.build_model(ds.image_size, ds.channels)
    masking, losses = variant.build_masking(), variant.build_losses()
    size = (micro_batch(suite, processes), ds.channels, ds.image_size, ds.image_size)
    x = torch.empty(size, device="meta")
    weights = sum(_bytes(p) for p in model.parameters() if p.requires_grad)
    peak = 0
    for progress in (0.0, 1.0):  # a curriculum's lowest ratio keeps the most tokens
        mask = meta_masks(masking, model, len(x), progress)
        saved = 0

        def pack(t: torch.Tensor) -> torch.Tensor:
            nonlocal saved
            saved += _bytes(t)
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            forward_loss(model, x, mask, losses)
        peak = max(peak, saved)
    return 4 * weights + 3 * _bytes(x) + peak


def memory_budget(device: torch.device) -> tuple[int, str]:
    """Total memory of ``device`` in bytes, and what it is (for messages)."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        return props.total_memory, f"the {props.name}'s"
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return total, "this machine's"


def memory_check(suite: Suite, device: torch.device, processes: int = 1) -> MemoryCheck:
    """Estimate each variant's pretraining step on ``device``: the first variant that cannot
    fit (``problem``), and the variants whose plugins failed on the way (``unchecked``).

    ``processes`` data-parallel processes on one CPU machine share its memory; on CUDA each
    has its own device. Whatever a plugin raises here is its variant's, never the suite's."""
    budget, whose = memory_budget(device)
    if device.type != "cuda":
        budget //= processes
    ds = suite.config.dataset
    micro = micro_batch(suite, processes)
    problem, unchecked, notes = None, {}, []
    for i, variant in enumerate(suite.variants):
        where = f"{suite.source}: variants[{i}] ({variant.name})"
        try:
            need = pretrain_step_bytes(variant, suite, processes)
        except STOPS:  # a real Ctrl-C or SIGTERM stops the suite
            raise
        except BaseException as exc:  # a plugin's failure (even SystemExit): its cells fail
            unchecked[variant.name] = exception_line(exc)
            notes.append(
                f"{where}: its pretraining step's memory could not be estimated "
                f"({unchecked[variant.name]}); it is not refused: its cells run, and fail "
                "with the reason if it persists"
            )
            continue
        if need > budget and problem is None:
            problem = (
                f"{where}: one pretraining step needs "
                f"about {need / 2**30:,.1f} GiB per process (micro-batch {micro} at "
                f"{ds.image_size}x{ds.image_size}: weights, gradients, AdamW state and "
                f"activations), more than {whose} {budget / 2**30:,.1f} GiB of memory; lower "
                "pretrain.batch_size, dataset.image_size or the model size, or raise "
                "pretrain.accum_iter"
            )
    return MemoryCheck(problem, unchecked, tuple(notes))


def memory_problem(suite: Suite, device: torch.device, processes: int = 1) -> str | None:
    """Why ``suite``'s pretraining step cannot fit on ``device`` (with the figures), or None;
    each variant that could not be estimated is warned about (see :func:`memory_check`)."""
    check = memory_check(suite, device, processes)
    check.warn()
    return check.problem


def check_memory(
    suite: Suite, device: torch.device, processes: int = 1, *, warn: bool = True
) -> MemoryCheck:
    """Refuse, with the figures, a suite whose pretraining step cannot fit on ``device``;
    warn (``warn``: e.g. on the main rank only) about each variant that could not be
    estimated. Returns what was found."""
    check = memory_check(suite, device, processes)
    if warn:
        check.warn()
    if check.problem:
        raise UserError(check.problem)
    return check
