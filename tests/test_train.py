"""The pretraining loop (mae_bench/train.py): the schedule, the loss going down, the mask
ratio it logs, micro-batches, and CUDA with bf16."""

import pytest
import torch
import yaml

from mae_bench.contract import Mask
from mae_bench.plan import suite_cells
from mae_bench.suite import resolve_suite
from mae_bench.train import lr_at
from tests.conftest import mse_only, pretrain_variant, slow_suite, tiny_suite_data


def test_lr_schedule_warmup_then_cosine():
    from mae_bench.suite import PretrainConfig

    cfg = PretrainConfig(epochs=1, lr=1.0, min_lr=0.1)
    assert lr_at(0, 100, 10, cfg) == pytest.approx(0.1)
    assert lr_at(9, 100, 10, cfg) == pytest.approx(1.0)
    assert lr_at(10, 100, 10, cfg) == pytest.approx(1.0)
    assert lr_at(55, 100, 10, cfg) == pytest.approx(0.55)
    assert lr_at(100, 100, 10, cfg) == pytest.approx(0.1)


@pytest.mark.parametrize("variant", [0, 1])
def test_pretraining_reduces_the_loss(registry, variant):
    data = tiny_suite_data(dataset={"name": "digits", "image_size": 16})
    data["pretrain"].update(epochs=3, batch_size=64, lr=2e-3)
    suite = resolve_suite(data, registry)
    ds, _, result = pretrain_variant(suite, suite.variants[variant])
    losses = [row["mse"] for row in result.history]
    assert losses[-1] < 0.9 * losses[0] and losses[-1] < losses[1]
    assert result.images_seen == 3 * (len(ds.pretrain) // 64) * 64
    assert result.images_per_second > 0
    ratios = [row["mask_ratio"] for row in result.history]
    if variant == 1:  # curriculum 0.5 -> 0.75
        assert ratios[0] < ratios[1] < ratios[2] and 0.5 <= ratios[0] < 0.6 and ratios[2] > 0.65
    else:
        assert set(ratios) == {0.75}


def test_logged_mask_ratio_is_the_drawn_one(registry):
    """16 patches at ratio 0.3 hide round(16 * 0.3) = 5 of them: 0.3125, not 0.3."""
    data = tiny_suite_data()
    data["pretrain"]["epochs"] = 1
    data["variants"][1]["masking"] = {"name": "random", "ratio": 0.3}
    suite = resolve_suite(data, registry)
    _, _, result = pretrain_variant(suite, suite.variants[1])
    assert result.history[0]["mask_ratio"] == pytest.approx(5 / 16)
    assert not hasattr(Mask, "ratio")


def test_accumulated_micro_batches_and_blr_match_one_batch(tmp_path, registry):
    histories, cell_ids = [], []
    for accum in (1, 4):
        raw = yaml.safe_load(slow_suite(tmp_path, epochs=2, accum_iter=accum).read_text())
        raw["pretrain"].pop("lr")
        raw["pretrain"]["blr"] = 8e-3  # lr = 8e-3 * 32 / 256 = 1e-3
        raw["dataset"]["n_pretrain"] = 256  # 8 steps an epoch are enough to compare
        raw["variants"][0]["loss"] = {"name": "mse"}  # no statistic of the batch
        suite = resolve_suite(raw, registry)
        assert suite.config.pretrain.lr == pytest.approx(1e-3)
        _, _, result = pretrain_variant(suite, mse_only(suite.variants[0]))
        histories.append(result.history)
        cell_ids.append(suite_cells(suite)[0].cell_id)
    ones, fours = histories
    for a, b in zip(ones, fours, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
    # for a loss that is no batch statistic, accum_iter changes how a cell runs, not what it
    # computes: the same cell (a batch statistic's key holds its micro-batch: tests/test_plan.py)
    assert cell_ids[0] == cell_ids[1] and cell_ids[0].startswith("vit-seed0-")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_pretraining_on_cuda_with_bf16_and_fused_adamw(registry):
    suite = resolve_suite(tiny_suite_data(), registry)
    _, model, result = pretrain_variant(suite, suite.variants[1], device="cuda")
    assert next(model.parameters()).is_cuda
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in result.history)


def test_a_misbehaving_encoder_or_loss_fails_with_a_message_naming_it():
    """An encoder returning tokens narrower than its embed_dim, and a loss returning a float,
    fail with one line naming the component (not a shape error deep in the decoder, not
    "'float' object has no attribute 'detach'")."""
    from mae_bench.layers import random_mask
    from mae_bench.train import forward_loss
    from tests import fault_plugins
    from tests.conftest import make_component, registry_with

    registry = registry_with(fault_plugins, "faults")
    info = registry.get("encoder", "faulty", "encoder")
    params = {"patch_size": 4, "dim": 32, "hidden": 64}
    x = torch.rand(2, 3, 16, 16)
    mask = Mask(*random_mask(2, 16, 0.75))
    mse = make_component(registry, "loss", "mse")
    narrow = info.cls(info.cls.Params(**params, fault="width"), image_size=16, in_chans=3)
    with pytest.raises(ValueError, match=r"encoder 'faulty' .*returned tokens of shape .*31\)"):
        forward_loss(narrow, x, mask, [(mse, 1.0)])
    healthy = info.cls(info.cls.Params(**params), image_size=16, in_chans=3)
    not_tensor = make_component(registry, "loss", "faulty", fault="not-tensor")
    with pytest.raises(TypeError, match=r"loss 'faulty' .*returned float, not a scalar tensor"):
        forward_loss(healthy, x, mask, [(not_tensor, 1.0)])
    total, terms = forward_loss(healthy, x, mask, [(mse, 1.0)])
    assert total.ndim == 0 and set(terms) == {"mse"}
