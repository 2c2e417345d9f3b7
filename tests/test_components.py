"""Masking strategies and losses against hand-computed values."""

import math

import pytest
import torch

from mae_bench.contract import LossInputs
from mae_bench.layers import patchify


def make(registry, kind, name, **params):
    info = registry.get(kind, name, kind)
    return info.cls(info.cls.Params(**params))


def test_random_masking_ratio_and_exact_count(registry):
    masking = make(registry, "masking", "random", ratio=0.6)
    mask = masking(4, 25, progress=0.3, generator=torch.Generator().manual_seed(0))
    assert masking.ratio_at(0.0) == masking.ratio_at(1.0) == 0.6
    assert torch.all(mask.mask.sum(1) == 15)


@pytest.mark.parametrize(
    ("schedule", "progress", "expected"),
    [
        ("linear", 0.0, 0.5),
        ("linear", 0.5, 0.625),
        ("linear", 1.0, 0.75),
        ("cosine", 0.5, 0.625),
        ("cosine", 0.25, 0.5 + 0.25 * (1 - math.cos(math.pi / 4)) / 2),
    ],
)
def test_curriculum_schedules(registry, schedule, progress, expected):
    masking = make(registry, "masking", "curriculum", start=0.5, end=0.75, schedule=schedule)
    assert masking.ratio_at(progress) == pytest.approx(expected)


def test_curriculum_reaches_end_at_until_and_masks_accordingly(registry):
    masking = make(registry, "masking", "curriculum", start=0.25, end=0.75, until=0.5)
    assert masking.ratio_at(0.5) == pytest.approx(0.75)
    assert masking.ratio_at(0.9) == pytest.approx(0.75)
    early = masking(2, 16, progress=0.0, generator=torch.Generator().manual_seed(0))
    late = masking(2, 16, progress=1.0, generator=torch.Generator().manual_seed(0))
    assert early.mask.sum(1).tolist() == [4, 4] and late.mask.sum(1).tolist() == [12, 12]


def _inputs(pred=None, seed=0, latent=None):
    g = torch.Generator().manual_seed(seed)
    imgs = torch.randn(2, 3, 8, 8, generator=g)
    target = patchify(imgs, 4)
    pred = target.clone() if pred is None else pred
    mask = torch.tensor([[1.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0]])
    latent = torch.randn(2, 3, 8, generator=g) if latent is None else latent
    return LossInputs(imgs=imgs, pred=pred, mask=mask, latent=latent, patch_size=4)


def test_mse_only_counts_masked_patches(registry):
    base = _inputs()
    pred = base.target.clone()
    pred[0, 0] += 1.0  # masked patch: error 1 on all 48 values
    pred[0, 1] += 7.0  # visible patch: ignored
    loss = make(registry, "loss", "mse")(_inputs(pred))
    assert loss.item() == pytest.approx(1.0 / 3)  # mean over the 3 masked patches
    everywhere = make(registry, "loss", "mse", masked_only=False)(_inputs(pred))
    assert everywhere.item() == pytest.approx((1 + 49) / 8)


def test_mse_norm_pix_target(registry):
    base = _inputs()
    t = base.target
    normalized = (t - t.mean(-1, keepdim=True)) / (t.var(-1, keepdim=True) + 1e-6) ** 0.5
    loss = make(registry, "loss", "mse", norm_pix=True)
    assert loss.prediction_space == "norm_pix"
    assert loss(_inputs(normalized)).item() == pytest.approx(0.0, abs=1e-10)
    assert loss(_inputs(t * 3 + 5)).item() > 1.0  # raw pixels are not the target


def test_l1(registry):
    pred = _inputs().target.clone()
    pred[1, 3] -= 2.0
    assert make(registry, "loss", "l1")(_inputs(pred)).item() == pytest.approx(2.0 / 3)


def test_laplacian_loss(registry):
    loss = make(registry, "loss", "laplacian")
    assert loss(_inputs()).item() == pytest.approx(0.0, abs=1e-10)
    pred = _inputs().target.clone()
    pred[0, 0] += 1.0  # a constant offset on a masked patch: only its edges are high-frequency
    offset = loss(_inputs(pred)).item()
    assert offset > 0
    noisy = pred.clone()
    noisy[0, 0] += torch.randn(48, generator=torch.Generator().manual_seed(3))
    assert loss(_inputs(noisy)).item() > offset


def test_uniformity_matches_definition(registry):
    loss = make(registry, "loss", "uniformity", t=2.0)
    emb = torch.randn(6, 5, generator=torch.Generator().manual_seed(0))
    z = torch.nn.functional.normalize(emb, dim=-1)
    pairs = [(i, j) for i in range(6) for j in range(i + 1, 6)]
    expected = math.log(
        sum(math.exp(-2 * float((z[i] - z[j]).pow(2).sum())) for i, j in pairs) / len(pairs)
    )
    assert loss(_inputs(latent=emb[:, None])).item() == pytest.approx(expected, rel=1e-5)
    collapsed = loss(_inputs(latent=torch.ones(6, 1, 5))).item()
    assert collapsed == pytest.approx(0.0, abs=1e-6)  # all identical: the worst value
