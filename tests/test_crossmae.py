"""The ``crossmae`` encoder (plugins/crossmae.py): a decoder of cross-attention only, whose cost
grows linearly with the patches it predicts, queries that never see each other, partial
reconstruction (``predict_ratio``) read by the core's loss, and a whole run from the CLI."""

import math

import pandas as pd
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from mae_bench.contract import Mask
from mae_bench.layers import patchify, random_mask
from mae_bench.train import forward_loss
from tests.conftest import invoke, make_component, tiny_suite_data, write_suite

SIZES = {"patch_size": 4, "dim": 32, "depth": 1, "heads": 2, "decoder_dim": 32,
         "decoder_depth": 1, "decoder_heads": 2}  # fmt: skip


def build(registry, name="crossmae", image_size=16, **params):
    info = registry.get("encoder", name, "encoder")
    return info.cls(info.cls.Params(**{**SIZES, **params}), image_size=image_size, in_chans=3)


def make_mask(n, num_patches, ratio=0.75, seed=0, device="cpu"):
    drawn = random_mask(n, num_patches, ratio, generator=torch.Generator().manual_seed(seed))
    return Mask(*(t.to(device) for t in drawn))


def decoder_flops(registry, name, ratio=0.75, part="decoder", **params):
    """FLOPs of the decoder (or its ``part``) in a training forward pass of 2 32x32 images
    (on the meta device, as ``pretrain_tflops`` counts them: attention included)."""
    with torch.device("meta"):
        model = build(registry, name, image_size=32, **params)
    images = torch.empty(2, 3, 32, 32, device="meta")
    with FlopCounterMode(display=False) as counter:
        model(images, make_mask(2, 64, ratio, device="meta"))
    return sum(counter.get_flop_counts()[f"{type(model).__name__}.{part}"].values())


def test_the_decoders_cost_grows_linearly_with_the_predicted_patches(registry):
    """64 patches, 16 visible, 48 masked: Q = 12, 24, 48 queries at predict_ratio 0.25, 0.5,
    1. Each query costs its q, proj, MLP and head matmuls and attention over the 1 + 16
    encoder tokens; the keys and values (one projection of the 17 tokens) are the only
    fixed cost. An MAE decoder's blocks run every patch, however many are masked."""
    flops = {r: decoder_flops(registry, "crossmae", predict_ratio=r) for r in (0.25, 0.5, 1.0)}
    d, tokens, pixels = 32, 17, 48
    per_query = 2 * 2 * (d * d + d * d + 8 * d * d + d * pixels + 2 * tokens * d)  # 2 images
    kv = 2 * 2 * tokens * d * 2 * d
    assert flops == {r: kv + q * per_query for r, q in ((0.25, 12), (0.5, 24), (1.0, 48))}
    # (757k, 1.37M, 2.61M): 0.25 -> 1 is x4 the queries, x3.45 the cost (the fixed kv part)
    assert flops[1.0] - flops[0.5] == 2 * (flops[0.5] - flops[0.25])
    vit = {r: decoder_flops(registry, "vit", r, "decoder.blocks") for r in (0.5, 0.75)}
    assert vit[0.5] == vit[0.75]  # 1 + 64 tokens whatever the mask (only its embedding varies)
    assert decoder_flops(registry, "vit") > 1.5 * flops[1.0]  # 4.74M, self-attention


def test_queries_do_not_see_each_other(registry):
    """A patch's prediction is the same alone, among all patches, or among others in another
    order: no self-attention among the queries."""
    torch.manual_seed(0)
    model = build(registry).eval()
    x = torch.randn(2, 3, 16, 16)
    mask = make_mask(2, 16)
    with torch.no_grad():
        latent = model.forward_encoder(x, mask.ids_keep)
        every = model(x, mask).pred  # (2, 16, 48): eval predicts every patch
        for patch in (0, 5, 15):
            alone = model.decoder(latent, torch.full((2, 1), patch))
            others = torch.tensor([[patch, 3, 9, 1], [7, 2, patch, 11]])
            mixed = model.decoder(latent, others)
            assert torch.allclose(alone[:, 0], every[:, patch], atol=1e-6)
            assert torch.allclose(mixed[0, 0], every[0, patch], atol=1e-6)
            assert torch.allclose(mixed[1, 2], every[1, patch], atol=1e-6)
        other_latent = model.forward_encoder(x + 1.0, mask.ids_keep)  # the encoder matters
        assert not torch.allclose(model.decoder(other_latent, others), mixed, atol=1e-3)
        assert not torch.allclose(every[:, 0], every[:, 5], atol=1e-3)  # positions matter


@pytest.mark.parametrize(
    ("mask_ratio", "predict_ratio", "count"),
    [(0.75, 0.25, 3), (0.75, 0.3, 4), (0.625, 0.7, 7), (0.75, 1.0, 12)],
)
def test_the_loss_reads_the_predicted_patches_only(registry, mask_ratio, predict_ratio, count):
    """ceil(predict_ratio * M) predictions per image (M = 12, or 10 at mask ratio 0.625, where
    0.7 * 10 is 7.000000000000001 in floats), a subset of the masked patches chosen from the
    mask itself (the same for the same mask), zeros elsewhere; the core's mse is
    their mean squared error, computed by hand."""
    torch.manual_seed(0)
    model = build(registry, predict_ratio=predict_ratio)
    x = torch.randn(3, 3, 16, 16)
    mask = make_mask(3, 16, mask_ratio, seed=1)
    out = model(x, mask)
    expected = out.predicted
    torch.manual_seed(5)  # the global stream plays no part
    assert torch.equal(model(x, mask).predicted, expected)
    assert torch.all(out.predicted.sum(dim=1) == count) and torch.all(mask.mask[expected == 1] == 1)
    assert torch.all(out.pred[expected == 0] == 0) and torch.all(out.pred[expected == 1] != 0)
    loss, _ = forward_loss(model, x, mask, [(make_component(registry, "loss", "mse"), 1.0)])
    per_patch = ((out.pred - patchify(x, 4)) ** 2).mean(dim=-1)  # (3, 16)
    by_hand = (per_patch * expected).sum() / expected.sum()
    assert loss.item() == pytest.approx(by_hand.item(), rel=1e-5)
    if predict_ratio < 1:  # not the mean over every masked patch
        assert by_hand.item() != pytest.approx(
            ((per_patch * mask.mask).sum() / mask.mask.sum()).item(), rel=1e-3
        )
    assert model.eval()(x, mask).predicted is None


def test_a_run_of_crossmae_costs_less_than_the_same_vit(tmp_path):
    """Partial reconstruction (half the masked patches) with a cross-attention decoder costs
    less pretraining compute than the same-size MAE, and the run reports its metrics."""
    data = tiny_suite_data()
    data["variants"] = [
        {"name": "vit", "encoder": {"name": "vit", **SIZES}},
        {"name": "cross", "encoder": {"name": "crossmae", **SIZES, "predict_ratio": 0.5}},
    ]
    data["eval"] = {"reconstruction": {"num_images": 32}, "linear_probe": {"epochs": 2}}
    suite = write_suite(tmp_path, data)
    result = invoke("run", str(suite), "--out", str(tmp_path / "out"), "--device", "cpu")
    assert result.exit_code == 0, result.output
    board = pd.read_csv(tmp_path / "out" / "tiny" / "leaderboard.csv").set_index("variant")
    for column in ("psnr_masked", "psnr_full", "lp_acc", "pretrain_tflops"):
        assert math.isfinite(board.loc["cross", column]), column
    # 16 patches, 4 visible: 6 queries against the MAE's 1 + 16 decoder tokens; measured
    # 0.97 vs 2.02 MFLOPs per image (one step, forward and backward)
    assert board.loc["cross", "pretrain_tflops"] < 0.6 * board.loc["vit", "pretrain_tflops"]


def test_official_crossmae_keys_load(registry):
    """A checkpoint in the official layout (``decoder_blocks.N.cross_attn.kv``, ``decoder_norm``,
    ``decoder_pred``, ``mask_token``, a ``decoder_pos_embed`` with its cls row) loads strictly."""
    torch.manual_seed(0)
    source, model = build(registry, decoder_depth=2), build(registry, decoder_depth=2)
    official = {}
    for key, value in source.state_dict().items():
        if key.startswith("encoder."):
            official[key.removeprefix("encoder.")] = value
        else:
            part = key.removeprefix("decoder.")
            official[part if part == "mask_token" else f"decoder_{part}"] = value
    assert "decoder_blocks.1.cross_attn.kv.weight" in official
    rows = torch.cat([torch.zeros(1, 1, 32), source.decoder.pos_embed], dim=1)  # (1, 1 + L, 32)
    official["decoder_pos_embed"] = rows
    model.load_state_dict(model.adapt_state_dict(official), strict=True)
    x, mask = torch.randn(2, 3, 16, 16), make_mask(2, 16)
    assert torch.equal(model.eval()(x, mask).pred, source.eval()(x, mask).pred)
    with pytest.raises(ValueError, match="decoder_pos_embed"):
        model.adapt_state_dict({"decoder_pos_embed": rows + 1})


def test_the_predicted_subset_is_uniform_over_the_masked_patches(registry):
    """Block masking lists its masked patches row by row: the subset is still spread over
    all of them (a patch, when masked, predicted about half the time at predict_ratio 0.5);
    it depends on each image's mask alone (a data-parallel rank holding some rows chooses
    as one process does; no random stream); and a loss over "every patch" (masked_only
    false) means every predicted one."""
    from mae_bench_plugins.masking import BlockMasking, BlockParams

    torch.manual_seed(0)
    model = build(registry, predict_ratio=0.5)
    generator = torch.Generator().manual_seed(3)
    mask = BlockMasking(BlockParams(ratio=0.75))(400, (4, 4), generator=generator)
    chosen = model.predicted_patches(mask)  # (400, 6)
    predicted = torch.zeros(400, 16).scatter(1, chosen, 1.0)
    assert torch.all(mask.mask[predicted == 1] == 1)
    share = predicted.sum(dim=0) / mask.mask.sum(dim=0)  # per patch, when masked
    assert share.min() > 0.35 and share.max() < 0.65, share
    rows = slice(100, 300)
    assert torch.equal(model.predicted_patches(mask.rows(rows)), chosen[rows])
    everywhere = make_component(registry, "loss", "mse", masked_only=False)
    x, mask = torch.randn(4, 3, 16, 16), mask.rows(slice(0, 4))
    loss, _ = forward_loss(model, x, mask, [(everywhere, 1.0)])
    out = model(x, mask)
    per_patch = ((out.pred - patchify(x, 4)) ** 2).mean(dim=-1)  # (4, 16)
    by_hand = (per_patch * out.predicted).sum() / out.predicted.sum()
    assert loss.item() == pytest.approx(by_hand.item(), rel=1e-5)
    assert loss.item() != pytest.approx(per_patch.mean().item(), rel=1e-3)  # not the zeros too
