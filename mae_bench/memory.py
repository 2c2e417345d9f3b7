"""What a suite's pretraining step needs in memory, measured without allocating it.

Each variant's model is built on PyTorch's ``meta`` device (shapes, no data), then one
pretraining step's forward pass and losses run on fake tensors
(:class:`~torch._subclasses.fake_tensor.FakeTensorMode`: CPU tensors that hold no memory, so
the step takes the CPU's own kernels, attention included); autograd's saved-tensor hooks
add up what the backward pass would keep, each storage once. With the backward pass's
transient (twice its largest saved tensor: a gradient in, one out), the weights, their
gradients and AdamW's two moments (and DDP's gradient buckets when the step is
data-parallel), and the input batch, that is the step's footprint. The fine-tuning step
(an evaluator's ``training_step``: the encoder on every patch, with its head, on the
fine-tuning batch) is counted the same way. A suite that cannot fit in the memory of the
device it would run on is refused before anything is loaded.

The step is modelled as the device will run it: on CUDA the model's forward pass in bf16
autocast (as :func:`mae_bench.train.forward_loss` runs it there; the CPU's autocast casts a
ViT's matrix products and attention alike) with fused attention (SDPA's flash kernel keeps
its inputs, output and log-sum-exp, never a sequence x sequence map), elsewhere in float32.
Before, the step ran on ``meta``, where SDPA falls back to its unfused math and keeps fp32
attention maps, and each view of a tensor counted in full: ViT-Base at batch 1024 at 224 was
estimated at 126 GiB for CUDA, 51 GiB as modelled now (tests/test_memory.py checks it
against a transformer's saved-tensor inventory and a measured CPU step).

The masks are drawn (and checked) for a few images on the CPU and stand for the whole
micro-batch as fake tensors, so nothing allocated grows with the batch size. The check is
an estimate: a variant whose plugins fail on fake tensors (an operator with no meta kernel, a
value read from a tensor) cannot be estimated and is not refused; it is named with the
reason (a warning), runs, and its own cells fail with the real reason while every other
variant runs.
"""

from __future__ import annotations

import contextlib
import math
import os
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.multiprocessing.reductions import StorageWeakRef

from mae_bench.contract import Evaluator, Loss, Mask, MaskedAutoencoder, Target
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


def _state_bytes(state: object) -> int:
    """Bytes of the tensors in a target's per-run state (a teacher's weights), nested."""
    if isinstance(state, torch.Tensor):
        return _bytes(state)
    if isinstance(state, dict):
        return sum(_state_bytes(v) for v in state.values())
    if isinstance(state, list | tuple):
        return sum(_state_bytes(v) for v in state)
    return 0


def micro_batch(suite: Suite, processes: int = 1) -> int:
    """Images one process holds in one forward pass: the batch split over data-parallel
    ``processes`` and ``pretrain.accum_iter`` micro-batches."""
    cfg = suite.config.pretrain
    return max(1, cfg.batch_size // (processes * cfg.accum_iter))


class _Autocast(torch.nn.Module):
    """``model``'s forward pass in bf16 autocast on CPU tensors: how a CUDA training step
    runs it (:func:`mae_bench.device.autocast`), on the fake CPU tensors of the estimate."""

    def __init__(self, model: MaskedAutoencoder) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor, mask: Mask) -> object:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return self.model(x, mask)


class SavedBytes(NamedTuple):
    """What autograd keeps for a backward pass: in all, and its largest storage."""

    total: int
    largest: int


def saved_bytes(
    model: MaskedAutoencoder,
    x: Tensor,
    mask: Mask,
    losses: list[tuple[Loss, float]],
    device_type: str = "cpu",
    target: Target | None = None,
) -> SavedBytes:
    """Bytes autograd keeps for the backward pass of one forward pass and its losses, as
    :func:`~mae_bench.train.forward_loss` runs them on ``device_type`` (bf16 autocast on
    ``cuda``): every saved tensor's storage once (views of one tensor share it), not
    counting the model's own weights and buffers nor ``x``, which are there anyway."""
    forward = _Autocast(model) if device_type == "cuda" else None
    return _saved_by(
        lambda: forward_loss(model, x, mask, losses, forward=forward, target=target),
        (*model.parameters(), *model.buffers(), x),
    )


def _saved_by(run: Callable[[], object], present: Iterable[Tensor]) -> SavedBytes:
    """What autograd keeps for the backward pass of ``run()``: every saved tensor's storage
    once (views of one tensor share it), not counting those of ``present`` (the weights,
    buffers and input, which are there anyway)."""
    there = {StorageWeakRef(t.untyped_storage()) for t in present}
    counted: dict[StorageWeakRef, int] = {}

    def pack(t: Tensor) -> Tensor:
        storage = StorageWeakRef(t.untyped_storage())
        if storage not in there and storage not in counted:
            counted[storage] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    return SavedBytes(sum(counted.values()), max(counted.values(), default=0))


def _on_cpu(mask: Mask) -> Mask:
    """A mask of the same shapes on the CPU (fake tensors, under the estimate's mode)."""
    parts = (mask.ids_keep, mask.ids_restore, mask.mask)
    return Mask(*(torch.empty_like(t, device="cpu") for t in parts))


def pretrain_step_bytes(
    variant: Variant, suite: Suite, processes: int = 1, device: torch.device | str = "cpu"
) -> int:
    """Bytes one process needs for a pretraining step of ``variant`` on ``device`` (its
    type: see the module's docstring): weights x 4 for gradients and AdamW (x 5 with
    DDP's gradient buckets when ``processes`` > 1), a target's per-run state (a teacher's
    weights), its micro-batch x 3, and the
    activations kept for backward plus the backward's transient, at the mask ratio of
    either end of training that keeps more. Raises whatever the variant's plugins raise
    on the way."""
    device_type = torch.device(device).type
    ds = suite.config.dataset
    with torch.device("meta"):
        model = variant.build_model(ds.image_size, ds.channels)
    masking, losses = variant.build_masking(), variant.build_losses()
    target = variant.build_target()
    images = micro_batch(suite, processes)
    size = (images, ds.channels, ds.image_size, ds.image_size)
    weights = sum(_bytes(p) for p in model.parameters() if p.requires_grad)
    buckets = weights if processes > 1 else 0  # DDP's flat copy of the gradients
    # a curriculum's lowest ratio keeps the most tokens: both ends of the schedule
    masks = [meta_masks(masking, model, images, progress) for progress in (0.0, 1.0)]
    # no fallback to real kernels: an operator without a meta kernel fails the estimate
    with FakeTensorMode(allow_fallback_kernels=False, allow_non_fake_inputs=True):
        model = model.to_empty(device="cpu")  # fake: shapes and dtypes, no memory
        state = 0
        if target is not None:
            target.setup(model)  # a teacher's copy, fake too
            state = _state_bytes(target.state_dict())
        x = torch.empty(size)
        saved = [
            saved_bytes(model, x, _on_cpu(mask), losses, device_type, target) for mask in masks
        ]
    # the backward pass's transient: the gradients into and out of its largest operation
    activations = max(s.total + 2 * s.largest for s in saved)
    return 4 * weights + buckets + state + 3 * math.prod(size) * 4 + activations


FINETUNE_CLASSES = 1000
"""Classes the heads of the fine-tuning estimate have: the dataset is not loaded yet, and a
linear head is a small share of the step (an upper bound for most datasets)."""


def training_step_bytes(
    evaluator: Evaluator, variant: Variant, suite: Suite, device: torch.device | str = "cpu"
) -> tuple[int, int] | None:
    """Bytes one process needs for a training step of ``evaluator`` (fine-tuning) on
    ``variant``'s encoder on ``device``, and its batch; None for an evaluator that trains
    nothing big (:meth:`mae_bench.Evaluator.training_step`). Counted as the pretraining
    step is (see the module's docstring): the trained weights x 4, the batch x 3, and what
    autograd keeps for the backward pass plus its transient, every patch visible."""
    device_type = torch.device(device).type
    ds = suite.config.dataset
    with torch.device("meta"):
        model = variant.build_model(ds.image_size, ds.channels)
        step = evaluator.training_step(model, FINETUNE_CLASSES)
    if step is None:
        return None
    size = (step.batch_size, ds.channels, ds.image_size, ds.image_size)
    weights = sum(_bytes(p) for p in step.module.parameters() if p.requires_grad)
    with FakeTensorMode(allow_fallback_kernels=False, allow_non_fake_inputs=True):
        module = step.module.to_empty(device="cpu")
        x = torch.empty(size)

        def run() -> object:
            precision = (
                torch.autocast("cpu", dtype=torch.bfloat16)
                if device_type == "cuda"
                else contextlib.nullcontext()
            )
            with precision:
                out = module(x)
            return step.loss(out)

        saved = _saved_by(run, (*module.parameters(), *module.buffers(), x))
    activations = saved.total + 2 * saved.largest  # with the backward pass's transient
    return 4 * weights + 3 * math.prod(size) * 4 + activations, step.batch_size


def memory_budget(device: torch.device) -> tuple[int, str]:
    """Total memory of ``device`` in bytes, and what it is (for messages)."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        return props.total_memory, f"the {props.name}'s"
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return total, "this machine's"


def memory_check(suite: Suite, device: torch.device, processes: int = 1) -> MemoryCheck:
    """Estimate each variant's pretraining step, and its fine-tuning step (an evaluator's
    :meth:`~mae_bench.Evaluator.training_step`), on ``device``: the first that cannot
    fit (``problem``), and the variants whose plugins failed on the way (``unchecked``).

    ``processes`` data-parallel processes on one CPU machine share its memory; on CUDA each
    has its own device. Whatever a plugin raises here is its variant's, never the suite's."""
    budget, whose = memory_budget(device)
    if device.type != "cuda":
        budget //= processes
    ds = suite.config.dataset
    micro = micro_batch(suite, processes)
    problem, unchecked, notes = None, {}, []
    precision = " in bf16 autocast" if device.type == "cuda" else ""
    evaluators = [e.cls(e.params) for e in suite.evaluators]
    for i, variant in enumerate(suite.variants):
        where = f"{suite.source}: variants[{i}] ({variant.name})"
        try:
            need = pretrain_step_bytes(variant, suite, processes, device)
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
                f"activations{precision}), more than {whose} {budget / 2**30:,.1f} GiB of "
                "memory; lower pretrain.batch_size, dataset.image_size or the model size, or raise "
                "pretrain.accum_iter"
            )
        for evaluator in evaluators:  # fine-tuning: every patch visible, its own batch
            try:
                found = training_step_bytes(evaluator, variant, suite, device)
            except STOPS:
                raise
            except BaseException as exc:
                notes.append(
                    f"{where}: its {evaluator.name} step's memory could not be estimated "
                    f"({exception_line(exc)}); it is not refused"
                )
                continue
            if found is not None and found[0] > budget and problem is None:
                need, batch = found
                problem = (
                    f"{where}: one {evaluator.name} training step needs about "
                    f"{need / 2**30:,.1f} GiB (batch {batch} at {ds.image_size}x"
                    f"{ds.image_size}, every patch visible: weights, gradients, AdamW state "
                    f"and activations{precision}), more than {whose} {budget / 2**30:,.1f} "
                    f"GiB of memory; lower eval.{evaluator.name}.batch_size or the model size"
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
