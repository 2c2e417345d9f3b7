"""What a variant costs (mae_bench/cell.py): one pretraining step's FLOPs per image, counted
on the meta device, against a hand count of a tiny ViT MAE; how they follow the number of
visible patches; and each cell's ``pretrain_tflops`` (FLOPs per image x images seen)."""

import math
import warnings

import pandas as pd
import pytest
import torch

import mae_bench.cell
from mae_bench.cell import pretrain_cell, pretrain_flops_per_image
from mae_bench.data import ImageFeeder
from mae_bench.errors import MaeBenchWarning
from mae_bench.plan import suite_cells
from mae_bench.suite import resolve_suite
from tests.conftest import tiny_suite_data

IMAGE_SIZE, CHANNELS = 16, 3
VIT = {
    "name": "vit", "patch_size": 4, "dim": 32, "depth": 2, "heads": 2,
    "decoder_dim": 16, "decoder_depth": 1, "decoder_heads": 2,
}  # fmt: skip


def _variant(registry, masking, encoder=VIT, loss=("mse",)):
    data = tiny_suite_data()
    data["variants"] = [
        {"name": "v", "encoder": encoder, "masking": masking, "loss": [{"name": n} for n in loss]}
    ]
    return resolve_suite(data, registry).variants[0]


def hand_count(ratio: float) -> float:
    """FLOPs per image of one MAE step of ``VIT``, written out: every matmul of the forward
    pass (2 FLOPs a multiply-add) and twice that backward (gradients of the input and of the
    weight), except the patch embedding, whose input (the image) needs no gradient."""
    p, c, d, depth, dd = 4, CHANNELS, 32, 2, 16
    patches = (IMAGE_SIZE // p) ** 2  # L
    visible = int(patches * (1 - ratio))  # K, as the official MAE counts it
    enc_tokens, dec_tokens = 1 + visible, 1 + patches  # with the cls token

    def block(tokens: int, dim: int) -> int:  # qkv + proj + mlp (ratio 4), attention
        return 2 * tokens * dim * (3 * dim + dim + 8 * dim) + 2 * 2 * tokens * tokens * dim

    patch_embed = 2 * patches * p * p * c * d  # on every patch, before masking
    forward = (
        depth * block(enc_tokens, d)
        + 2 * enc_tokens * d * dd  # decoder embedding
        + block(dec_tokens, dd)
        + 2 * dec_tokens * dd * p * p * c  # prediction head
    )
    return 3 * forward + 2 * patch_embed


@pytest.mark.parametrize("ratio", [0.5, 0.75])
def test_a_tiny_vits_step_matches_a_hand_count(registry, ratio):
    variant = _variant(registry, {"name": "random", "ratio": ratio})
    counted = pretrain_flops_per_image(variant, IMAGE_SIZE, CHANNELS)
    assert counted == pytest.approx(hand_count(ratio), rel=0.02)


def test_flops_follow_the_visible_patches(registry):
    """More visible patches cost more; a curriculum from 0.5 to 0.75 costs, on average over
    its schedule, between the two fixed ratios (not its start's nor its end's)."""
    flops = {
        ratio: pretrain_flops_per_image(
            _variant(registry, {"name": "random", "ratio": ratio}), IMAGE_SIZE, CHANNELS
        )
        for ratio in (0.5, 0.75)
    }
    assert flops[0.5] > 1.3 * flops[0.75]
    curriculum = _variant(registry, {"name": "curriculum", "start": 0.5, "end": 0.75})
    mean = pretrain_flops_per_image(curriculum, IMAGE_SIZE, CHANNELS)
    assert flops[0.75] * 1.05 < mean < flops[0.5] * 0.95


def test_counting_leaves_the_random_streams_alone(registry):
    """Counting builds its own model on the meta device: the seeded stream the cell's model,
    training and evaluations draw from is where it was."""
    variant = _variant(registry, {"name": "random", "ratio": 0.75})
    torch.manual_seed(0)
    pretrain_flops_per_image(variant, IMAGE_SIZE, CHANNELS)
    drawn = torch.rand(3)
    torch.manual_seed(0)
    assert torch.equal(drawn, torch.rand(3))


def test_a_variant_that_cannot_be_counted_is_named_and_left_empty(registry, monkeypatch):
    variant = _variant(registry, {"name": "random", "ratio": 0.75})

    def no_meta(*args, **kwargs):
        raise NotImplementedError("this plugin reads its tensors back")

    monkeypatch.setattr(mae_bench.cell, "forward_loss", no_meta)
    with pytest.warns(MaeBenchWarning, match=r"variant 'v'.*NotImplementedError.*reads"):
        assert math.isnan(pretrain_flops_per_image(variant, IMAGE_SIZE, CHANNELS))


def test_a_cell_records_its_pretraining_compute(registry):
    """``pretrain_tflops`` = ``flops_per_image`` (GFLOPs) x the images pretraining saw
    (128 images, batches of 32, 2 epochs: 256); a baseline cell pretrains nothing."""
    data_cfg = tiny_suite_data()
    data_cfg["variants"] = [v for v in data_cfg["variants"] if v["name"] == "vit"]
    data_cfg["eval"]["baselines"] = True
    suite = resolve_suite(data_cfg, registry)
    data = suite.build_dataset().load()
    feeder = ImageFeeder.fit(data.pretrain, image_size=16, channels=3, device=torch.device("cpu"))
    trained, baseline = suite_cells(suite)
    with warnings.catch_warnings():
        warnings.simplefilter("error", MaeBenchWarning)
        metrics = pretrain_cell(trained, suite, data, feeder).record["metrics"]
    expected = pretrain_flops_per_image(trained.variant, 16, 3)
    assert metrics["flops_per_image"] == pytest.approx(expected / 1e9)
    assert metrics["pretrain_tflops"] == pytest.approx(expected * 256 / 1e12)
    assert metrics["pretrain_tflops"] > 0
    record = pretrain_cell(baseline, suite, data, feeder).record
    assert not {"flops_per_image", "pretrain_tflops"} & set(record["metrics"])


def test_the_markdown_leaderboard_shows_the_compute(tiny_run):
    """A headline column, a cost (never marked best), empty for no-pretraining rows."""
    board = (tiny_run.root / "leaderboard.md").read_text()
    header = next(line for line in board.splitlines() if line.startswith("| rank"))
    assert "pretrain_tflops" in header and "flops_per_image" not in header
    table = pd.read_csv(tiny_run.root / "leaderboard.csv").set_index("variant")
    assert (table.loc[["mlp", "vit"], "pretrain_tflops"] > 0).all()
