"""Keeping an accelerator fed (issue 18, item 4): a pretraining step copies at most two
tensors from the host to its device (the batch, with its crop parameters when augmenting,
and the masks), each without blocking; constant tensors are built once per device.

Checked on the CPU with the feeder and the model on PyTorch's ``meta`` device: every copy
from the CPU to ``meta`` is one a CUDA run would make from the host to the GPU."""

from __future__ import annotations

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from mae_bench.data import ImageFeeder, pack_bytes, to_device, unpack_bytes
from mae_bench.suite import resolve_suite
from mae_bench.train import pretrain
from tests.conftest import tiny_suite_data

META = torch.device("meta")
_FROM_DATA = (torch.tensor, torch.as_tensor, torch.Tensor.new_tensor)


class HostCopies(TorchDispatchMode):
    """Counts copies from the CPU to ``meta``: ``aten._to_copy``/``aten.copy_`` between them
    (``.to``, ``copy_``), and whether each was asked not to block."""

    def __init__(self) -> None:
        super().__init__()
        self.copies: list[tuple[tuple[int, ...], bool]] = []  # (shape, non_blocking)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func is torch.ops.aten._to_copy.default:
            source, dest = args[0], out
            non_blocking = bool(kwargs.get("non_blocking", False))
        elif func is torch.ops.aten.copy_.default:
            source, dest = args[1], args[0]
            non_blocking = bool(args[2] if len(args) > 2 else kwargs.get("non_blocking", False))
        else:
            return out
        if source.device.type == "cpu" and dest.device == META:
            self.copies.append((tuple(source.shape), non_blocking))
        return out


class TensorsFromData(TorchFunctionMode):
    """Counts tensors made on ``meta`` from host data (``torch.tensor([...], device=...)``,
    ``new_tensor``, ``as_tensor``): copies the dispatcher does not show."""

    def __init__(self) -> None:
        super().__init__()
        self.made = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        source = args[1] if func is torch.Tensor.new_tensor else (args[0] if args else None)
        from_meta = isinstance(source, torch.Tensor) and source.is_meta
        if func in _FROM_DATA and isinstance(out, torch.Tensor) and out.is_meta and not from_meta:
            self.made += 1
        return out


AUGMENT = {"crop_scale": [0.3, 1.0], "hflip": True}


@pytest.mark.parametrize("augment", [None, AUGMENT], ids=["plain", "augmented"])
def test_a_pretraining_step_copies_two_tensors_to_the_device_without_blocking(registry, augment):
    """The tiny suite's ViT cell (curriculum masking; mse, laplacian and uniformity losses):
    per step, one copy of the batch (its crops included) and one of the masks. Before this
    fix: 8 plain, 10 augmented (each mask tensor, the batch, the crops' resize weights, the
    normalisation's mean and std, the Laplacian kernel twice), all blocking."""
    data = tiny_suite_data()
    data["pretrain"].update(epochs=1)
    if augment:
        data["pretrain"]["augment"] = augment
    suite = resolve_suite(data, registry)
    images = suite.build_dataset().load().pretrain
    variant = suite.variants[1]
    cfg = suite.config.pretrain
    steps = len(images) // cfg.batch_size
    copies, made = HostCopies(), TensorsFromData()
    per_step: list[int] = []  # copies made so far when each step's batch is fed

    class StepFeeder(ImageFeeder):
        def __call__(self, *args, **kwargs):
            per_step.append(len(copies.copies))
            return super().__call__(*args, **kwargs)

    model = variant.build_model(16, 3).to(META)
    feeder = StepFeeder(16, 3, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3), META)
    with made, copies, pytest.raises(RuntimeError, match="meta"):
        # the epoch's end reads the loss, which a meta tensor does not hold
        pretrain(
            model, images, feeder, variant.build_masking(), variant.build_losses(), cfg, seed=0
        )
    assert made.made == 0
    assert len(per_step) == steps
    counts = [b - a for a, b in zip(per_step, [*per_step[1:], len(copies.copies)], strict=True)]
    # the first step also makes the feeder's constants (mean, std: one copy)
    assert counts == [3] + [2] * (steps - 1), copies.copies
    assert all(non_blocking for _, non_blocking in copies.copies), copies.copies


def test_fed_batches_are_copied_once_and_normalised_with_constants_made_once(registry):
    """Two batches through a ``meta`` feeder: one copy each, the mean and std made once."""
    feeder = ImageFeeder(16, 1, (0.5,), (0.2,), META)  # RGB to grey: the luma weights too
    batch = torch.randint(0, 256, (4, 3, 20, 20), dtype=torch.uint8)
    copies, made = HostCopies(), TensorsFromData()
    with made, copies:
        for _ in range(2):
            x = feeder(batch)
            feeder.to_pixels(x)
    assert x.shape == (4, 1, 16, 16)
    assert made.made == 0
    # each batch as it is, and once the constants (mean, std and luma weights: one copy)
    shapes = [shape for shape, _ in copies.copies]
    assert len(shapes) == 3 and shapes.count((4, 3, 20, 20)) == 2, shapes


def test_packed_tensors_come_back_bit_for_bit():
    """Tensors of several dtypes and shapes packed into one byte buffer (one copy) are
    unpacked exactly: NaN payloads, bools and bfloat16 included."""
    parts = [
        torch.randint(0, 256, (2, 3, 5, 5), dtype=torch.uint8),
        torch.tensor([[1.5, float("nan")], [-0.0, 3.25]]),
        torch.tensor([True, False, True]),
        torch.arange(7, dtype=torch.int64).view(1, 7),
        torch.tensor([0.1, 1.0], dtype=torch.bfloat16),
        torch.zeros(0, 4),
    ]
    buffer, layout = pack_bytes(parts)
    assert buffer.dtype == torch.uint8 and buffer.ndim == 1
    back = unpack_bytes(buffer, layout)
    for before, after in zip(parts, back, strict=True):
        assert after.dtype == before.dtype and after.shape == before.shape
        assert after.is_contiguous()
        assert torch.equal(after.view(torch.uint8), before.view(torch.uint8))


def test_tensors_already_on_the_device_are_not_copied():
    """On the CPU nothing moves; tensors already on the device stay as they are."""
    cpu = torch.rand(3)
    assert to_device([cpu], torch.device("cpu"))[0] is cpu
    on_meta = torch.empty(2, device=META)
    copies = HostCopies()
    with copies:
        moved, kept = to_device([cpu, on_meta], META)
    assert kept is on_meta and moved.is_meta and moved.shape == cpu.shape
    assert len(copies.copies) == 1


def test_constants_made_in_inference_mode_still_train():
    """The cached Laplacian kernel and normalisation constants, first made under
    ``torch.inference_mode`` (an evaluation), can be saved for backward afterwards."""
    from mae_bench.layers import laplacian

    feeder = ImageFeeder(8, 3, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3), torch.device("cpu"))
    with torch.inference_mode():
        laplacian(torch.rand(1, 2, 8, 8, dtype=torch.float64))
        feeder.to_pixels(torch.rand(1, 3, 8, 8, dtype=torch.float64))
    x = torch.rand(1, 2, 8, 8, dtype=torch.float64, requires_grad=True)
    laplacian(x).pow(2).sum().backward()
    y = torch.rand(1, 3, 8, 8, dtype=torch.float64, requires_grad=True)
    (feeder.to_pixels(y) * 2).sum().backward()
    assert x.grad is not None and y.grad is not None


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_feeding_on_cuda_matches_the_cpu(registry):
    """The same batch, crops and masks on CUDA as on the CPU (weights to rounding)."""
    from mae_bench.suite import AugmentConfig
    from mae_bench.train import draw_mask
    from tests.conftest import make_component, small_vit

    batch = torch.randint(0, 256, (8, 3, 20, 20), dtype=torch.uint8)
    augment = AugmentConfig(crop_scale=(0.3, 1.0), hflip=True)
    fed = []
    for device in ("cpu", "cuda"):
        feeder = ImageFeeder(16, 3, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3), torch.device(device))
        fed.append(feeder(batch, augment, torch.Generator().manual_seed(0)).cpu())
    assert torch.allclose(fed[0], fed[1], atol=1e-4)
    masking = make_component(registry, "masking", "block", ratio=0.6)
    masks = [
        draw_mask(masking, 8, small_vit(registry).to(device), 0.5, torch.Generator().manual_seed(1))
        for device in ("cpu", "cuda")
    ]
    assert masks[1].ids_keep.is_cuda and masks[1].mask.dtype == masks[0].mask.dtype
    for name in ("ids_keep", "ids_restore", "mask"):
        assert torch.equal(getattr(masks[0], name), getattr(masks[1], name).cpu())
