"""Shared model layers (mae_bench/layers.py): patches, masks, positions, the decoder."""

import numpy as np
import pytest
import torch

from mae_bench.layers import (
    MAEDecoder,
    laplacian,
    patch_mask_to_pixels,
    patchify,
    random_mask,
    sincos_pos_embed,
    unpatchify,
)
from tests.reference import reference_positions


def test_patchify_roundtrip_and_layout():
    imgs = torch.randn(2, 3, 8, 8)
    x = patchify(imgs, 4)
    assert x.shape == (2, 4, 4 * 4 * 3)
    assert torch.equal(unpatchify(x, 4, 3), imgs)
    # patch 1 is the top-right block, flattened as (p, p, C)
    assert torch.equal(x[0, 1], imgs[0, :, :4, 4:].permute(1, 2, 0).reshape(-1))


def test_random_mask_exact_ratio_and_inverse():
    gen = torch.Generator().manual_seed(0)
    ids_keep, ids_restore, mask = random_mask(5, 16, 0.75, generator=gen)
    assert ids_keep.shape == (5, 4)
    assert torch.all(mask.sum(1) == 12)
    for b in range(5):
        assert torch.all(mask[b, ids_keep[b]] == 0)  # kept patches are the visible ones
    shuffle = torch.argsort(ids_restore, dim=1)
    assert torch.equal(torch.argsort(shuffle, dim=1), ids_restore)
    assert not torch.equal(ids_keep[0].sort().values, ids_keep[1].sort().values)


def test_random_mask_reproducible_and_keeps_one():
    a = random_mask(3, 9, 0.5, generator=torch.Generator().manual_seed(1))
    b = random_mask(3, 9, 0.5, generator=torch.Generator().manual_seed(1))
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    ids_keep, _, _ = random_mask(2, 4, 0.99)
    assert ids_keep.shape[1] == 1


def test_sincos_pos_embed_is_fixed_and_distinct():
    pos = sincos_pos_embed(32, 4)
    assert pos.shape == (16, 32)
    assert torch.all(pos.abs() <= 1)
    assert torch.cdist(pos, pos).add(torch.eye(16)).min() > 0  # every position distinct


def test_sincos_positions_follow_the_official_channel_order():
    ours = sincos_pos_embed(8, 2)
    assert torch.allclose(ours, torch.from_numpy(reference_positions(8, 2)[0, 1:]), atol=1e-7)
    # patch 1 is row 0, column 1: the first half of the channels encodes the column
    assert ours[1, 0] == pytest.approx(np.sin(1.0)) and ours[1, 4] == 0.0
    assert ours[2, 0] == 0.0 and ours[2, 4] == pytest.approx(np.sin(1.0))


def test_laplacian_known_values():
    flat = torch.full((1, 1, 5, 5), 3.0)
    assert torch.allclose(laplacian(flat), torch.zeros_like(flat))
    spike = torch.zeros(1, 1, 5, 5)
    spike[0, 0, 2, 2] = 1.0
    out = laplacian(spike)[0, 0]
    assert out[2, 2] == -4 and out[1, 2] == 1 and out[2, 1] == 1 and out[0, 0] == 0


def test_patch_mask_to_pixels():
    mask = torch.tensor([[1.0, 0.0, 0.0, 1.0]])
    pix = patch_mask_to_pixels(mask, 2)
    assert pix.shape == (1, 1, 4, 4)
    assert pix[0, 0, :2, :2].eq(1).all() and pix[0, 0, :2, 2:].eq(0).all()
    assert pix[0, 0, 2:, 2:].eq(1).all()


def test_decoder_uses_mask_token_for_hidden_patches():
    dec = MAEDecoder(
        num_patches=16,
        embed_dim=8,
        patch_size=2,
        in_chans=1,
        dim=16,
        depth=1,
        heads=2,
        num_prefix_tokens=1,
    )
    assert "pos_embed" not in dict(dec.named_parameters())  # fixed, not learned
    ids_keep, ids_restore, _ = random_mask(2, 16, 0.75, generator=torch.Generator().manual_seed(0))
    latent = torch.randn(2, 1 + ids_keep.shape[1], 8)
    out = dec(latent, ids_restore)
    assert out.shape == (2, 16, 4)
    out.sum().backward()
    assert dec.mask_token.grad is not None and dec.mask_token.grad.abs().sum() > 0


def test_a_laplacian_traced_with_fake_tensors_leaves_no_fake_kernel_for_real_calls():
    """The memory estimate traces a step with fake tensors: the cached kernel stays real."""
    from torch._subclasses.fake_tensor import FakeTensorMode, is_fake

    from mae_bench.layers import _laplacian_kernel, laplacian

    _laplacian_kernel.cache_clear()  # as in a fresh process: the fake trace comes first
    with FakeTensorMode():
        laplacian(torch.zeros(2, 3, 8, 8))
    real = laplacian(torch.arange(64.0).reshape(1, 1, 8, 8).expand(1, 3, 8, 8).contiguous())
    assert not is_fake(real) and real.shape == (1, 3, 8, 8)
