"""What a suite's pretraining step needs in memory, measured without allocating it.

Each variant's model is built on PyTorch's ``meta`` device (shapes, no data) and one
pretraining step's forward pass and losses run there; autograd's saved-tensor hooks add up
what the backward pass would keep. With the weights, their gradients and AdamW's two moments,
and the input batch, that is the step's footprint. A suite that cannot fit in the memory of
the device it would run on is refused before anything is loaded.
"""

from __future__ import annotations

import os

import torch

from mae_bench.contract import Mask
from mae_bench.errors import UserError
from mae_bench.suite import Suite, Variant
from mae_bench.train import forward_loss


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
    lowest mask ratio it uses."""
    ds = suite.config.dataset
    with torch.device("meta"):
        model = variant.build_model(ds.image_size, ds.channels)
    masking, losses = variant.build_masking(), variant.build_losses()
    size = (micro_batch(suite, processes), ds.channels, ds.image_size, ds.image_size)
    x = torch.empty(size, device="meta")
    weights = sum(_bytes(p) for p in model.parameters() if p.requires_grad)
    peak = 0
    for progress in (0.0, 1.0):  # a curriculum's lowest ratio keeps the most tokens
        drawn = masking(len(x), model.grid, progress=progress)
        mask = Mask(*(t.to("meta") for t in (drawn.ids_keep, drawn.ids_restore, drawn.mask)))
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


def memory_problem(suite: Suite, device: torch.device, processes: int = 1) -> str | None:
    """Why ``suite``'s pretraining step cannot fit on ``device`` (with the figures), or None.

    ``processes`` data-parallel processes on one CPU machine share its memory; on CUDA each
    has its own device."""
    budget, whose = memory_budget(device)
    if device.type != "cuda":
        budget //= processes
    ds = suite.config.dataset
    micro = micro_batch(suite, processes)
    for i, variant in enumerate(suite.variants):
        need = pretrain_step_bytes(variant, suite, processes)
        if need > budget:
            return (
                f"{suite.source}: variants[{i}] ({variant.name}): one pretraining step needs "
                f"about {need / 2**30:,.1f} GiB per process (micro-batch {micro} at "
                f"{ds.image_size}x{ds.image_size}: weights, gradients, AdamW state and "
                f"activations), more than {whose} {budget / 2**30:,.1f} GiB of memory; lower "
                "dataset.image_size or the model size, or raise pretrain.accum_iter"
            )
    return None


def check_memory(suite: Suite, device: torch.device, processes: int = 1) -> None:
    """Refuse, with the figures, a suite whose pretraining step cannot fit on ``device``."""
    problem = memory_problem(suite, device, processes)
    if problem:
        raise UserError(problem)
