"""Targets (mae_bench.contract.Target): what a variant predicts for a masked patch. The head
follows the target's width, losses compare with it, a target with state is set up, stepped
and checkpointed, reconstruction PSNR only where predictions are pixels, and validation
refuses losses that cannot train a target."""

import math
import types
from pathlib import Path

import pandas as pd
import pytest
import torch
from torch import Tensor

from mae_bench import Mask, MaskedAutoencoder, Metric, Target, hookimpl
from mae_bench.cell import evaluate_cell, pretrain_cell
from mae_bench.data import ImageFeeder
from mae_bench.layers import patchify
from mae_bench.plan import suite_cells
from mae_bench.resume import Checkpoint
from mae_bench.suite import resolve_suite
from mae_bench.train import forward_loss
from tests.conftest import (
    invoke,
    pretrain_variant,
    registry_with,
    results_of,
    tiny_suite_data,
    write_suite,
)

VIT = {"name": "vit", "patch_size": 4, "dim": 32, "depth": 1, "heads": 2, "decoder_dim": 32,
       "decoder_depth": 1}  # fmt: skip
MLP = {"name": "mlp", "patch_size": 4, "dim": 32, "hidden": 64}


class PatchColour(Target):
    """A test target of another width: each patch's mean colour (C values), with a step
    counter as per-run state."""

    name = "patch_colour"

    def __init__(self, params):
        super().__init__(params)
        self.steps = 0
        self.set_up = 0

    def dim(self, model: MaskedAutoencoder) -> int:
        return model.in_chans

    def setup(self, model: MaskedAutoencoder) -> None:
        self.set_up += 1

    def __call__(self, imgs: Tensor, mask: Mask, model: MaskedAutoencoder) -> Tensor:
        p = model.patch_size
        return patchify(imgs, p).unflatten(-1, (p * p, imgs.shape[1])).mean(dim=2)

    def metrics(self) -> dict[str, Metric]:
        return {"colour_error": Metric("masked-patch MSE of the mean colour", False)}

    def reconstruction_metrics(self, pred, target, mask) -> dict[str, float]:
        per_patch = ((pred - target) ** 2).mean(dim=-1)
        return {"colour_error": float((per_patch * mask).sum() / mask.sum())}

    def after_step(self, model: MaskedAutoencoder, progress: float) -> None:
        self.steps += 1

    def state_dict(self) -> dict:
        return {"steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        self.steps = state["steps"]


@hookimpl
def register_targets(register):
    register(PatchColour)


@pytest.fixture(scope="module")
def colour_registry():
    return registry_with(types.SimpleNamespace(register_targets=register_targets), "colour")


def colour_suite(registry, encoder, epochs=2):
    data = tiny_suite_data(seeds=[0])
    data["pretrain"]["epochs"] = epochs
    data["variants"] = [{"name": "colour", "encoder": encoder, "target": "patch_colour"}]
    return resolve_suite(data, registry)


@pytest.mark.parametrize("encoder", [VIT, MLP], ids=["vit", "mlp"])
def test_the_head_follows_the_target_and_the_loss_compares_with_it(colour_registry, encoder):
    suite = colour_suite(colour_registry, encoder)
    variant = suite.variants[0]
    model = variant.build_model(16, 3)
    assert model.pred_dim == 3
    x = torch.randn(2, 3, 16, 16)
    ids = torch.arange(16).expand(2, 16)
    mask = Mask(ids[:, :4], ids, torch.cat([torch.zeros(2, 4), torch.ones(2, 12)], dim=1))
    out = model(x, mask)
    assert out.pred.shape == (2, 16, 3)
    target = variant.build_target()
    loss, _ = forward_loss(model, x, mask, variant.build_losses(), target=target)
    wanted = target(x, mask, model)
    expected = (((out.pred - wanted) ** 2).mean(dim=-1) * mask.mask).sum() / mask.mask.sum()
    assert torch.allclose(loss, expected, atol=1e-6)


def test_a_target_is_set_up_stepped_and_its_state_resumes(colour_registry, tmp_path):
    suite = colour_suite(colour_registry, VIT, epochs=2)
    variant = suite.variants[0]
    first = variant.build_target()
    checkpoint = Checkpoint(tmp_path / "c.pt", "key", every=1)
    _, _, result = pretrain_variant(suite, checkpoint=checkpoint, target=first)
    steps = len(result.history) * (128 // 32)  # 2 epochs of 4 steps
    assert first.set_up == 1 and first.steps == steps
    saved = torch.load(checkpoint.path, weights_only=True)  # after epoch 1 (not the last)
    assert saved["epoch"] == 1 and saved["target"] == {"steps": steps // 2}
    # two more epochs from it: a fresh target gets the saved state back, then steps on
    longer = colour_suite(colour_registry, VIT, epochs=3)
    again = variant.build_target()
    pretrain_variant(longer, checkpoint=Checkpoint(checkpoint.path, "key", every=1), target=again)
    assert again.set_up == 1 and again.steps == steps // 2 + 2 * (128 // 32)


def test_a_target_that_is_not_pixels_gets_its_own_metric_instead_of_psnr(colour_registry):
    suite = colour_suite(colour_registry, VIT, epochs=1)
    data = suite.build_dataset().load()
    feeder = ImageFeeder.fit(data.pretrain, image_size=16, channels=3, device=torch.device("cpu"))
    cell = suite_cells(suite)[0]
    pre = pretrain_cell(cell, suite, data, feeder)
    assert "on patch_colour" in pre.record["components"]["loss"]
    recon = [e for e in cell.evaluations if e.name == "reconstruction"]
    (out,) = evaluate_cell(
        cell, suite, data, feeder, pre.model, feeder.mean_image(data.pretrain), recon
    )
    metrics = out.record["metrics"]
    assert set(metrics) == {"colour_error"} and 0 < metrics["colour_error"] < 10
    assert "not pixels: no PSNR" in out.record["sanity"]["note"]
    assert "colour_error" in suite.metrics()


@pytest.mark.slow
def test_the_norm_pix_target_trains_exactly_as_the_norm_pix_loss(tmp_path):
    """`target: norm_pix` with plain MSE is the official norm_pix_loss, as `mse(norm_pix)`
    is: same init, same numbers; `target: pixels` is the default written out (same numbers,
    a key of its own)."""
    data = tiny_suite_data(seeds=[0])
    data["pretrain"]["epochs"] = 2
    data["eval"] = {"linear_probe": {"epochs": 2}, "reconstruction": {"num_images": 32}}
    data["variants"] = [
        {"name": "loss-norm-pix", "encoder": VIT, "loss": {"name": "mse", "norm_pix": True}},
        {"name": "target-norm-pix", "encoder": VIT, "target": "norm_pix"},
        {"name": "plain", "encoder": VIT},
        {"name": "target-pixels", "encoder": VIT, "target": "pixels"},
    ]
    result = invoke("run", str(write_suite(tmp_path, data)), "--out", str(tmp_path / "out"))
    assert result.exit_code == 0, result.stderr
    found = {
        name.rsplit("-seed", 1)[0]: r for name, r in results_of(tmp_path / "out" / "tiny").items()
    }
    assert len(found) == 4  # four cells: four keys
    for a, b in (("loss-norm-pix", "target-norm-pix"), ("plain", "target-pixels")):
        assert found[a]["history"] == found[b]["history"]
        assert found[a]["metrics"] == found[b]["metrics"], (a, b)
    board = pd.read_csv(tmp_path / "out" / "tiny" / "leaderboard.csv").set_index("variant")
    assert board.loc["target-norm-pix", "loss"] == "mse on norm_pix"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"target": "norm_pix", "loss": [{"name": "mse"}, {"name": "laplacian"}]},
         "variants[0].loss[1]: laplacian reads predictions as an image, and the 'norm_pix' "
         "target's predictions are norm_pix, not the input's pixels"),
        ({"target": "norm_pix", "loss": {"name": "mse", "norm_pix": True}},
         "variants[0].loss[0]: mse(norm_pix) trains predictions as norm_pix, and the target "
         "'norm_pix' says what they are"),
        ({"target": "norm_pixx"}, "variants[0].target.name"),
    ],
    ids=["image-loss", "double-normalisation", "unknown"],
)  # fmt: skip
def test_validation_refuses_what_cannot_train_a_target(tmp_path, change, message):
    data = tiny_suite_data()
    data["variants"] = [{"name": "v", "encoder": VIT, **change}]
    result = invoke("validate", str(write_suite(tmp_path, data)))
    assert result.exit_code != 0 and message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_the_teacher_target_of_the_plugin_guide_runs_as_written(tmp_path):
    """docs/plugins.md's complete teacher example, executed as written: registered as a
    plugin, it sizes the head, follows the student after each step and checkpoints."""
    text = (Path(__file__).parents[1] / "docs" / "plugins.md").read_text()
    code = text.split("<!-- example: teacher target -->\n```python\n", 1)[1].split("```", 1)[0]
    namespace: dict = {}
    exec(compile(code, "docs/plugins.md", "exec"), namespace)
    package = types.SimpleNamespace(register_targets=namespace["register_targets"])
    registry = registry_with(package, "ema")
    data = tiny_suite_data(seeds=[0])
    data["pretrain"]["epochs"] = 2
    data["variants"] = [{"name": "ema", "encoder": VIT,
                         "target": {"name": "ema_features", "decay": 0.9}}]  # fmt: skip
    suite = resolve_suite(data, registry)
    target = suite.variants[0].build_target()
    checkpoint = Checkpoint(tmp_path / "c.pt", "key", every=1)
    _, model, result = pretrain_variant(suite, checkpoint=checkpoint, target=target)
    assert model.pred_dim == 32 and all(map(math.isfinite, (r["loss"] for r in result.history)))
    teacher = dict(target.teacher.named_parameters())
    moved = [n for n, p in model.encoder.named_parameters() if not torch.equal(p, teacher[n])]
    assert moved  # the teacher lags the student: an average, not a copy
    saved = torch.load(checkpoint.path, weights_only=True)["target"]["teacher"]
    assert set(saved) == set(target.teacher.state_dict())


def test_the_memory_check_counts_a_teachers_weights(registry, monkeypatch):
    import mae_bench.memory
    from mae_bench.memory import pretrain_step_bytes

    data = tiny_suite_data(seeds=[0])
    data["variants"] = [
        {"name": "teacher", "encoder": VIT, "target": {"name": "data2vec", "top_k": 1}}
    ]
    suite = resolve_suite(data, registry)
    (variant,) = suite.variants
    counted = pretrain_step_bytes(variant, suite)
    monkeypatch.setattr(mae_bench.memory, "_state_bytes", lambda state: 0)
    without = pretrain_step_bytes(variant, suite)
    encoder = variant.build_model(16, 3).encoder
    weights = sum(t.numel() * 4 for t in encoder.state_dict().values())
    assert counted - without == weights  # the teacher: a copy of the encoder


def test_a_target_variant_starts_from_a_pixel_checkpoint_with_a_fresh_head(tmp_path, registry):
    """`init_from` a pixel MAE's weights with `target: hog`: the encoder and the decoder's
    body load, the pixel head (48 wide) is left out and the HOG head (108) stays fresh."""
    from mae_bench.weights import load_weights

    data = tiny_suite_data(seeds=[0])
    data["variants"] = [{"name": "pixels", "encoder": VIT}]
    torch.manual_seed(1)
    pixel = resolve_suite(data, registry).variants[0].build_model(16, 3)
    torch.save(pixel.state_dict(), tmp_path / "mae.pth")
    data["variants"] = [
        {"name": "hog", "encoder": {**VIT, "init_from": str(tmp_path / "mae.pth")}, "target": "hog"}
    ]
    variant = resolve_suite(data, registry).variants[0]  # validation loads it too
    model = variant.build_model(16, 3)
    fresh = model.decoder.pred.weight.clone()
    assert load_weights(model, tmp_path / "mae.pth") == ["decoder.pred.bias", "decoder.pred.weight"]
    assert torch.equal(model.decoder.pred.weight, fresh) and model.pred_dim == 108
    for key, value in pixel.encoder.state_dict().items():
        assert torch.equal(model.encoder.state_dict()[key], value)
    assert torch.equal(
        model.decoder.blocks[0].mlp.fc1.weight, pixel.decoder.blocks[0].mlp.fc1.weight
    )


@pytest.mark.slow
def test_hugging_face_export_knows_the_target(tmp_path):
    """A `norm_pix` target cell is written with `norm_pix_loss: true`; a `hog` cell, whose
    head predicts HOG, is refused (ViTMAEForPreTraining predicts pixels), pointing to timm."""
    import json

    data = tiny_suite_data(seeds=[0])
    data["pretrain"]["epochs"] = 1
    data["eval"] = {"linear_probe": {"epochs": 1}, "reconstruction": {"num_images": 16}}
    data["variants"] = [
        {"name": "normpix", "encoder": VIT, "target": "norm_pix"},
        {"name": "hog", "encoder": VIT, "target": "hog"},
    ]
    out = tmp_path / "out"
    assert invoke("run", str(write_suite(tmp_path, data)), "--out", str(out)).exit_code == 0
    cells = {p.name.split("-seed")[0]: p for p in (out / "tiny" / "cells").iterdir()}
    done = invoke("export", str(cells["normpix"]), str(tmp_path / "hf"), "--format", "hf")
    assert done.exit_code == 0, done.stderr
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["norm_pix_loss"] is True
    refused = invoke("export", str(cells["hog"]), str(tmp_path / "hf2"), "--format", "hf")
    assert refused.exit_code != 0 and "predicts hog targets" in refused.stderr
    assert "--format timm" in refused.stderr and not (tmp_path / "hf2").exists()
