"""Parity with the references: official MAE checkpoints load into `vit`, encoders export to
timm, and loading a checkpoint never runs code from it."""

import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import yaml

from mae_bench.data import ImageFeeder
from mae_bench.errors import ConfigError, UserError
from mae_bench.evaluate import extract_features
from mae_bench.layers import sincos_pos_embed
from mae_bench.plan import suite_cells
from mae_bench.suite import resolve_suite
from mae_bench.weights import load_weights, read_state_dict, rebuild_model
from tests.conftest import ROOT, cell_record, invoke, tiny_suite_data

VIT = {"patch_size": 4, "dim": 32, "depth": 2, "heads": 2, "decoder_dim": 16, "decoder_depth": 1}


def _vit(registry, seed=0, **changes):
    info = registry.get("encoder", "vit", "encoder")
    torch.manual_seed(seed)
    return info.cls(info.cls.Params(**{**VIT, **changes}), image_size=16, in_chans=3)


def reference_positions(dim: int, grid: int) -> np.ndarray:
    """The MAE paper's fixed 2D sin-cos positions, written out in numpy for this test: per
    patch (row y, column x), [sin(x w), cos(x w), sin(y w), cos(y w)], w_k = 10000^(-k/(dim/4)),
    with a zero row in front for the cls token."""
    w = 1.0 / 10000 ** (np.arange(dim // 4) / (dim / 4))
    rows = []
    for y in range(grid):
        for x in range(grid):
            angles = [np.sin(x * w), np.cos(x * w), np.sin(y * w), np.cos(y * w)]
            rows.append(np.concatenate(angles))
    return np.concatenate([np.zeros((1, dim)), np.array(rows)])[None].astype(np.float32)


def official_layout(model, with_decoder: bool = True) -> dict[str, torch.Tensor]:
    """Our weights under the official `models_mae.py` names (as its releases store them)."""
    renames = {"embed.": "decoder_embed.", "blocks.": "decoder_blocks.", "norm.": "decoder_norm."}
    renames |= {"pred.": "decoder_pred.", "mask_token": "mask_token"}
    out = {}
    for key, value in model.state_dict().items():
        if key.startswith("encoder."):
            out[key.removeprefix("encoder.")] = value.clone()
        elif with_decoder:
            rest = key.removeprefix("decoder.")
            prefix = next(p for p in renames if rest.startswith(p))
            out[renames[prefix] + rest.removeprefix(prefix)] = value.clone()
    grid = model.grid_size
    out["pos_embed"] = torch.from_numpy(reference_positions(model.embed_dim, grid))
    if with_decoder:
        decoder_dim = model.decoder.pos_embed.shape[-1]
        out["decoder_pos_embed"] = torch.from_numpy(reference_positions(decoder_dim, grid))
    return out


def test_sincos_positions_follow_the_official_channel_order():
    ours = sincos_pos_embed(8, 2)
    assert torch.allclose(ours, torch.from_numpy(reference_positions(8, 2)[0, 1:]), atol=1e-7)
    # patch 1 is row 0, column 1: the first half of the channels encodes the column
    assert ours[1, 0] == pytest.approx(np.sin(1.0)) and ours[1, 4] == 0.0
    assert ours[2, 0] == 0.0 and ours[2, 4] == pytest.approx(np.sin(1.0))


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
    d, g = model.embed_dim, model.grid_size
    swapped = state["pos_embed"].clone()
    q = d // 4
    swapped[0, 1:] = torch.cat(
        [state["pos_embed"][0, 1:, i * q : (i + 1) * q] for i in (2, 0, 3, 1)], dim=1
    )
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
        with pytest.raises(UserError, match=message):
            load_weights(_vit(registry), path)
    assert g == 4


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


@pytest.fixture(scope="module")
def vit_cell(tmp_path_factory):
    out = tmp_path_factory.mktemp("export")
    result = invoke("run", str(ROOT / "suites" / "tiny.yaml"), "--out", str(out))
    assert result.exit_code == 0, result.output
    (cell,) = (out / "tiny" / "cells").glob("vit-seed0-*")
    return cell


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
    result = invoke(
        "run", str(ROOT / "suites" / "tiny.yaml"), "--out", str(tmp_path),
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
