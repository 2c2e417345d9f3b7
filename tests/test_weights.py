"""Weights (mae_bench/weights.py): official MAE checkpoints load into `vit`, encoders export
to timm, and loading a checkpoint never runs code from it."""

import json
from pathlib import Path

import pytest
import timm
import torch
import yaml

from mae_bench.data import ImageFeeder
from mae_bench.errors import ConfigError, UserError
from mae_bench.evaluate import extract_features
from mae_bench.plan import suite_cells
from mae_bench.suite import resolve_suite
from mae_bench.weights import load_weights, read_state_dict, rebuild_model
from tests.conftest import cell_record, invoke, tiny_suite_data, write_suite
from tests.reference import official_layout

VIT = {"patch_size": 4, "dim": 32, "depth": 2, "heads": 2, "decoder_dim": 16, "decoder_depth": 1}


def _vit(registry, seed=0, **changes):
    info = registry.get("encoder", "vit", "encoder")
    torch.manual_seed(seed)
    return info.cls(info.cls.Params(**{**VIT, **changes}), image_size=16, in_chans=3)


def test_official_checkpoint_loads_into_vit(registry, tmp_path):
    source, target = _vit(registry, seed=0), _vit(registry, seed=1)
    path = tmp_path / "mae_pretrain.pth"
    torch.save({"model": official_layout(source), "epoch": 399}, path)
    assert load_weights(target, path) == []
    for (name, a), b in zip(source.state_dict().items(), target.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(source.forward_features(x, "cls"), target.forward_features(x, "cls"))


def test_encoder_only_release_keeps_a_fresh_decoder(registry, tmp_path):
    source, target = _vit(registry, seed=0), _vit(registry, seed=1)
    decoder_before = {k: v.clone() for k, v in target.decoder.state_dict().items()}
    path = tmp_path / "encoder_only.pth"
    torch.save({"model": official_layout(source, with_decoder=False)}, path)
    missing = load_weights(target, path)
    assert missing and all(k.startswith("decoder.") for k in missing)
    assert torch.equal(target.encoder.cls_token, source.encoder.cls_token)
    assert all(torch.equal(v, target.decoder.state_dict()[k]) for k, v in decoder_before.items())


def test_checkpoints_that_do_not_fit_are_refused(registry, tmp_path):
    model = _vit(registry)
    state = official_layout(model)
    # positions in another channel order (sin y, sin x, cos y, cos x): not the official ones
    d = model.embed_dim
    swapped = state["pos_embed"].clone()
    q = d // 4
    swapped[0, 1:] = torch.cat(
        [state["pos_embed"][0, 1:, i * q : (i + 1) * q] for i in (2, 0, 3, 1)], dim=1
    )
    assert not torch.equal(swapped, state["pos_embed"])  # the same values, in another order
    intact = tmp_path / "intact.pth"
    torch.save(state, intact)
    assert load_weights(_vit(registry, seed=1), intact) == []  # each refusal is the damage's
    cases = {
        "pos_embed": ({**state, "pos_embed": swapped}, "position embedding"),
        "missing": ({k: v for k, v in state.items() if k != "norm.weight"}, "encoder.norm.weight"),
        "unknown": ({**state, "head.weight": torch.zeros(10, d)}, "head.weight"),
        "shape": (
            {k: v for k, v in official_layout(_vit(registry, dim=64)).items() if "pos" not in k},
            "shapes that differ",
        ),
    }
    for name, (bad, message) in cases.items():
        path = tmp_path / f"{name}.pth"
        torch.save(bad, path)
        target = _vit(registry, seed=1)
        before = {k: v.clone() for k, v in target.state_dict().items()}
        with pytest.raises(UserError, match=message):
            load_weights(target, path)
        # refused before anything is copied: the model keeps its own weights
        assert all(torch.equal(v, target.state_dict()[k]) for k, v in before.items()), name


class Payload:
    """A pickle that runs code when loaded: it creates a file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_a_pickle_carrying_an_object_is_refused_without_running_it(registry, tmp_path):
    marker = tmp_path / "code-ran"
    path = tmp_path / "evil.pth"
    torch.save({"model": official_layout(_vit(registry)), "extra": Payload(marker)}, path)
    with pytest.raises(UserError, match="refused: the checkpoint holds Python objects"):
        read_state_dict(path)
    data = tiny_suite_data()
    data["variants"][1]["encoder"] = {**data["variants"][1]["encoder"], "init_from": str(path)}
    suite = tmp_path / "s.yaml"
    suite.write_text(yaml.safe_dump(data))
    result = invoke("validate", str(suite))
    assert result.exit_code == 2
    assert result.stderr.startswith(f"error: {suite}: variants[1].encoder.init_from: {path}")
    assert not marker.exists()


def test_suite_init_from_is_validated_and_recorded(registry, tmp_path):
    data = tiny_suite_data()
    enc = data["variants"][1]["encoder"]
    path = tmp_path / "w.pth"
    info = registry.get("encoder", "vit", "encoder")
    params = {k: v for k, v in enc.items() if k != "name"}
    model = info.cls(info.cls.Params(**params), image_size=16, in_chans=3)
    torch.save({"model": official_layout(model)}, path)
    data["variants"][1]["encoder"] = {**enc, "init_from": str(path)}
    suite = resolve_suite(data, registry)
    config = suite_cells(suite)[1].config["variant"]["encoder"]
    assert config["init_from"] == str(path) and len(config["init_sha256"]) == 64
    data["eval"] = {"baselines": True}
    baseline = suite_cells(resolve_suite(data, registry))[-1]
    assert baseline.variant.baseline and "init_from" not in baseline.config["variant"]["encoder"]
    data["variants"][0]["encoder"] = {**data["variants"][0]["encoder"], "init_from": str(path)}
    with pytest.raises(ConfigError, match=r"variants\[0\]\.encoder\.init_from: .*does not fit"):
        resolve_suite(data, registry)
    data["variants"][0]["encoder"]["init_from"] = str(tmp_path / "nope.pth")
    with pytest.raises(ConfigError, match="checkpoint not found"):
        resolve_suite(data, registry)


@pytest.fixture
def vit_cell(tiny_run):
    """The vit cell (seed 0) of the shared tiny run (read-only)."""
    return tiny_run.cells()["vit-seed0"]


def test_exported_encoder_loads_in_timm_with_strict_keys_and_same_features(
    vit_cell, registry, tmp_path
):
    out = tmp_path / "encoder.safetensors"
    result = invoke("export", str(vit_cell), str(out), "--format", "timm")
    assert result.exit_code == 0, result.output
    assert "timm.create_model(" in result.stdout
    kwargs = json.loads(Path(f"{out}.json").read_text())
    name = kwargs.pop("model_name")
    vit = timm.create_model(
        name, pretrained=True, pretrained_cfg_overlay={"file": str(out)}, **kwargs
    ).eval()
    ours = rebuild_model(vit_cell, registry)
    record = cell_record(vit_cell)
    feeder = ImageFeeder(16, 3, tuple(record["data"]["mean"]), tuple(record["data"]["std"]),
                         torch.device("cpu"))  # fmt: skip
    images = (torch.rand(6, 3, 16, 16) * 255).to(torch.uint8)
    with torch.no_grad():
        tokens = vit.forward_features(feeder(images))
    for pool, theirs in (("cls", tokens[:, 0]), ("mean", tokens[:, 1:].mean(dim=1))):
        assert torch.allclose(extract_features(ours, images, feeder, pool), theirs, atol=1e-5)
    # strict: every key of the file is used and every weight of the model is in the file
    from safetensors.torch import load_file

    assert set(load_file(out)) == set(vit.state_dict())


def test_a_cell_of_ours_initialises_another_suite(vit_cell, tmp_path):
    data = tiny_suite_data()
    data["variants"] = [v for v in data["variants"] if v["name"] == "vit"]
    result = invoke(
        "run", str(write_suite(tmp_path, data)), "--out", str(tmp_path),
        "--set", f"variants.vit.encoder.init_from={vit_cell}", "--set", "pretrain.epochs=1",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    (cell,) = (tmp_path / "tiny" / "cells").glob("vit-seed0-*")
    encoder = cell_record(cell)["config"]["variant"]["encoder"]
    assert encoder["init_from"] == str(vit_cell) and len(encoder["init_sha256"]) == 64
    not_a_cell = invoke("export", str(tmp_path / "tiny"), str(tmp_path / "x.safetensors"))
    assert not_a_cell.exit_code == 2 and "not a finished mae-bench cell" in not_a_cell.stderr


def test_timm_encoder_exports_its_own_weights(registry, tmp_path):
    from safetensors.torch import save_file

    info = registry.get("encoder", "timm", "encoder")
    params = info.cls.Params(model="vit_tiny_patch16_224", model_args={"patch_size": 4, "depth": 2})
    model = info.cls(params, image_size=16, in_chans=3).eval()
    weights, kwargs = model.export_state_dict("timm")
    path = tmp_path / "timm.safetensors"
    save_file({k: v.contiguous() for k, v in weights.items()}, str(path))
    vit = timm.create_model(
        kwargs.pop("model_name"), pretrained=True, pretrained_cfg_overlay={"file": str(path)},
        **kwargs,
    ).eval()  # fmt: skip
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(vit.forward_features(x)[:, 0], model.forward_features(x, "cls"))
    with pytest.raises(ValueError, match="cannot be exported to 'onnx'"):
        model.export_state_dict("onnx")
