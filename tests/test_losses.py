"""The built-in losses (plugins/losses.py) against hand-computed values: what each reads,
which patches it trains, and how it maps predictions back to pixels."""

import math

import pytest
import torch

from mae_bench.contract import LossInputs
from mae_bench.layers import (
    masked_laplacian_error,
    patch_mask_to_pixels,
    patchify,
    random_mask,
    unpatchify,
)
from mae_bench.suite import resolve_suite
from tests.conftest import make_component, small_vit, tiny_suite_data


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
    loss = make_component(registry, "loss", "mse")(_inputs(pred))
    assert loss.item() == pytest.approx(1.0 / 3)  # mean over the 3 masked patches
    everywhere = make_component(registry, "loss", "mse", masked_only=False)(_inputs(pred))
    assert everywhere.item() == pytest.approx((1 + 49) / 8)


def test_mse_norm_pix_target(registry):
    base = _inputs()
    t = base.target
    normalized = (t - t.mean(-1, keepdim=True)) / (t.var(-1, keepdim=True) + 1e-6) ** 0.5
    loss = make_component(registry, "loss", "mse", norm_pix=True)
    assert loss.prediction_space == "norm_pix"
    assert loss(_inputs(normalized)).item() == pytest.approx(0.0, abs=1e-10)
    assert loss(_inputs(t * 3 + 5)).item() > 1.0  # raw pixels are not the target


def test_l1(registry):
    pred = _inputs().target.clone()
    pred[1, 3] -= 2.0
    assert make_component(registry, "loss", "l1")(_inputs(pred)).item() == pytest.approx(2.0 / 3)


def test_laplacian_loss(registry):
    loss = make_component(registry, "loss", "laplacian")
    assert loss(_inputs()).item() == pytest.approx(0.0, abs=1e-10)
    pred = _inputs().target.clone()
    pred[0, 0] += 1.0  # a constant offset on a masked patch: only its edges are high-frequency
    offset = loss(_inputs(pred)).item()
    assert offset > 0
    noisy = pred.clone()
    noisy[0, 0] += torch.randn(48, generator=torch.Generator().manual_seed(3))
    assert loss(_inputs(noisy)).item() > offset


def test_uniformity_matches_definition(registry):
    loss = make_component(registry, "loss", "uniformity", t=2.0)
    emb = torch.randn(6, 5, generator=torch.Generator().manual_seed(0))
    z = torch.nn.functional.normalize(emb, dim=-1)
    pairs = [(i, j) for i in range(6) for j in range(i + 1, 6)]
    expected = math.log(
        sum(math.exp(-2 * float((z[i] - z[j]).pow(2).sum())) for i, j in pairs) / len(pairs)
    )
    assert loss(_inputs(latent=emb[:, None])).item() == pytest.approx(expected, rel=1e-5)
    collapsed = loss(_inputs(latent=torch.ones(6, 1, 5))).item()
    assert collapsed == pytest.approx(0.0, abs=1e-6)  # all identical: the worst value


def test_norm_pix_maps_back_without_the_masked_patches_statistics(registry):
    loss = make_component(registry, "loss", "mse", norm_pix=True)
    g = torch.Generator().manual_seed(0)
    target, pred = torch.randn(2, 16, 48, generator=g), torch.randn(2, 16, 48, generator=g)
    mask = random_mask(2, 16, 0.75, generator=g)[2]
    hidden = mask.bool()
    altered = target.clone()
    altered[hidden] = altered[hidden] * 5 + 3  # other content in the masked patches
    a, b = loss.to_input_space(pred, target, mask), loss.to_input_space(pred, altered, mask)
    assert torch.equal(a[hidden], b[hidden])
    mean, std = target.mean(-1, keepdim=True), (target.var(-1, keepdim=True) + 1e-6).sqrt()
    assert torch.allclose(a[~hidden], (pred * std + mean)[~hidden])  # visible: their own
    assert make_component(registry, "loss", "mse").to_input_space(pred, target, mask) is pred


def test_uniformity_spreads_the_pooled_embedding_the_probes_read(registry):
    g = torch.Generator().manual_seed(0)
    latent = torch.randn(6, 5, 8, generator=g)
    latent[:, 1:] = 1.0  # identical patch tokens, distinct cls tokens
    model = small_vit(registry, dim=8)
    inputs = LossInputs(
        torch.zeros(6, 3, 16, 16), torch.zeros(6, 16, 48), torch.ones(6, 16), latent, 4,
        model.pool,
    )  # fmt: skip
    default = make_component(registry, "loss", "uniformity")
    assert default.params.pool == "mean" and default.summary() == "uniformity(mean)"
    assert default(inputs).item() == pytest.approx(0.0, abs=1e-6)  # collapsed mean embedding
    assert make_component(registry, "loss", "uniformity", pool="cls")(inputs).item() < -0.5


def test_laplacian_loss_reads_visible_truth_and_trains_masked_patches_only(registry):
    loss = make_component(registry, "loss", "laplacian")
    g = torch.Generator().manual_seed(0)
    imgs = torch.randn(2, 3, 16, 16, generator=g)
    mask = random_mask(2, 16, 0.5, generator=g)[2]
    target = patchify(imgs, 4)
    perfect = target.clone()
    perfect[~mask.bool()] = 9.0  # garbage where the patch is visible: not the model's job
    inputs = LossInputs(imgs, perfect, mask, torch.zeros(2, 1, 8), 4)
    assert loss(inputs).item() == pytest.approx(0.0, abs=1e-10)
    pred = (target + torch.randn(target.shape, generator=g)).requires_grad_()
    value = loss(LossInputs(imgs, pred, mask, torch.zeros(2, 1, 8), 4))
    value.backward()
    per_patch = pred.grad.abs().sum(dim=-1)
    assert torch.all(per_patch[~mask.bool()] == 0) and torch.all(per_patch[mask.bool()] > 0)
    recon = unpatchify(pred.detach(), 4, 3)
    pm = patch_mask_to_pixels(mask, 4)
    per_image = masked_laplacian_error(recon, imgs, pm)  # the hf_error metric
    weights = pm.sum(dim=(1, 2, 3))
    assert value.item() == pytest.approx(((per_image * weights).sum() / weights.sum()).item())


def test_laplacian_with_norm_pix_mse_is_refused(registry):
    data = tiny_suite_data()
    data["variants"][1]["loss"] = [{"name": "mse", "norm_pix": True}, {"name": "laplacian"}]
    with pytest.raises(Exception, match=r"variants\[1\]\.loss: .*mse\(norm_pix\).*norm_pix"):
        resolve_suite(data, registry)
    data["variants"][1]["loss"] = [{"name": "mse", "norm_pix": True}, {"name": "uniformity"}]
    resolve_suite(data, registry)  # a regularizer does not read predictions: fine


def test_only_batch_statistic_losses_say_they_depend_on_the_batch(registry):
    """uniformity averages over pairs of the batch it sees; the others average per image."""
    depends = {
        name: info.cls.depends_on_batch for name, info in registry.components["loss"].items()
    }
    assert depends == {"mse": False, "l1": False, "laplacian": False, "uniformity": True}


def test_uniformity_of_a_batch_is_not_the_mean_over_its_micro_batches(registry):
    """Why its key holds the micro-batch: accumulating halves changes the objective."""
    loss = make_component(registry, "loss", "uniformity")
    latent = torch.randn(8, 3, 16, generator=torch.Generator().manual_seed(0))
    imgs = torch.zeros(8, 3, 8, 8)

    def uniformity(rows: slice) -> float:
        part = LossInputs(
            imgs=imgs[rows],
            pred=patchify(imgs[rows], 4),
            mask=torch.zeros(rows.stop - rows.start, 4),
            latent=latent[rows],
            patch_size=4,
        )
        return loss(part).item()

    whole = uniformity(slice(0, 8))
    halves = (uniformity(slice(0, 4)) + uniformity(slice(4, 8))) / 2
    assert abs(whole - halves) > 0.01
