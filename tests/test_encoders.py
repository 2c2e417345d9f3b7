"""The built-in encoders (plugins/vit.py, mlp.py, timm_encoder.py) and what every
MaskedAutoencoder provides: shapes, visible-only encoding, positions, parameter groups,
drop path."""

import pytest
import torch
from timm.layers import DropPath

from mae_bench.contract import Mask
from mae_bench.layers import random_mask


def build(registry, name, image_size=16, in_chans=3, **params):
    info = registry.get("encoder", name, "encoder")
    return info.cls(info.cls.Params(**params), image_size=image_size, in_chans=in_chans)


MODELS = [
    (
        "vit",
        {"patch_size": 4, "dim": 32, "depth": 2, "heads": 4, "decoder_dim": 16, "decoder_heads": 2},
    ),
    ("mlp", {"patch_size": 4, "dim": 16, "hidden": 32}),
    (
        "timm",
        {
            "model": "vit_tiny_patch16_224",
            "model_args": {"patch_size": 4, "depth": 2},
            "decoder_dim": 16,
            "decoder_depth": 1,
        },
    ),
]


def _mask(n, num_patches, seed=0):
    return Mask(*random_mask(n, num_patches, 0.75, generator=torch.Generator().manual_seed(seed)))


@pytest.mark.parametrize(("name", "params"), MODELS, ids=[m[0] for m in MODELS])
def test_forward_shapes(registry, name, params):
    torch.manual_seed(0)
    model = build(registry, name, **params)
    x = torch.randn(3, 3, 16, 16)
    mask = _mask(3, model.num_patches)
    out = model(x, mask)
    assert out.pred.shape == (3, 16, 4 * 4 * 3)
    assert out.latent.shape == (3, model.num_prefix_tokens + 4, model.embed_dim)
    assert model.pool(out.latent, "mean").shape == (3, model.embed_dim)
    assert model.forward_features(x, "mean").shape == (3, model.embed_dim)
    out.pred.sum().backward()


@pytest.mark.parametrize(("name", "params"), MODELS, ids=[m[0] for m in MODELS])
def test_encoder_sees_only_visible_patches(registry, name, params):
    """Changing the pixels of masked patches must not change the encoder output."""
    torch.manual_seed(0)
    model = build(registry, name, **params).eval()
    x = torch.randn(2, 3, 16, 16)
    mask = _mask(2, model.num_patches)
    pixel_mask = mask.mask.reshape(2, 1, 4, 4).repeat_interleave(4, 2).repeat_interleave(4, 3)
    x2 = x + 5.0 * torch.randn_like(x) * pixel_mask
    with torch.no_grad():
        a = model.forward_encoder(x, mask.ids_keep)
        b = model.forward_encoder(x2, mask.ids_keep)
        c = model.forward_encoder(x + torch.randn_like(x) * (1 - pixel_mask), mask.ids_keep)
    assert torch.allclose(a, b, atol=1e-5)
    assert not torch.allclose(a, c, atol=1e-3)


def test_vit_positions_are_fixed_sincos(registry):
    model = build(registry, "vit", patch_size=4, dim=32, depth=1, heads=4)
    names = dict(model.named_parameters())
    assert not any("pos_embed" in n for n in names)
    assert "encoder.cls_token" in names and "decoder.mask_token" in names


def test_timm_encoder_freezes_sincos_positions(registry):
    model = build(
        registry, "timm", model="vit_tiny_patch16_224", model_args={"patch_size": 4, "depth": 1}
    )
    assert model.encoder.pos_embed.requires_grad is False
    assert model.patch_size == 4 and model.num_prefix_tokens == 1


def test_patch_size_must_divide_image(registry):
    with pytest.raises(ValueError, match="does not divide"):
        build(registry, "vit", image_size=18, patch_size=4, dim=32, depth=1, heads=4)


def test_timm_rejects_non_vit(registry):
    with pytest.raises(ValueError, match=r"could not build 'resnet18' as a ViT|not a Vision"):
        build(registry, "timm", image_size=32, model="resnet18")


def _vit(registry, **changes):
    params = {"patch_size": 4, "dim": 32, "depth": 2, "heads": 2, "decoder_dim": 16, **changes}
    return build(registry, "vit", **params)


def test_weight_decay_skips_tokens_by_their_qualified_names(registry):
    model = _vit(registry)
    decay_of = {id(p): g["weight_decay"] for g in model.param_groups(0.05) for p in g["params"]}
    named = dict(model.named_parameters())
    assert decay_of[id(named["encoder.cls_token"])] == 0.0
    assert decay_of[id(named["decoder.mask_token"])] == 0.0
    assert decay_of[id(named["encoder.blocks.0.attn.qkv.weight"])] == 0.05


def test_layer_norms_use_the_official_eps(registry):
    norms = [m for m in _vit(registry).modules() if isinstance(m, torch.nn.LayerNorm)]
    assert len(norms) == 2 * 2 + 1 + 2 * 2 + 1 and {m.eps for m in norms} == {1e-6}


def test_drop_path_rises_linearly(registry):
    model = _vit(registry, depth=3, decoder_depth=2)
    model.set_drop_path(0.2)
    rates = [getattr(b.drop_path1, "drop_prob", 0.0) for b in model.encoder.blocks]
    assert rates == pytest.approx([0.0, 0.1, 0.2])
    assert isinstance(model.encoder.blocks[2].drop_path2, DropPath)


@pytest.mark.parametrize(("name", "params"), MODELS, ids=[m[0] for m in MODELS])
def test_drop_final_norm_leaves_the_tokens_unnormalized(registry, name, params):
    """What the official global-pool fine-tuning head needs: the encoder without its final
    norm (the ViTs), or nothing to drop (the MLP has none)."""
    torch.manual_seed(0)
    model = build(registry, name, **params).eval()
    x = torch.randn(2, 3, 16, 16)
    ids_all = torch.arange(model.num_patches).expand(2, -1)
    with torch.no_grad():
        normed = model.forward_encoder(x, ids_all)
        dropped = model.drop_final_norm()
        raw = model.forward_encoder(x, ids_all)
    assert dropped == (name != "mlp")
    assert not any(".norm." in n for n, _ in model.encoder.named_parameters(prefix="."))
    if dropped:  # the norm it dropped is the one that made the tokens
        norm = torch.nn.functional.layer_norm(raw, (model.embed_dim,), eps=1e-6)
        assert torch.allclose(norm, normed, atol=1e-4) and not torch.allclose(raw, normed)
    else:
        assert torch.equal(raw, normed)
