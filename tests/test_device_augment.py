"""RandAugment batched on the device (issue 18, item 8; plugins/finetune.py): both of
fine-tuning's RandAugments (timm's ``augment.randaugment``, the official recipe's, and
torchvision's ``randaugment: true``) run on the feeder's device, a whole batch at once, with
every random number from the cell's generator (never a global one), and apply the same
operations as timm's PIL RandAugment and torchvision's. Also the masking contract on
devices that docs/plugins.md states (item 10), by running its example.

The device checks run on PyTorch's ``meta`` device: image-sized work on the CPU, or a copy
from the CPU to ``meta``, is what a CUDA run would do on the host or copy to the GPU."""

from __future__ import annotations

import dataclasses
import math
import random
import re
import signal
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from mae_bench_plugins.finetune import (
    OFFICIAL_RANDAUGMENT,
    BatchRandAugment,
    FinetuneParams,
    finetune,
    rand_augment,
    timm_rand_augment,
    torchvision_rand_augment,
    training_input,
)
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from mae_bench import resume
from mae_bench.data import ImageFeeder
from mae_bench.suite import resolve_suite
from mae_bench.train import draw_mask
from tests.conftest import ROOT, invoke, small_vit, tiny_suite_data, write_suite
from tests.test_host_copies import HostCopies

META, CPU = torch.device("meta"), torch.device("cpu")
MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
CROP = {"crop_scale": (0.3, 1.0), "hflip": True}


def _images(n: int, side: int = 24, seed: int = 0) -> torch.Tensor:
    """Smooth uint8 images with an edge: every operation changes them visibly."""
    coarse = torch.rand(n, 3, 5, 5, generator=torch.Generator().manual_seed(seed))
    smooth = F.interpolate(coarse, size=(side, side), mode="bicubic")
    images = (smooth.clamp(0, 1) * 255).round().to(torch.uint8)
    images[:, :, side // 3 : side // 2, side // 4 : side // 2] = 220
    return images


# one RandAugment each, with crops; no erasing (its noise generator has no ``meta`` version)
TIMM = {"augment": {**CROP, "randaugment": OFFICIAL_RANDAUGMENT}}
TORCHVISION = {"randaugment": True, "augment": CROP}


_COPIES = (torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default)


class ImageWorkOnTheHost(TorchDispatchMode):
    """Records the operations that read an image-sized CPU tensor: per-image work a GPU run
    would do on the host. Views and copies (staging the batch for its one copy to the
    device) are not work."""

    def __init__(self, image_numel: int) -> None:
        super().__init__()
        self.image_numel = image_numel
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.is_view or func in _COPIES:
            return out
        inputs = pytree.tree_leaves((args, kwargs))
        if any(
            isinstance(t, torch.Tensor) and t.device == CPU and t.numel() >= self.image_numel
            for t in inputs
        ):
            self.ops.append(str(func))
        return out


# ----------------------------------------------------------------- on the device
@pytest.mark.parametrize("changes", [TIMM, TORCHVISION], ids=["timm", "torchvision"])
def test_randaugment_runs_on_the_feeders_device_with_two_copies(changes):
    """A batch of 8 stored images through ``training_input`` with a ``meta`` feeder: no
    image-sized work on the host, and two copies that do not block (the images with the
    augmentation's draws or the crops, and the other). Before: every image through PIL or
    torchvision on the CPU (timm's path could not run at all: it copied pixels back)."""
    feeder = ImageFeeder(16, 3, MEAN, STD, META)
    images = _images(8, side=20)
    cfg = FinetuneParams(**changes)
    training_input(images, feeder, cfg, torch.Generator().manual_seed(0))  # constants made
    host, copies = ImageWorkOnTheHost(3 * 16 * 16), HostCopies()
    with host, copies:
        x = training_input(images, feeder, cfg, torch.Generator().manual_seed(0))
    assert x.device == META and x.shape == (8, 3, 16, 16)
    assert host.ops == []
    assert len(copies.copies) == 2, copies.copies
    assert all(non_blocking for _, non_blocking in copies.copies)


@pytest.mark.parametrize(
    "augment",
    [timm_rand_augment(OFFICIAL_RANDAUGMENT, MEAN), torchvision_rand_augment()],
    ids=["timm", "torchvision"],
)
def test_the_batch_stays_on_its_device(augment):
    images, host = _images(16).to(META), ImageWorkOnTheHost(3 * 24 * 24)
    with host:
        out = augment(images, torch.Generator().manual_seed(0))
    assert out.device == META and out.dtype == torch.uint8 and host.ops == []


# ----------------------------------------------------------------- random numbers
@pytest.mark.parametrize(
    "augment",
    [timm_rand_augment(OFFICIAL_RANDAUGMENT, MEAN), torchvision_rand_augment()],
    ids=["timm", "torchvision"],
)
def test_a_generator_seed_gives_one_result_that_changes_images_in_uint8_range(augment):
    images = _images(64)
    a = augment(images, torch.Generator().manual_seed(3))
    b = augment(images, torch.Generator().manual_seed(3))
    c = augment(images, torch.Generator().manual_seed(4))
    assert a.dtype == torch.uint8 and a.shape == images.shape
    assert torch.equal(a, b) and not torch.equal(a, c)
    changed = (a != images).flatten(1).any(dim=1).float().mean()
    # timm: each of 2 ops applied with probability 0.5; torchvision: always (1/14: identity)
    assert changed > (0.6 if augment.prob < 1 else 0.9)


def test_a_unit_interval_batch_is_augmented_as_its_8_bit_values():
    """After the crop the official recipe's batch is [0, 1] floats: augmented as the 8-bit
    images PIL would see, and kept on 8-bit steps."""
    images = _images(32)
    pixels = images.float() / 255
    out = rand_augment(pixels, OFFICIAL_RANDAUGMENT, MEAN, torch.Generator().manual_seed(3))
    assert out.dtype == pixels.dtype and out.min() >= 0 and out.max() <= 1
    expected = timm_rand_augment(OFFICIAL_RANDAUGMENT, MEAN)(
        images, torch.Generator().manual_seed(3)
    )
    assert torch.equal(out * 255, expected.float())


def test_operations_and_magnitudes_are_drawn_per_image():
    """timm's rand-m9-mstd0.5-inc1: per image and layer, one of 15 operations uniformly
    (with replacement), applied with probability 0.5 at a magnitude around 9."""
    augment = timm_rand_augment(OFFICIAL_RANDAUGMENT, MEAN)
    assert (augment.num_ops, augment.magnitude, augment.magnitude_std) == (2, 9.0, 0.5)
    assert len(augment.ops) == 15 and augment.prob == 0.5
    n = 20_000
    order, params, counts = augment.draw(n, (32, 32), torch.Generator().manual_seed(0))
    assert order.shape == (2, n) and params.shape == (2, n, 6)
    for layer in counts:
        skipped = layer[-1] / n
        assert abs(skipped - 0.5) < 0.015
        per_op = {g: c / n / 0.5 for g, c in zip(augment.groups, layer, strict=False)}
        assert abs(per_op["affine_x"] - 2 / 15) < 0.015  # shear and translation along x
        assert abs(per_op["affine"] - 1 / 15) < 0.01  # rotation
        assert abs(per_op["equalize"] - 1 / 15) < 0.01
    # posterize's bits: 4 - int(4 m / 10) at m ~ N(9, 0.5) clipped to [0, 10]: mostly 1
    posterize = augment.groups.index("posterize")
    start = sum(counts[0][:posterize])
    bits = params[0, start : start + counts[0][posterize], 0]
    assert set(bits.tolist()) <= {0.0, 1.0, 2.0} and (bits == 1).float().mean() > 0.8


class _Recorder:
    """Calls to a function, recorded and passed on."""

    def __init__(self, monkeypatch, owner: Any, name: str, calls: list[str]) -> None:
        real = getattr(owner, name)

        def recording(*args, **kwargs):
            calls.append(f"{getattr(owner, '__name__', owner)}.{name}")
            return real(*args, **kwargs)

        monkeypatch.setattr(owner, name, recording)


def test_global_generators_are_never_read_or_reseeded(monkeypatch):
    """No seeding or state setting of torch's CPU or (mocked) CUDA generators, numpy's or
    Python's: DropPath's random draws between batches continue as if no batch had been
    augmented. Before: torchvision's RandAugment was run from the reseeded global CPU
    generator (saved and restored around each batch)."""
    from timm.layers import DropPath

    calls: list[str] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for owner, name in [
        (torch, "manual_seed"),
        (torch, "seed"),
        (torch, "set_rng_state"),
        (torch, "get_rng_state"),
        (torch.random, "manual_seed"),
        (torch.cuda, "manual_seed"),
        (torch.cuda, "manual_seed_all"),
        (torch.cuda, "set_rng_state"),
        (torch.cuda, "set_rng_state_all"),
        (torch.cuda, "get_rng_state"),
    ]:
        _Recorder(monkeypatch, owner, name, calls)
    feeder = ImageFeeder(16, 3, MEAN, STD, CPU)
    drop = DropPath(0.5).train()
    ones = torch.ones(64, 1)

    def draws(augment_between: bool) -> list[torch.Tensor]:
        torch.random.default_generator.manual_seed(0)  # the cell's seed, set once
        out = []
        for step in range(3):
            out.append(drop(ones))
            if augment_between:
                for changes in (TIMM, TORCHVISION):
                    generator = torch.Generator().manual_seed(step)
                    cfg = FinetuneParams(**changes)
                    training_input(_images(8, seed=step), feeder, cfg, generator)
        return out

    python_state, numpy_state = random.getstate(), np.random.get_state()[1].copy()
    plain = draws(augment_between=False)
    calls.clear()
    augmented = draws(augment_between=True)
    assert calls == []
    assert all(torch.equal(a, b) for a, b in zip(plain, augmented, strict=True))
    assert random.getstate() == python_state
    assert np.array_equal(np.random.get_state()[1], numpy_state)


@pytest.mark.parametrize(
    "changes",
    [{"augment": {**TIMM["augment"], "reprob": 0.25}}, TORCHVISION],
    ids=["timm", "torchvision"],
)
def test_a_resumed_finetuning_augments_as_an_uninterrupted_one(
    tmp_path, registry, monkeypatch, changes
):
    """Each RandAugment draws from the fine-tuning generator, saved in its checkpoint:
    stopped after epoch 1 and resumed, a run ends exactly as one run straight through."""
    suite = resolve_suite(tiny_suite_data(), registry)
    data = suite.build_dataset().load()
    feeder = ImageFeeder.fit(data.pretrain, image_size=16, channels=3, device=CPU)
    torch.manual_seed(0)
    model = suite.variants[0].build_model(16, 3)  # the MLP: fast
    cfg = FinetuneParams(epochs=2, batch_size=32, val_fraction=0.25, **changes)
    straight = finetune(model, data, feeder, cfg, seed=3)
    checkpoint = resume.Checkpoint(tmp_path / "ft.pt", "key", every=0)
    real = resume.requested
    monkeypatch.setattr(resume, "requested", lambda: (signal.SIGTERM, False))
    with pytest.raises(resume.Terminated, match="after epoch 1"):
        finetune(model, data, feeder, cfg, seed=3, checkpoint=checkpoint)
    monkeypatch.setattr(resume, "requested", real)
    torch.manual_seed(99)
    again = finetune(model, data, feeder, cfg, seed=3, checkpoint=checkpoint)
    np.testing.assert_equal(again[0], straight[0])  # NaN (not converged) equals NaN
    assert again[1] == straight[1] and torch.equal(again[2], straight[2])


# ----------------------------------------------------------------- the same operations
def _one(augment: BatchRandAugment, kind: str, x: torch.Tensor, argument: float) -> torch.Tensor:
    """``augment``'s operation ``kind`` on every image of ``x`` with one ``argument``."""
    from mae_bench_plugins.finetune import _AFFINE, _GROUP

    arg = torch.full((len(x),), float(argument), dtype=torch.float64)
    if kind in _AFFINE:
        coefficients = _AFFINE[kind](arg, x.shape[-2:]).float()
        return augment._run(_GROUP[kind], x.float(), coefficients)
    return augment._run(kind, x.float(), F.pad(arg.float().view(-1, 1), (0, 5)))


def _pil(op: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    from PIL import Image

    out = [np.asarray(op(Image.fromarray(img.permute(1, 2, 0).numpy()), *args, **kwargs))
           for img in x]  # fmt: skip
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).float()


PIXEL_OPS = [  # timm's operation, its argument, this module's kind
    ("equalize", None, "equalize"),
    ("invert", None, "invert"),
    ("posterize", 1, "posterize"),
    ("posterize", 3, "posterize"),
    ("solarize", 26, "solarize"),
    ("solarize_add", 99, "solarize_add"),
    ("color", 1.81, "color"),
    ("color", 0.19, "color"),
    ("contrast", 1.81, "contrast"),
    ("contrast", 0.19, "contrast"),
    ("brightness", 1.81, "brightness"),
    ("sharpness", 1.81, "sharpness"),
    ("sharpness", 0.19, "sharpness"),
]


@pytest.mark.parametrize(("name", "argument", "kind"), PIXEL_OPS)
def test_pixel_operations_are_pils_bit_for_bit(name, argument, kind):
    from timm.data import auto_augment

    x = _images(12)
    expected = _pil(getattr(auto_augment, name), x, *(() if argument is None else (argument,)))
    augment = timm_rand_augment(OFFICIAL_RANDAUGMENT, MEAN)
    assert torch.equal(_one(augment, kind, x, argument or 0), expected)


def test_autocontrast_is_torchvisions_within_one_level_of_pils():
    from timm.data import auto_augment

    x = _images(12)
    out = _one(timm_rand_augment(OFFICIAL_RANDAUGMENT, MEAN), "autocontrast", x, 0)
    difference = (out - _pil(auto_augment.auto_contrast, x)).abs()
    assert difference.max() <= 1 and difference.mean() < 0.02


@pytest.mark.parametrize(
    ("name", "argument", "kind", "scale"),
    [
        ("rotate", 27.0, "rotate", 1),
        ("rotate", -13.5, "rotate", 1),
        ("shear_x", 0.27, "shear_x", 1),
        ("shear_y", -0.27, "shear_y", 1),
        ("translate_x_rel", 0.405, "translate_x", 24),
        ("translate_y_rel", -0.405, "translate_y", 24),
    ],
)
@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear", "nearest"])
def test_geometric_operations_are_pils(name, argument, kind, scale, interpolation):
    """PIL's affine transform (timm's ops): the same map, edges, fill and kernels (bicubic:
    PIL's a = -1 cubic, not ``grid_sample``'s), to float rounding: at most one level apart,
    on under 5% of the values."""
    from PIL import Image
    from timm.data import auto_augment

    x = _images(12)
    fill = tuple(round(255 * v) for v in MEAN)
    resample = getattr(Image, interpolation.upper())
    expected = _pil(getattr(auto_augment, name), x, argument, fillcolor=fill, resample=resample)
    augment = timm_rand_augment(OFFICIAL_RANDAUGMENT, MEAN)
    augment = dataclasses.replace(augment, interpolation=interpolation)
    difference = (_one(augment, kind, x, argument * scale) - expected).abs()
    assert difference.max() <= 1 and (difference > 0).float().mean() < 0.05


SHEAR = math.degrees(math.atan(0.09))  # torchvision's shear angle at magnitude 9 of 31

TORCHVISION_OPS = [  # torchvision's call as its RandAugment makes it, the argument, the kind
    (lambda v2F, x: v2F.affine(x, 0.0, [0, 0], 1.0, [SHEAR, 0.0], center=[0, 0]), 0.09,
     "shear_x"),
    (lambda v2F, x: v2F.affine(x, 0.0, [0, 0], 1.0, [0.0, -SHEAR], center=[0, 0]), -0.09,
     "shear_y"),
    (lambda v2F, x: v2F.affine(x, 0.0, [3, 0], 1.0, [0.0, 0.0]), -3, "translate_x"),
    (lambda v2F, x: v2F.affine(x, 0.0, [0, -3], 1.0, [0.0, 0.0]), 3, "translate_y"),
    (lambda v2F, x: v2F.rotate(x, 9.0), 9.0, "rotate"),
    (lambda v2F, x: v2F.adjust_brightness(x, 1.27), 1.27, "brightness"),
    (lambda v2F, x: v2F.adjust_sharpness(x, 0.73), 0.73, "sharpness"),
    (lambda v2F, x: v2F.posterize(x, 7), 7, "posterize"),
    (lambda v2F, x: v2F.solarize(x, 178.5), 178.5, "solarize"),
    (lambda v2F, x: v2F.equalize(x), 0, "equalize"),
]  # fmt: skip


@pytest.mark.parametrize(("call", "argument", "kind"), TORCHVISION_OPS)
def test_torchvisions_operations_are_torchvisions(call, argument, kind):
    """torchvision's RandAugment at magnitude 9 (nearest, black fill): the same pixels.
    Its colour and contrast blends differ from PIL's rounding of the grey by one level; this
    module follows PIL's (checked above)."""
    from torchvision.transforms.v2 import functional as v2F

    x = _images(12)
    expected = call(v2F, x).float()
    assert torch.equal(_one(torchvision_rand_augment(), kind, x, argument), expected)


# ----------------------------------------------------------------- configs
def test_a_randaugment_config_without_a_batched_version_is_refused_naming_it(tmp_path):
    finetune_eval = {"enabled": True, "augment": {"randaugment": "rand-m9-t3a"}}
    suite = write_suite(tmp_path, eval={"finetune": finetune_eval})
    refused = invoke("validate", str(suite))
    assert refused.exit_code == 2 and len(refused.stderr.strip().splitlines()) == 1
    named = "eval.finetune.augment: randaugment 'rand-m9-t3a': the batched RandAugment has no "
    assert f"{named}GaussianBlur" in refused.stderr
    with pytest.raises(ValueError, match=r"randaugment 'rand-x9' is not a timm RandAugment"):
        FinetuneParams(augment={"randaugment": "rand-x9"})
    weighted = FinetuneParams(augment={"randaugment": "rand-m7-n3-tweights"}).augment
    augment = timm_rand_augment(weighted.randaugment, MEAN)
    assert augment.weights is not None and augment.num_ops == 3
    order, _, counts = augment.draw(4, (8, 8), torch.Generator().manual_seed(0))
    assert order.shape == (3, 4) and all(sum(layer) == 4 for layer in counts)


# ----------------------------------------------------------------- on a GPU
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(
    "augment",
    [timm_rand_augment(OFFICIAL_RANDAUGMENT, MEAN), torchvision_rand_augment()],
    ids=["timm", "torchvision"],
)
def test_randaugment_on_cuda_matches_the_cpu_and_leaves_cuda_generators_alone(augment):
    images = _images(64)
    on_cpu = augment(images, torch.Generator().manual_seed(0))
    cuda_state = torch.cuda.get_rng_state()
    on_gpu = augment(images.cuda(), torch.Generator().manual_seed(0))
    assert on_gpu.is_cuda and torch.equal(torch.cuda.get_rng_state(), cuda_state)
    # float rounding on the GPU may truncate a value to the next 8-bit level, rarely
    difference = (on_gpu.cpu().float() - on_cpu.float()).abs()
    assert (difference > 1).float().mean() < 0.005 and difference.mean() < 0.05
    for changes in (TIMM, TORCHVISION):
        feeder = ImageFeeder(16, 3, MEAN, STD, torch.device("cuda"))
        x = training_input(images, feeder, FinetuneParams(**changes), torch.Generator())
        assert x.is_cuda and x.shape == (64, 3, 16, 16)
    assert torch.equal(torch.cuda.get_rng_state(), cuda_state)


# ----------------------------------------------------------------- masking on devices
def _docs_masking_example() -> dict[str, Any]:
    """The example masking strategy of docs/plugins.md ("Where masks are drawn"), run."""
    docs = (ROOT / "docs" / "plugins.md").read_text()
    block = re.search(r"<!-- masking-on-devices:.*?-->\n```python\n(.*?)```", docs, re.S)
    assert block, "docs/plugins.md lost its masking example"
    namespace: dict[str, Any] = {}
    exec(compile(block.group(1), "docs/plugins.md", "exec"), namespace)
    return namespace


def test_the_documented_masking_contract_holds(registry):
    """What docs/plugins.md says a masking strategy gets (a CPU generator, ``device=cpu``,
    also when the model is on another device) and must do (draw there, then move), checked
    with its own example."""
    strategy = _docs_masking_example()["HalfMasking"]
    calls: list[tuple[str, str]] = []

    class Recording(strategy):
        def __call__(self, batch_size, grid, *, progress=1.0, generator=None, device=None):
            calls.append((str(device), str(generator.device)))
            return super().__call__(batch_size, grid, progress=progress, generator=generator,
                                    device=device)  # fmt: skip

    masking = Recording(strategy.Params())
    model = small_vit(registry).to(META)
    mask = draw_mask(masking, 6, model, 0.5, torch.Generator().manual_seed(0))
    assert calls == [("cpu", "cpu")]
    assert mask.mask.device == META and mask.ids_keep.shape == (6, model.num_patches // 2)
    direct = masking(3, (4, 4), generator=torch.Generator().manual_seed(0), device=META)
    assert direct.ids_restore.device == META  # a direct call with a device: moved there


def test_the_documented_example_is_a_valid_strategy(registry):
    strategy = _docs_masking_example()["HalfMasking"]
    model = small_vit(registry)
    mask = draw_mask(strategy(strategy.Params()), 5, model, 0.0, torch.Generator())
    assert mask.mask.sum(dim=1).tolist() == [model.num_patches // 2] * 5
