"""Masking strategies (plugins/masking.py): exact ratios, curriculum schedules, and a
strategy's bugs caught with one clear error naming it."""

import math

import pytest
import torch

from mae_bench.errors import ConfigError
from mae_bench.suite import resolve_suite
from mae_bench.train import draw_mask
from tests.conftest import make_component, small_vit, tiny_suite_data


def test_random_masking_ratio_and_exact_count(registry):
    masking = make_component(registry, "masking", "random", ratio=0.6)
    mask = masking(4, (5, 5), progress=0.3, generator=torch.Generator().manual_seed(0))
    assert masking.ratio_at(0.0) == masking.ratio_at(1.0) == 0.6
    assert torch.all(mask.mask.sum(1) == 15)


def official_masked_count(num_patches: int, ratio: float) -> int:
    """Patches the official MAE masks: ``random_masking`` keeps
    ``int(L * (1 - mask_ratio))`` (written out here from the paper's code, not imported)."""
    return num_patches - int(num_patches * (1 - ratio))


@pytest.mark.parametrize("side", [4, 7, 8, 14])  # L = 16, 49, 64, 196
def test_random_masks_hide_as_many_patches_as_the_official_code(registry, side):
    """At every ratio from 0.05 to 0.95 (a curriculum passes through many): at L=16 and 0.7
    the official code masks 12 patches, ``round`` masked 11."""
    generator = torch.Generator().manual_seed(0)
    for k in range(1, 20):
        ratio = round(0.05 * k, 2)
        masking = make_component(registry, "masking", "random", ratio=ratio)
        mask = masking(3, (side, side), generator=generator)
        expected = min(side * side - 1, official_masked_count(side * side, ratio))
        assert mask.mask.sum(1).tolist() == [expected] * 3, (side, ratio)
        assert mask.ids_keep.shape == (3, side * side - expected)
    assert official_masked_count(16, 0.7) == 12


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
    masking = make_component(
        registry, "masking", "curriculum", start=0.5, end=0.75, schedule=schedule
    )
    assert masking.ratio_at(progress) == pytest.approx(expected)


def test_curriculum_reaches_end_at_until_and_masks_accordingly(registry):
    masking = make_component(registry, "masking", "curriculum", start=0.25, end=0.75, until=0.5)
    assert masking.ratio_at(0.5) == pytest.approx(0.75)
    assert masking.ratio_at(0.9) == pytest.approx(0.75)
    early = masking(2, (4, 4), progress=0.0, generator=torch.Generator().manual_seed(0))
    late = masking(2, (4, 4), progress=1.0, generator=torch.Generator().manual_seed(0))
    assert early.mask.sum(1).tolist() == [4, 4] and late.mask.sum(1).tolist() == [12, 12]


class _Strategy:
    """Masking strategies with bugs a plugin author makes (built on the random one)."""

    @staticmethod
    def make_component(registry, bug: str):
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
    info = registry.get("encoder", "vit", "encoder")
    model = info.cls(info.cls.Params(patch_size=4, dim=32, depth=1, heads=2), image_size=16,
                     in_chans=3)  # fmt: skip
    strategy = _Strategy.make_component(registry, bug)
    expected = f"masking 'buggy' .*Buggy\\) .*4x4 patch grid: .*{message}"
    with pytest.raises(ValueError, match=expected):
        draw_mask(strategy, 2, model, 1.0, torch.Generator().manual_seed(0))


def test_masking_geometry_is_checked_at_validation(registry):
    strategy = _Strategy.make_component(registry, "none")
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


@pytest.mark.parametrize("ratio", [math.nan, 1.5, -0.25, "half"])
def test_a_ratio_that_is_no_ratio_is_one_clear_error_naming_the_strategy(registry, ratio):
    base = registry.components["masking"]["random"].cls

    class Unbounded(base):
        name = "unbounded"

        def ratio_at(self, progress):
            return ratio

    strategy = Unbounded(base.Params())
    expected = r"masking 'unbounded': ratio_at\(0.5\) returned .*, not a mask ratio in \[0, 1\]"
    with pytest.raises(ValueError, match=expected):
        draw_mask(strategy, 2, small_vit(registry), 0.5, torch.Generator().manual_seed(0))
