"""The ``simmim`` encoder (plugins/simmim.py): mask tokens in the encoder, every patch encoded,
a linear pixel head; what that costs against the MAE; a CLI run of the paper's recipe."""

import pandas as pd
import pytest
import timm
import torch
import torch.nn.functional as F
from torch import Tensor

from mae_bench.cell import pretrain_flops_per_image
from mae_bench.contract import Mask
from mae_bench.layers import random_mask, sincos_pos_embed
from mae_bench.suite import resolve_suite
from tests.conftest import invoke, tiny_suite_data, write_suite

SMALL = {"patch_size": 4, "dim": 32, "depth": 2, "heads": 2}


def simmim(registry, image_size=16, **params):
    info = registry.get("encoder", "simmim", "encoder")
    return info.cls(info.cls.Params(**{**SMALL, **params}), image_size=image_size, in_chans=3)


def _mask(n: int, seed: int = 0) -> Mask:
    return Mask(*random_mask(n, 16, 0.75, generator=torch.Generator().manual_seed(seed)))


def _pixels(mask: Tensor) -> Tensor:
    """(B, 16) patch mask of a 4 x 4 grid -> (B, 1, 16, 16) pixel mask."""
    return mask.reshape(-1, 1, 4, 4).repeat_interleave(4, 2).repeat_interleave(4, 3)


def test_masked_predictions_see_only_visible_pixels(registry):
    """A masked patch's prediction ignores every masked patch's pixels (its own included),
    and follows the visible ones."""
    torch.manual_seed(0)
    model = simmim(registry).eval()
    x, mask = torch.randn(2, 3, 16, 16), _mask(2)
    hidden = _pixels(mask.mask)
    masked = mask.mask.bool()
    with torch.no_grad():
        a = model(x, mask).pred
        b = model(x + 5 * torch.randn_like(x) * hidden, mask).pred
        c = model(x + torch.randn_like(x) * (1 - hidden), mask).pred
    assert torch.allclose(a[masked], b[masked], atol=1e-5)
    assert not torch.allclose(a[masked], c[masked], atol=1e-3)


def test_forward_matches_a_hand_written_simmim(registry):
    """Every patch is encoded (1 + L tokens) and the mask token replaces exactly the masked
    patches' embeddings, before the positions: the official order, written out here on the
    model's own weights. With every patch visible (probes) it is a plain ViT, and the mask
    token still gets a gradient (zero): data-parallel fine-tuning needs every parameter's."""
    torch.manual_seed(0)
    model = simmim(registry).eval()
    enc = model.encoder
    x, mask = torch.randn(2, 3, 16, 16), _mask(2, seed=1)

    def by_hand(masked: Tensor) -> tuple[Tensor, Tensor]:
        proj = enc.patch_embed.proj
        t = F.conv2d(x, proj.weight, proj.bias, stride=4).flatten(2).transpose(1, 2)  # (B, L, D)
        t = torch.where(masked[..., None].bool(), enc.mask_token, t)
        t = t + sincos_pos_embed(32, 4).float()
        t = torch.cat([enc.cls_token.expand(2, -1, -1), t], dim=1)
        latent = enc.norm(enc.blocks(t))
        return latent, model.decoder.pred(latent[:, 1:])

    with torch.no_grad():
        out = model(x, mask)
        latent, pred = by_hand(mask.mask)
        assert out.latent.shape == (2, 1 + 16, 32) and out.pred.shape == (2, 16, 4 * 4 * 3)
        assert torch.allclose(out.latent, latent, atol=1e-5)
        assert torch.allclose(out.pred, pred, atol=1e-5)
        assert torch.allclose(model.forward_encoder(x, mask.ids_keep), latent, atol=1e-5)
        plain, _ = by_hand(torch.zeros(2, 16))
        assert not torch.allclose(plain, latent, atol=1e-3)
    assert torch.allclose(model.forward_features(x, "cls"), plain[:, 0], atol=1e-5)
    model.forward_features(x, "mean").sum().backward()
    assert enc.mask_token.grad is not None and not enc.mask_token.grad.any()


def test_finetuning_and_export_hooks(registry):
    """The parts fine-tuning and export use: no weight decay on the tokens, the mask token in
    the stem's layer-decay group, a resizable head, and a timm ViT with the same features."""
    torch.manual_seed(0)
    model = simmim(registry).eval()
    assert model.no_weight_decay() == {"encoder.cls_token", "encoder.mask_token"}
    groups = model.encoder_param_groups(0.05, layer_decay=0.5)
    (stem,) = [g for g in groups if any(p is model.encoder.mask_token for p in g["params"])]
    assert stem["lr_scale"] == pytest.approx(0.5**3) and stem["weight_decay"] == 0
    model.reset_head(7)
    assert model(torch.randn(1, 3, 16, 16), _mask(1)).pred.shape == (1, 16, 7)
    weights, kwargs = model.export_state_dict("timm")
    vit = timm.create_model(**kwargs).eval()
    vit.load_state_dict(weights, strict=True)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(vit.forward_features(x)[:, 0], model.forward_features(x), atol=1e-5)


def _variant(registry, encoder, masking, loss):
    data = tiny_suite_data()
    data["variants"] = [{"name": "v", "encoder": encoder, "masking": masking, "loss": [loss]}]
    return resolve_suite(data, registry).variants[0]


def test_pretraining_costs_a_whole_image_encoder(registry):
    """FLOPs of a step on 32 x 32 images (L = 64 patches of 4 x 4, width 64, 2 blocks) match
    a hand count of SimMIM, do not depend on the mask ratio, and are 2.53x the same-size
    MAE's at ratio 0.75. Its encoder alone costs 4.3x the MAE's (1 + 64 tokens against
    1 + 16, attention quadratic in them; the MAE paper's ~3x speed-up); the MAE also pays
    for its decoder (1 block, width 32, on 1 + 64 tokens), SimMIM only for a linear head."""
    size, p, c, d, depth, dd = 32, 4, 3, 64, 2, 32
    enc = {"patch_size": p, "dim": d, "depth": depth, "heads": 2}
    mae = {"name": "vit", **enc, "decoder_dim": dd, "decoder_depth": 1, "decoder_heads": 2}
    l1, block = {"name": "l1"}, {"name": "block", "ratio": 0.75}

    def count(encoder, masking, loss):
        return pretrain_flops_per_image(_variant(registry, encoder, masking, loss), size, c)

    ours = count({"name": "simmim", **enc}, block, l1)
    assert count({"name": "simmim", **enc}, {**block, "ratio": 0.5}, l1) == ours
    patches = (size // p) ** 2

    def blk(tokens: int, dim: int) -> int:  # qkv + proj + mlp (ratio 4), attention
        return 2 * tokens * dim * 12 * dim + 2 * 2 * tokens * tokens * dim

    # forward x 3 (backward: input and weight gradients); patch embedding x 2 (no input grad)
    forward = depth * blk(1 + patches, d) + 2 * patches * d * p * p * c
    assert ours == pytest.approx(3 * forward + 2 * 2 * patches * p * p * c * d, rel=0.02)
    ratio = ours / count(mae, {"name": "random", "ratio": 0.75}, {"name": "mse"})
    assert blk(1 + patches, d) / blk(1 + patches // 4, d) == pytest.approx(4.28, abs=0.01)
    assert 2.4 < ratio < 2.7  # measured 2.53


def test_paper_recipe_runs_from_the_cli(tmp_path):
    """``encoder: simmim``, ``loss: l1`` and block masking, end to end: the leaderboard has
    the linear probe's accuracy and the masked patches' PSNR."""
    data = tiny_suite_data()
    data["variants"] = [
        {
            "name": "simmim",
            "encoder": {"name": "simmim", "patch_size": 4, "dim": 32, "depth": 1, "heads": 2},
            "masking": {"name": "block", "ratio": 0.6, "min_patches": 2},
            "loss": [{"name": "l1"}],
        }
    ]
    data["pretrain"] = {**data["pretrain"], "epochs": 1}
    result = invoke("run", str(write_suite(tmp_path, data)), "--out", str(tmp_path))
    assert result.exit_code == 0, result.output
    board = pd.read_csv(tmp_path / "tiny" / "leaderboard.csv").set_index("variant")
    row = board.loc["simmim"]
    assert row["encoder"] == "simmim(p4,d32x1)" and row["loss"] == "l1"
    assert 0 <= row["lp_acc"] <= 1 and 5 < row["psnr_masked"] < 40
