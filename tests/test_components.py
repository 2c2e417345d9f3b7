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
    mask = masking(4, (5, 5), progress=0.3, generator=torch.Generator().manual_seed(0))
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
    early = masking(2, (4, 4), progress=0.0, generator=torch.Generator().manual_seed(0))
    late = masking(2, (4, 4), progress=1.0, generator=torch.Generator().manual_seed(0))
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


class _Strategy:
    """Masking strategies with bugs a plugin author makes (built on the random one)."""

    @staticmethod
    def make(registry, bug: str):
        from mae_bench.contract import Mask

        base = registry.components["masking"]["random"].cls

        class Buggy(base):
            name = "buggy"

            def __call__(self, batch_size, grid, **kwargs):
                mask = super().__call__(batch_size, grid, **kwargs)
                if bug == "shape":
                    return Mask(mask.ids_keep, mask.ids_restore, mask.mask[:, :-1])
                if bug == "inconsistent":  # ids_keep no longer matches the mask
                    return Mask(mask.ids_keep.flip(1), mask.ids_restore, mask.mask)
                if bug == "type":
                    return mask.mask
                return mask

            def check_grid(self, grid):
                if grid[0] < 8:
                    raise ValueError(f"needs a grid of at least 8x8 patches, got {grid}")

        return Buggy(base.Params(ratio=0.75))


@pytest.mark.parametrize(
    ("bug", "message"),
    [
        ("shape", "do not fit 2 images of 16 patches"),
        ("inconsistent", "does not put the ids_keep patches first"),
        ("type", "returned a Tensor, not a mae_bench.Mask"),
    ],
)
def test_a_bad_mask_is_one_clear_error_naming_the_strategy(registry, bug, message):
    from mae_bench.train import draw_mask

    info = registry.get("encoder", "vit", "encoder")
    model = info.cls(info.cls.Params(patch_size=4, dim=32, depth=1, heads=2), image_size=16,
                     in_chans=3)  # fmt: skip
    strategy = _Strategy.make(registry, bug)
    expected = f"masking 'buggy' .*Buggy\\) .*4x4 patch grid: .*{message}"
    with pytest.raises(ValueError, match=expected):
        draw_mask(strategy, 2, model, 1.0, torch.Generator().manual_seed(0))


def test_masking_geometry_is_checked_at_validation(registry):
    from mae_bench.errors import ConfigError
    from mae_bench.suite import resolve_suite
    from tests.conftest import tiny_suite_data

    strategy = _Strategy.make(registry, "none")
    info = registry.components["masking"]["random"]
    registry.components["masking"]["buggy"] = type(info)("masking", "buggy", type(strategy),
                                                          info.plugin)  # fmt: skip
    try:
        data = tiny_suite_data()
        data["variants"][1]["masking"] = {"name": "buggy"}
        with pytest.raises(ConfigError, match=r"variants\[1\]\.masking: needs a grid of at least"):
            resolve_suite(data, registry)
    finally:
        del registry.components["masking"]["buggy"]


def test_reconstruction_can_use_each_variants_own_masks(tmp_path):
    from tests.conftest import cell_record, invoke

    common = ["--set", "variants.vit.masking={name: random, ratio: 0.5}", "--set", "seeds=[0]"]
    scores = {}
    for masks in ("random", "variant"):
        out = tmp_path / masks
        result = invoke("run", "suites/tiny.yaml", "--out", str(out), *common,
                        "--set", f"eval.reconstruction.masks={masks}")  # fmt: skip
        assert result.exit_code == 0, result.output
        (cell,) = (out / "tiny" / "cells").glob("vit-*")
        scores[masks] = cell_record(cell)["metrics"]["psnr_masked"]
    assert scores["random"] != scores["variant"]  # 75% random masks vs the variant's own 50%
