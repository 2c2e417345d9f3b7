"""A plugin written against the previous documented contract keeps working: a masking
strategy called with a patch count (``__call__(batch_size, num_patches, *, progress,
generator, device)``, docs/plugins.md before the grid) trains, with one deprecation warning
naming it and what to change."""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import ClassVar

import pytest
import torch
from pydantic import Field

from mae_bench import Mask, MaskingStrategy, Params, hookimpl
from mae_bench.contract import call_masking
from mae_bench.errors import MaeBenchWarning
from mae_bench.train import draw_mask
from tests import fault_plugins
from tests.conftest import (
    cell_record,
    invoke,
    make_component,
    small_vit,
    tiny_suite_data,
    write_suite,
)

OLD_CONTRACT = "follows the previous masking contract"


# ---------------------------------------------- a plugin as the previous docs showed it
class BlockParams(Params):
    """Fraction of patches to hide, and the side of the square block hidden first."""

    ratio: float = Field(0.5, gt=0, lt=1)
    block: int = Field(2, gt=0)


class BlockMasking(MaskingStrategy):
    """Hides a random square block of patches first, then random patches up to ``ratio``."""

    name = "square"
    Params = BlockParams

    def ratio_at(self, progress):
        return self.params.ratio

    def __call__(self, batch_size, num_patches, *, progress, generator, device):
        side = math.isqrt(num_patches)
        block = min(self.params.block, side)
        score = torch.rand(batch_size, side, side, generator=generator)
        corners = torch.randint(0, side - block + 1, (batch_size, 2), generator=generator)
        for row, (top, left) in enumerate(corners.tolist()):
            score[row, top : top + block, left : left + block] += 1.0  # hidden first
        ids_shuffle = torch.argsort(score.flatten(1), dim=1)  # lowest score: kept
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        keep = max(1, round(num_patches * (1 - self.ratio_at(progress))))
        mask = torch.ones(batch_size, num_patches)
        mask[:, :keep] = 0
        mask = torch.gather(mask, 1, ids_restore)
        return Mask(ids_shuffle[:, :keep].to(device), ids_restore.to(device), mask.to(device))


@hookimpl
def register_masking(register):
    register(BlockMasking)


# ---------------------------------------------- tests
@pytest.fixture
def block_installed(tmp_path: Path, monkeypatch, fresh_registry) -> Path:
    return fault_plugins.install(tmp_path / "site", monkeypatch, __name__, "mae-bench-block")


def test_a_masking_plugin_of_the_previous_contract_trains_with_one_warning(
    block_installed, tmp_path
):
    data = tiny_suite_data(name="compat")
    data["pretrain"] = {"epochs": 1, "batch_size": 32, "lr": 1.0e-3}
    data["eval"] = {"reconstruction": {"num_images": 8}, "linear_probe": {"epochs": 1}}
    data["variants"] = [
        {**data["variants"][0], "name": "blocks", "masking": {"name": "square", "ratio": 0.5}}
    ]
    suite = write_suite(tmp_path, data)
    validated = invoke("validate", str(suite))
    assert validated.exit_code == 0, validated.output
    result = invoke("run", str(suite), "--out", str(tmp_path / "out"), "--device", "cpu")
    assert result.exit_code == 0, result.output
    (cell,) = (tmp_path / "out" / "compat" / "cells").glob("blocks-seed0-*")
    record = cell_record(cell)
    assert record["config"]["variant"]["masking"] == {"name": "square", "ratio": 0.5, "block": 2}
    assert "knn_acc" in record["metrics"]
    history = (cell / "history.csv").read_text().splitlines()
    columns = history[0].split(",")
    assert float(history[1].split(",")[columns.index("mask_ratio")]) == 0.5
    warned = [
        line for line in (validated.stderr + result.stderr).splitlines() if OLD_CONTRACT in line
    ]
    assert len(warned) == 1, warned  # once per class and process, not per batch or command
    assert warned[0].startswith(
        f"warning: masking 'square' ({__name__}.BlockMasking) {OLD_CONTRACT}"
    )
    assert (
        "change it to __call__(self, batch_size, grid, *, progress, generator, device)"
        in (warned[0])
    )


def test_the_previous_call_is_given_a_patch_count_and_warned_once(registry):
    class CountingMasking(BlockMasking):  # a class of its own: warned on its first call
        seen: ClassVar[list[int]] = []

        def __call__(self, batch_size, num_patches: int, **kwargs):
            self.seen.append(num_patches)
            return super().__call__(batch_size, num_patches, **kwargs)

    strategy = CountingMasking(BlockParams())
    model = small_vit(registry)  # a 4x4 patch grid
    with pytest.warns(MaeBenchWarning, match=OLD_CONTRACT) as warned:
        for step in range(3):
            mask = draw_mask(strategy, 2, model, step / 2, torch.Generator().manual_seed(step))
    assert len(warned) == 1 and CountingMasking.seen == [16, 16, 16]
    assert mask.mask.sum(1).tolist() == [8, 8]


def test_a_subclass_handing_its_count_to_the_default_still_draws(registry):
    class Delegating(MaskingStrategy):  # the previous docs' default call, with a count
        name = "delegating"

        def ratio_at(self, progress):
            return 0.75

        def __call__(self, batch_size, num_patches, *, progress, generator, device):
            return super().__call__(
                batch_size, num_patches, progress=progress, generator=generator, device=device
            )

    with pytest.warns(MaeBenchWarning, match=OLD_CONTRACT):
        mask = draw_mask(Delegating(Params()), 3, small_vit(registry), 1.0, None)
    assert mask.mask.shape == (3, 16) and mask.mask.sum(1).tolist() == [12, 12, 12]


def test_a_strategy_of_the_current_contract_is_called_with_the_grid_and_no_warning(registry):
    masking = make_component(registry, "masking", "random", ratio=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mask = call_masking(masking, 2, (3, 5), progress=1.0, generator=None, device="cpu")
    assert mask.mask.shape == (2, 15)
