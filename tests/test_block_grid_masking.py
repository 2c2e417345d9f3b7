"""The MAE paper's other mask samplings (plugins/masking.py): BEiT-style ``block`` masking
hides exactly the official count in contiguous rectangles, ``grid`` keeps one patch per cell;
both are valid masks, reproducible per generator, and run from a suite through the CLI."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from mae_bench.errors import ConfigError
from mae_bench.suite import resolve_suite
from tests.conftest import cell_record, invoke, make_component, tiny_suite_data, write_suite

SIDES = [4, 7, 8, 14]  # L = 16, 49, 64, 196
RATIOS = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.75, 0.8, 0.9]


def official_masked_count(num_patches: int, ratio: float) -> int:
    """What random masking hides: ``L - int(L * (1 - ratio))``, one patch always visible."""
    return num_patches - max(1, int(num_patches * (1 - ratio)))


def masked_neighbours(mask: torch.Tensor, side: int) -> float:
    """Mean number of masked 4-neighbours of a masked patch (how clustered the mask is)."""
    grid = mask.reshape(-1, side, side)
    padded = torch.nn.functional.pad(grid, (1, 1, 1, 1))
    neighbours = (
        padded[:, :-2, 1:-1] + padded[:, 2:, 1:-1] + padded[:, 1:-1, :-2] + padded[:, 1:-1, 2:]
    )
    return float((neighbours * grid).sum() / grid.sum())


# --------------------------------------------------------------------------- block
@pytest.mark.parametrize("side", SIDES)
def test_block_masks_exactly_the_official_count_with_valid_masks(registry, side):
    generator = torch.Generator().manual_seed(side)
    num_patches = side * side
    for ratio in RATIOS:
        masking = make_component(registry, "masking", "block", ratio=ratio)
        mask = masking(8, (side, side), progress=0.5, generator=generator)
        mask.validate(8, num_patches)
        expected = official_masked_count(num_patches, ratio)
        assert mask.mask.sum(1).tolist() == [expected] * 8, (side, ratio)
        assert mask.ids_keep.shape == (8, num_patches - expected)
        patches = torch.arange(num_patches).expand(8, -1)
        assert torch.equal(mask.ids_restore.sort(1).values, patches)
        assert masking.ratio_at(0.0) == masking.ratio_at(1.0) == ratio


def test_block_masks_a_non_square_grid_exactly(registry):
    masking = make_component(registry, "masking", "block", ratio=0.6)
    mask = masking(4, (6, 10), generator=torch.Generator().manual_seed(0))
    mask.validate(4, 60)
    assert mask.mask.sum(1).tolist() == [official_masked_count(60, 0.6)] * 4


@pytest.mark.parametrize("ratio", [0.4, 0.75])
def test_block_masks_are_clustered_where_random_masks_are_not(registry, ratio):
    generator = torch.Generator().manual_seed(0)
    block = make_component(registry, "masking", "block", ratio=ratio)(
        64, (14, 14), generator=generator
    )
    uniform = make_component(registry, "masking", "random", ratio=ratio)(
        64, (14, 14), generator=generator
    )
    clustered, scattered = masked_neighbours(block.mask, 14), masked_neighbours(uniform.mask, 14)
    assert clustered > scattered + 0.5, (clustered, scattered)


def test_block_masks_are_reproducible_per_generator_and_differ_between_images(registry):
    masking = make_component(registry, "masking", "block", ratio=0.5)
    first = masking(16, (8, 8), generator=torch.Generator().manual_seed(3))
    again = masking(16, (8, 8), generator=torch.Generator().manual_seed(3))
    other = masking(16, (8, 8), generator=torch.Generator().manual_seed(4))
    assert torch.equal(first.mask, again.mask) and torch.equal(first.ids_keep, again.ids_keep)
    assert not torch.equal(first.mask, other.mask)
    assert len({tuple(row) for row in first.mask.tolist()}) > 1


def test_block_masking_a_batch_is_fast(registry):
    masking = make_component(registry, "masking", "block", ratio=0.75)
    generator = torch.Generator().manual_seed(0)
    masking(64, (14, 14), generator=generator)  # warm-up
    start = time.perf_counter()
    for _ in range(5):
        masking(64, (14, 14), generator=generator)
    assert (time.perf_counter() - start) / 5 < 0.05


@pytest.mark.parametrize(
    ("params", "field"),
    [({"ratio": 1.0}, "ratio"), ({"min_patches": 0}, "min_patches"), ({"aspect": 2}, "aspect")],
)
def test_block_params_are_validated(registry, params, field):
    with pytest.raises(ValueError, match=field):
        make_component(registry, "masking", "block", **params)


def test_block_masks_land_on_the_device_asked_for(registry):
    masking = make_component(registry, "masking", "block", ratio=0.5)
    mask = masking(2, (4, 4), generator=torch.Generator().manual_seed(0), device="meta")
    assert mask.mask.is_meta and mask.ids_keep.shape == (2, 8)


# --------------------------------------------------------------------------- grid
def test_grid_at_075_keeps_the_top_left_patch_of_every_2x2_cell(registry):
    masking = make_component(registry, "masking", "grid")
    mask = masking(3, (4, 4), generator=torch.Generator().manual_seed(0))
    mask.validate(3, 16)
    assert masking.ratio_at(0.0) == masking.ratio_at(1.0) == 0.75
    kept = [0, 2, 8, 10]  # (row 0, col 0), (0, 2), (2, 0), (2, 2)
    assert mask.ids_keep.tolist() == [kept] * 3
    expected = torch.ones(16)
    expected[kept] = 0
    assert torch.equal(mask.mask, expected.expand(3, -1))
    assert masking.summary() == "grid(0.75)"


@pytest.mark.parametrize(("cell", "side"), [(2, 8), (2, 14), (3, 6), (4, 8), (7, 14)])
def test_grid_masks_exactly_its_reported_ratio(registry, cell, side):
    masking = make_component(registry, "masking", "grid", cell=cell)
    masking.check_grid((side, side))
    mask = masking(2, (side, side), generator=torch.Generator().manual_seed(0))
    mask.validate(2, side * side)
    assert masking.ratio_at(0.5) == pytest.approx(1 - 1 / cell**2)
    assert float(mask.mask.mean()) == pytest.approx(masking.ratio_at(0.5))
    one_per_cell = mask.mask.reshape(2, side // cell, cell, side // cell, cell)
    assert torch.all(one_per_cell.sum(dim=(2, 4)) == cell * cell - 1)


def test_grid_with_a_random_offset_keeps_one_shifted_patch_per_cell(registry):
    masking = make_component(registry, "masking", "grid", offset="random")
    first = masking(32, (4, 4), generator=torch.Generator().manual_seed(1))
    again = masking(32, (4, 4), generator=torch.Generator().manual_seed(1))
    first.validate(32, 16)
    assert torch.equal(first.mask, again.mask)
    cells = first.mask.reshape(32, 2, 2, 2, 2)
    assert torch.all(cells.sum(dim=(2, 4)) == 3)
    # the same position is kept in every cell of an image, and images differ
    assert torch.all(cells == cells[:, :1, :, :1, :])
    assert len({tuple(row) for row in first.mask.tolist()}) > 1


@pytest.mark.parametrize("grid", [(5, 5), (4, 6 + 1), (7, 7)])
def test_grid_refuses_a_grid_its_cell_does_not_divide(registry, grid):
    masking = make_component(registry, "masking", "grid")
    with pytest.raises(ValueError, match=r"masking 'grid': its 2x2 cell does not divide"):
        masking.check_grid(grid)
    with pytest.raises(ValueError, match=r"masking 'grid': its 2x2 cell does not divide"):
        masking(2, grid, generator=torch.Generator().manual_seed(0))


def test_grid_cell_that_does_not_divide_the_model_grid_is_refused_at_validation(registry):
    data = tiny_suite_data()
    data["variants"][1]["masking"] = {"name": "grid", "cell": 3}  # a 4x4 patch grid
    with pytest.raises(ConfigError, match=r"variants\[1\]\.masking: .*3x3 cell does not divide"):
        resolve_suite(data, registry)


def test_grid_cell_must_be_at_least_two(registry):
    with pytest.raises(ValueError, match="cell"):
        make_component(registry, "masking", "grid", cell=1)


# --------------------------------------------------------------------------- suites
def test_a_suite_with_block_and_grid_masking_validates_and_runs(tmp_path: Path):
    data = tiny_suite_data(name="samplings")
    data["pretrain"] = {"epochs": 1, "batch_size": 32, "lr": 1.0e-3}
    data["eval"] = {"reconstruction": {"num_images": 8}, "linear_probe": {"epochs": 1}}
    vit = next(v for v in data["variants"] if v["name"] == "vit")
    data["variants"] = [
        {**vit, "name": "block", "masking": {"name": "block", "ratio": 0.5}},
        {**vit, "name": "grid", "masking": {"name": "grid"}},
    ]
    suite = write_suite(tmp_path, data)
    validated = invoke("validate", str(suite))
    assert validated.exit_code == 0, validated.output
    result = invoke("run", str(suite), "--out", str(tmp_path / "out"), "--device", "cpu")
    assert result.exit_code == 0, result.output
    cells = tmp_path / "out" / "samplings" / "cells"
    (block,) = cells.glob("block-seed0-*")
    (grid,) = cells.glob("grid-seed0-*")
    assert cell_record(block)["config"]["variant"]["masking"]["name"] == "block"
    for cell, ratio in ((block, 0.5), (grid, 0.75)):
        history = (cell / "history.csv").read_text().splitlines()
        column = history[0].split(",").index("mask_ratio")
        assert float(history[1].split(",")[column]) == ratio
        assert "knn_acc" in cell_record(cell)["metrics"]


def test_a_grid_the_cell_does_not_divide_is_one_clear_cli_error(tmp_path: Path):
    data = tiny_suite_data(name="badgrid")
    data["variants"][1]["masking"] = {"name": "grid", "cell": 3}
    result = invoke("validate", str(write_suite(tmp_path, data)))
    assert result.exit_code != 0
    assert "variants[1].masking" in result.output and "3x3 cell does not divide" in result.output
    assert "Traceback" not in result.output
