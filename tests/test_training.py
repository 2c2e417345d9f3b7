"""The pretraining loop and the evaluation protocols learn something real."""

import pytest
import torch
from mae_bench_plugins.probes import LinearProbeParams, linear_probe

from mae_bench.data import ImageFeeder
from mae_bench.evaluate import extract_features, fixed_masks
from mae_bench.suite import resolve_suite
from mae_bench.train import lr_at, pretrain
from tests.conftest import tiny_suite_data


def test_lr_schedule_warmup_then_cosine():
    from mae_bench.suite import PretrainConfig

    cfg = PretrainConfig(epochs=1, lr=1.0, min_lr=0.1)
    assert lr_at(0, 100, 10, cfg) == pytest.approx(0.1)
    assert lr_at(9, 100, 10, cfg) == pytest.approx(1.0)
    assert lr_at(10, 100, 10, cfg) == pytest.approx(1.0)
    assert lr_at(55, 100, 10, cfg) == pytest.approx(0.55)
    assert lr_at(100, 100, 10, cfg) == pytest.approx(0.1)


def _pretrain(suite, variant: int, device: torch.device):
    """Pretrain one variant of a 16x16 suite; returns (data, model, result)."""
    ds = suite.build_dataset().load()
    feeder = ImageFeeder.fit(ds.pretrain, image_size=16, channels=3, device=device)
    v = suite.variants[variant]
    torch.manual_seed(0)
    model = v.build_model(16, 3).to(device)
    masking, losses = v.build_masking(), v.build_losses()
    result = pretrain(model, ds.pretrain, feeder, masking, losses, suite.config.pretrain, seed=0)
    return ds, model, result


@pytest.mark.parametrize("variant", [0, 1])
def test_pretraining_reduces_the_loss(registry, variant):
    data = tiny_suite_data(dataset={"name": "digits", "image_size": 16})
    data["pretrain"].update(epochs=3, batch_size=64, lr=2e-3)
    ds, _, result = _pretrain(resolve_suite(data, registry), variant, torch.device("cpu"))
    losses = [row["mse"] for row in result.history]
    assert losses[-1] < 0.9 * losses[0] and losses[-1] < losses[1]
    assert result.images_seen == 3 * (len(ds.pretrain) // 64) * 64
    assert result.images_per_second > 0
    ratios = [row["mask_ratio"] for row in result.history]
    if variant == 1:  # curriculum 0.5 -> 0.75
        assert ratios[0] < ratios[1] < ratios[2] and 0.5 <= ratios[0] < 0.6 and ratios[2] > 0.65
    else:
        assert set(ratios) == {0.75}


def test_linear_probe_separates_separable_features():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(3, 16, generator=g) * 3
    y = torch.randint(3, (300,), generator=g)
    x = centers[y] + torch.randn(300, 16, generator=g)
    out, probs = linear_probe(
        x[:200], y[:200], x[200:], y[200:], LinearProbeParams(epochs=30), num_classes=3, seed=0
    )
    assert out["lp_acc"] > 0.95
    assert probs.shape == (100, 3) and torch.allclose(probs.sum(1), torch.ones(100))
    assert out["lp_acc"] == (probs.argmax(1) == y[200:]).float().mean().item()
    noise, _ = linear_probe(
        torch.randn(200, 16),
        y[:200],
        torch.randn(100, 16),
        y[200:],
        LinearProbeParams(epochs=30),
        num_classes=3,
        seed=0,
    )
    assert noise["lp_acc"] < 0.6


def test_fixed_masks_identical_across_calls():
    a, b = fixed_masks(10, 16, 0.75, seed=3), fixed_masks(10, 16, 0.75, seed=3)
    assert torch.equal(a.mask, b.mask) and torch.all(a.mask.sum(1) == 12)


def test_features_are_cached_per_call_not_trained(registry):
    suite = resolve_suite(tiny_suite_data(), registry)
    ds = suite.build_dataset().load()
    feeder = ImageFeeder.fit(ds.pretrain, image_size=16, channels=3, device=torch.device("cpu"))
    model = suite.variants[1].build_model(16, 3)
    feats = extract_features(model, ds.test_images, feeder, "cls")
    assert feats.shape == (len(ds.test_images), 32) and not feats.requires_grad


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_pretraining_on_cuda_with_bf16_and_fused_adamw(registry):
    _, model, result = _pretrain(
        resolve_suite(tiny_suite_data(), registry), 1, torch.device("cuda")
    )
    assert next(model.parameters()).is_cuda
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in result.history)
