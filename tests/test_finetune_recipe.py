"""Fine-tuning as the official MAE recipe (plugins/finetune.py): its settings, the global-pool
head with ``fc_norm``, the layer-wise lr scales, the augmentations' statistics, a short run
that learns, the sanity facts stored with the result, and curves with one evaluation point.

Expected values come from the official formulas (facebookresearch/mae ``main_finetune.py``,
``util/datasets.py``, ``util/lr_decay.py``, ``models_vit.py`` and timm's
``RandomErasing``), written out here; the official code is not copied."""

import json
import random
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from mae_bench_plugins.finetune import (
    Classifier,
    FinetuneCurves,
    FinetuneEvaluator,
    FinetuneParams,
    finetune,
    rand_augment,
    random_erasing,
    training_input,
)

from mae_bench.data import ImageFeeder
from mae_bench.suite import resolve_suite
from tests.conftest import small_vit, tiny_suite_data

CPU = torch.device("cpu")


# ----------------------------------------------------------------- the recipe's settings
def test_the_official_recipe_sets_the_official_values():
    cfg = FinetuneParams(recipe="official", batch_size=128)
    aug = cfg.augment
    assert aug.crop_scale == (0.08, 1.0) and aug.crop_ratio == pytest.approx((3 / 4, 4 / 3))
    assert aug.hflip and aug.randaugment == "rand-m9-mstd0.5-inc1" and aug.reprob == 0.25
    assert (cfg.mixup, cfg.cutmix, cfg.label_smoothing) == (0.8, 1.0, 0.1)
    assert (cfg.drop_path, cfg.layer_decay, cfg.weight_decay) == (0.1, 0.75, 0.05)
    assert (cfg.warmup_epochs, cfg.min_lr, cfg.head, cfg.pool) == (5.0, 1e-6, "official", "mean")
    assert cfg.blr == 5e-4 and cfg.lr == pytest.approx(5e-4 * 128 / 256)  # lr = blr x batch/256


def test_the_recipe_yields_to_what_the_suite_sets():
    cfg = FinetuneParams(recipe="official", lr=3e-3, layer_decay=0.65, augment={"reprob": 0.0})
    assert cfg.lr == 3e-3 and cfg.blr is None and cfg.layer_decay == 0.65
    assert cfg.augment.reprob == 0.0 and cfg.augment.crop_scale == (0.08, 1.0)  # merged
    plain = FinetuneParams()  # the default recipe is unchanged: no augmentation, extra norm
    assert plain.head == "extra_norm" and plain.augment.crop_scale is None
    assert not plain.augment.hflip and plain.augment.reprob == 0 and plain.mixup == 0
    with pytest.raises(ValueError, match="lr or blr"):
        FinetuneParams(lr=1e-3, blr=1e-3)


# ----------------------------------------------------------------- the head
def _encoder_tokens(model, x):
    """The ViT's tokens after its blocks, before its final norm: (B, 1 + L, D)."""
    enc = model.encoder
    patches = enc.patch_embed(x) + enc.pos_embed
    return enc.blocks(torch.cat([enc.cls_token.expand(len(x), -1, -1), patches], dim=1))


def test_the_official_global_pool_head_replaces_the_encoders_norm_with_fc_norm(registry):
    torch.manual_seed(0)
    model = small_vit(registry)
    clf = Classifier(model, num_classes=5, pool="mean", head="official").eval()
    assert isinstance(clf.norm, torch.nn.LayerNorm) and clf.norm.eps == 1e-6
    eps = {m.eps for m in clf.modules() if isinstance(m, torch.nn.LayerNorm)}
    assert eps == {1e-6}  # no torch-default (1e-5) norm anywhere
    assert not any(name.startswith("model.encoder.norm.") for name, _ in clf.named_parameters())
    with torch.no_grad():
        clf.norm.weight.uniform_(0.5, 1.5)
        clf.norm.bias.uniform_(-0.5, 0.5)
        clf.head.weight.normal_()
        x = torch.randn(3, 3, 16, 16)
        pooled = _encoder_tokens(model, x)[:, 1:].mean(dim=1)  # patch tokens, no cls
        expected = clf.head(F.layer_norm(pooled, (32,), clf.norm.weight, clf.norm.bias, 1e-6))
        assert torch.allclose(clf(x), expected, atol=1e-5)
    assert isinstance(model.encoder.norm, torch.nn.LayerNorm)  # the original is untouched


def test_the_official_cls_head_is_the_encoders_norm_then_the_cls_token(registry):
    torch.manual_seed(0)
    model = small_vit(registry)
    clf = Classifier(model, num_classes=5, pool="cls", head="official").eval()
    assert not any(isinstance(m, torch.nn.LayerNorm) for m in clf.norm.modules())
    with torch.no_grad():
        clf.head.weight.normal_()
        x = torch.randn(3, 3, 16, 16)
        expected = clf.head(model.encoder.norm(_encoder_tokens(model, x))[:, 0])
        assert torch.allclose(clf(x), expected, atol=1e-5)


@pytest.mark.parametrize("pool", ["mean", "cls"])
def test_official_head_lr_scales(registry, pool):
    """``param_groups_lrd``: stem layer 0, block i layer i + 1, anything else (fc_norm, the
    head, the encoder's norm where kept) layer depth + 1; scale decay ** (depth + 1 - layer)."""
    depth, decay = 2, 0.75
    clf = Classifier(small_vit(registry, depth=depth), num_classes=4, pool=pool, head="official")
    scale_of = {id(p): g["lr_scale"] for g in clf.param_groups(0.05, decay) for p in g["params"]}
    for name, param in clf.named_parameters():
        rest = name.removeprefix("model.encoder.")
        if rest.startswith("blocks."):
            layer = int(rest.split(".")[1]) + 1
        elif rest.startswith(("patch_embed.", "cls_token")):
            layer = 0
        else:
            layer = depth + 1
        assert scale_of[id(param)] == pytest.approx(decay ** (depth + 1 - layer)), name
    names = {name for name, _ in clf.named_parameters()}
    assert ("model.encoder.norm.weight" in names) == (pool == "cls")


# ----------------------------------------------------------------- augmentation statistics
def _coordinate_images(n: int, side: int = 64) -> torch.Tensor:
    """uint8 images whose channel 0 is the column and channel 1 the row (0 to 255)."""
    ramp = torch.linspace(0, 255, side).round().to(torch.uint8)
    images = torch.zeros(n, 3, side, side, dtype=torch.uint8)
    images[:, 0] = ramp.view(1, 1, side)
    images[:, 1] = ramp.view(1, side, 1)
    return images


def test_crops_and_flips_follow_the_official_ranges():
    """RandomResizedCrop scale (0.08, 1), ratio (3/4, 4/3); flip with probability 0.5."""
    official = FinetuneParams(recipe="official")
    cfg = official.model_copy(
        update={"augment": official.augment.model_copy(update={"randaugment": None, "reprob": 0})}
    )
    feeder = ImageFeeder(32, 3, (0.0,) * 3, (1.0,) * 3, CPU)
    side, n = 64, 3000
    x = training_input(_coordinate_images(n, side), feeder, cfg, torch.Generator().manual_seed(0))
    col, row = x[:, 0] * (side - 1), x[:, 1] * (side - 1)  # stored pixel coordinates
    width = (col.amax(dim=(1, 2)) - col.amin(dim=(1, 2)) + 1) / side
    height = (row.amax(dim=(1, 2)) - row.amin(dim=(1, 2)) + 1) / side
    area, aspect = width * height, width / height
    assert area.min() > 0.06 and area.min() < 0.1  # the official lower bound, not 0.2
    assert area.max() > 0.95 and 0.4 < area.mean() < 0.6  # uniform in (0.08, 1), mostly fits
    assert aspect.min() > 0.7 and aspect.max() < 1.4
    flipped = (x[:, 0, :, -1] < x[:, 0, :, 0]).all(dim=1).float()
    assert abs(flipped.mean().item() - 0.5) < 0.04


def test_random_erasing_follows_timms_pixel_mode():
    """timm RandomErasing(probability 0.25, mode 'pixel', one box): area 2-33% of the image,
    aspect log-uniform in (0.3, 1 / 0.3), filled with standard normal noise per pixel."""
    n, side = 3000, 24
    x = random_erasing(torch.zeros(n, 3, side, side), 0.25, torch.Generator().manual_seed(0))
    erased = x.ne(0).any(dim=1)  # (N, H, W): the box
    hit = erased.flatten(1).any(dim=1)
    assert abs(hit.float().mean().item() - 0.25) < 0.03
    rows, cols = erased[hit].any(dim=2), erased[hit].any(dim=1)
    h, w = rows.sum(1).float(), cols.sum(1).float()
    assert torch.equal(erased[hit].flatten(1).sum(1).float(), h * w)  # one rectangle
    area = h * w / side**2
    assert area.min() >= 0.02 * 0.7 and area.max() <= 1 / 3 * 1.3
    assert (h / w).min() >= 0.3 * 0.6 and (h / w).max() <= 1 / 0.3 / 0.6
    assert (h < side).all() and (w < side).all()
    noise = x[hit].permute(0, 2, 3, 1)[erased[hit]]
    assert abs(noise.mean().item()) < 0.05 and abs(noise.std().item() - 1) < 0.05


def test_random_erasing_is_seeded_by_the_cells_generator_only():
    x = torch.zeros(64, 3, 16, 16)
    before = torch.get_rng_state()
    a = random_erasing(x, 0.5, torch.Generator().manual_seed(1))
    b = random_erasing(x, 0.5, torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.equal(a, random_erasing(x, 0.5, torch.Generator()))
    assert torch.equal(torch.get_rng_state(), before) and torch.equal(x, torch.zeros_like(x))


def test_rand_augment_is_timms_seeded_from_the_generator_and_leaves_globals_alone():
    pixels = torch.rand(40, 3, 16, 16)
    states = random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state()
    fill = (0.5, 0.5, 0.5)
    a = rand_augment(pixels, "rand-m9-mstd0.5-inc1", fill, torch.Generator().manual_seed(0))
    b = rand_augment(pixels, "rand-m9-mstd0.5-inc1", fill, torch.Generator().manual_seed(0))
    c = rand_augment(pixels, "rand-m9-mstd0.5-inc1", fill, torch.Generator().manual_seed(1))
    assert a.shape == pixels.shape and a.dtype == pixels.dtype and torch.equal(a, b)
    assert not torch.equal(a, c) and a.min() >= 0 and a.max() <= 1
    changed = (a - pixels).abs().flatten(1).amax(1) > 1 / 255 + 1e-6
    assert changed.float().mean() > 0.5  # two ops, each with probability 0.5
    assert random.getstate() == states[0] and np.array_equal(np.random.get_state()[1], states[1])
    assert torch.equal(torch.get_rng_state(), states[2])
    gray = rand_augment(pixels[:, :1], "rand-m9-mstd0.5-inc1", (0.5,), torch.Generator())
    assert gray.shape == (40, 1, 16, 16)


# ----------------------------------------------------------------- a run, its sanity facts
@pytest.fixture(scope="module")
def digits(registry):
    suite = resolve_suite(tiny_suite_data(dataset={"name": "digits", "image_size": 16}), registry)
    data = suite.build_dataset().load()
    feeder = ImageFeeder.fit(data.pretrain, image_size=16, channels=3, device=CPU)
    return suite, data, feeder


def test_a_short_run_with_the_official_recipe_learns(digits):
    suite, data, feeder = digits
    torch.manual_seed(0)
    model = suite.variants[0].build_model(16, 3)  # the MLP: fast
    # every augmentation and regulariser of the recipe: slow to learn 16-pixel digits (each
    # alone reaches 0.4-0.55 in these 12 epochs), but clearly above chance (0.1)
    cfg = FinetuneParams(recipe="official", epochs=12, batch_size=32, lr=3e-3, warmup_epochs=1)
    metrics, history, _ = finetune(model, data, feeder, cfg, seed=0)
    assert metrics["ft_acc"] > 0.2 and metrics["ft_learned"] == 1.0
    assert history[-1]["loss"] < history[0]["loss"]


def test_the_evaluator_stores_its_sanity_facts(digits):
    suite, data, feeder = digits
    model = suite.variants[0].build_model(16, 3)
    params = FinetuneParams(epochs=1, label_fraction=0.3, val_fraction=0.1)
    ctx = SimpleNamespace(model=model, data=data, feeder=feeder, seed=0, baseline=False,
                          checkpoint=None)  # fmt: skip
    result = FinetuneEvaluator(params).evaluate(ctx)
    sanity = result.sanity
    n_test = len(data.test_labels)
    assert sanity["n_test"] == n_test and sanity["num_classes"] == 10
    assert sanity["n_train"] == result.metrics["ft_train_images"]
    assert sanity["n_val"] == result.metrics["ft_val_images"] == 43
    majority = torch.bincount(data.test_labels).max().item()
    assert sanity["chance"] == pytest.approx(majority / n_test)
    assert sanity["resolution"] == pytest.approx(1 / n_test)
    assert any("4.3 per class" in sentence for sentence in sanity["warnings"])  # 43 for 10
    assert json.loads(json.dumps(sanity, allow_nan=False)) == sanity  # plain data


def test_metric_declarations_bound_accuracies_and_exclude_sizes_from_comparison():
    metrics = FinetuneEvaluator(FinetuneParams()).metrics()
    assert metrics["ft_val_acc"].bounds == (0, 1)
    assert not metrics["ft_train_images"].compare and not metrics["ft_val_images"].compare


# ----------------------------------------------------------------- curves
def test_a_curve_with_one_evaluation_point_is_drawn_with_markers():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    row = {"epoch": 1, "seed": 0, "loss": 1.0, "val_acc": 0.5, "test_acc": 0.4}
    one = pd.DataFrame([{**row, "test_f1_macro": 0.3}])
    plot = FinetuneCurves()
    fig = plot.figure({"a": one, "b": one.assign(test_acc=0.6)})
    lines = [line for ax in fig.axes for line in ax.get_lines() if len(line.get_xdata()) == 1]
    assert lines and all(line.get_marker() not in ("None", "", None) for line in lines)
    plt.close(fig)
    fig, ax = plt.subplots()
    plot.draw_variant(ax, one)
    assert len(ax.get_lines()) == 2
    assert all(line.get_marker() not in ("None", "", None) for line in ax.get_lines())
    plt.close(fig)
