"""Hugging Face ViTMAE checkpoints (mae_bench/weights.py): a transformers folder initialises a
`vit` variant and a `vit` cell exports to one, tested against transformers itself, built from
a config (no download): with the same weights and the same masks, its loss and ours agree."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from mae_bench.errors import ConfigError, UserError
from mae_bench.suite import resolve_suite
from mae_bench.train import draw_mask, forward_loss
from mae_bench.weights import export_hf, load_weights, rebuild_model, weights_digest
from tests.conftest import cell_record, invoke, make_component, tiny_suite_data, write_suite
from tests.reference import reference_positions

transformers = pytest.importorskip("transformers", reason="transformers is in the test extra")

# a small vit and the Hugging Face config of the same model (16 x 16 RGB, 16 patches)
VIT = {"patch_size": 4, "dim": 32, "depth": 2, "heads": 2, "decoder_dim": 16, "decoder_depth": 1}
HF = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 128,
    "decoder_hidden_size": 16,
    "decoder_num_hidden_layers": 1,
    "decoder_num_attention_heads": 4,
    "decoder_intermediate_size": 64,
    "image_size": 16,
    "patch_size": 4,
    "num_channels": 3,
    "layer_norm_eps": 1e-6,
}
TOLERANCE = 1e-5


def ours(registry, seed: int = 0, **changes):
    """Our `vit` of :data:`VIT`'s size, its init drawn with ``seed``."""
    info = registry.get("encoder", "vit", "encoder")
    torch.manual_seed(seed)
    return info.cls(info.cls.Params(**{**VIT, **changes}), image_size=16, in_chans=3).eval()


def theirs(seed: int = 0, encoder_only: bool = False, **changes):
    """transformers' ``ViTMAEForPreTraining`` (``ViTMAEModel`` with ``encoder_only``) of the
    same size, every trained weight random (LayerNorms and biases too) and the fixed sin-cos
    positions as the hub's checkpoints hold them (transformers 5 leaves them at zero in a
    model built from a config)."""
    config = transformers.ViTMAEConfig(**{**HF, **changes})
    torch.manual_seed(seed)
    model_cls = transformers.ViTMAEModel if encoder_only else transformers.ViTMAEForPreTraining
    model = model_cls(config).eval()
    embeddings = model.embeddings if encoder_only else model.vit.embeddings
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param), alpha=0.1)
        positions = reference_positions(config.hidden_size, 4)
        embeddings.position_embeddings.copy_(torch.from_numpy(positions))
        if not encoder_only:
            positions = reference_positions(config.decoder_hidden_size, 4)
            model.decoder.decoder_pos_embed.copy_(torch.from_numpy(positions))
    return model


def masks_and_noise(registry, model, batch: int = 4, ratio: float = 0.75, seed: int = 0):
    """Our `random` masking's masks for a batch, drawn as training draws them, and the
    ``noise`` that makes Hugging Face's ``random_masking`` draw the same ones: it argsorts the
    noise and keeps the first ``int(L * (1 - ratio))``; ``ids_restore`` ranks each patch in
    our shuffle, so argsorting it gives our shuffle back."""
    masking = make_component(registry, "masking", "random", ratio=ratio)
    generator = torch.Generator().manual_seed(seed)
    mask = draw_mask(masking, batch, model, progress=1.0, generator=generator)
    return mask, mask.ids_restore.float()


def our_loss(registry, model, images, mask, norm_pix: bool = False) -> torch.Tensor:
    """Our training loss (``train.forward_loss``, the `mse` plugin) on a masked batch."""
    mse = make_component(registry, "loss", "mse", norm_pix=norm_pix)
    with torch.no_grad():
        loss, _ = forward_loss(model, images, mask, [(mse, 1.0)])
    return loss


def their_output(model, images, noise):
    with torch.no_grad():
        return model(pixel_values=images, noise=noise)


@pytest.mark.parametrize("norm_pix", [False, True])
def test_a_hugging_face_checkpoint_loads_with_the_same_loss(registry, tmp_path, norm_pix):
    hf = theirs(norm_pix_loss=norm_pix)
    hf.save_pretrained(tmp_path / "hf")
    model = ours(registry, seed=1)
    assert load_weights(model, tmp_path / "hf") == []  # the decoder too
    images = torch.randn(4, 3, 16, 16)
    mask, noise = masks_and_noise(registry, model)
    out = their_output(hf, images, noise)
    assert torch.equal(out.mask, mask.mask) and torch.equal(out.ids_restore, mask.ids_restore)
    with torch.no_grad():
        pred = model(images, mask).pred
    assert torch.allclose(pred, out.logits, atol=TOLERANCE)
    loss = our_loss(registry, model, images, mask, norm_pix=norm_pix)
    assert abs(loss.item() - out.loss.item()) <= TOLERANCE, (loss.item(), out.loss.item())


def _hub_layout(model) -> dict[str, torch.Tensor]:
    """transformers 4's names (as ``facebook/vit-mae-base`` stores them) of a transformers 5
    model: ``vit.encoder.layer.N.attention.attention.query``, ``decoder.decoder_layers.N``."""
    renames = [
        ("vit.layers.", "vit.encoder.layer."),
        (".attention.q_proj.", ".attention.attention.query."),
        (".attention.k_proj.", ".attention.attention.key."),
        (".attention.v_proj.", ".attention.attention.value."),
        (".attention.o_proj.", ".attention.output.dense."),
        (".mlp.fc1.", ".intermediate.dense."),
        (".mlp.fc2.", ".output.dense."),
    ]
    out = {}
    for key, value in model.state_dict().items():
        for old, new in renames:
            key = key.replace(old, new)
        out[key] = value.clone().contiguous()
    return out


def test_every_layout_of_the_same_weights_loads_the_same(registry, tmp_path):
    """What transformers saves (sharded or not), its module names as they are in memory, the
    hub's names (transformers 4), and a ``pytorch_model.bin``: the same model each time."""
    hf = theirs()
    folders = {name: tmp_path / name for name in ("saved", "sharded", "memory", "hub", "bin")}
    hf.save_pretrained(folders["saved"])
    hf.save_pretrained(folders["sharded"], max_shard_size="20KB")
    assert len(list(folders["sharded"].glob("model-*.safetensors"))) > 1
    for name in ("memory", "hub", "bin"):
        folders[name].mkdir()
        hf.config.to_json_file(folders[name] / "config.json")
    save_file({k: v.contiguous() for k, v in hf.state_dict().items()},
              str(folders["memory"] / "model.safetensors"))  # fmt: skip
    hub = _hub_layout(hf)
    assert any(".attention.attention.query." in k for k in hub)
    save_file(hub, str(folders["hub"] / "model.safetensors"))
    torch.save(hub, folders["bin"] / "pytorch_model.bin")
    reference = None
    for name, folder in folders.items():
        model = ours(registry, seed=1)
        assert load_weights(model, folder) == [], name
        state = model.state_dict()
        reference = reference or state
        assert all(torch.equal(v, reference[k]) for k, v in state.items()), name
    # the config is part of the digest a cell's key records
    digest = weights_digest(folders["hub"])
    hf.config.mask_ratio = 0.5
    hf.config.to_json_file(folders["hub"] / "config.json")
    assert weights_digest(folders["hub"]) != digest


def test_the_export_loads_in_transformers_with_every_key_and_the_same_loss(registry, tmp_path):
    model = ours(registry, seed=3)
    with torch.no_grad():  # LayerNorms and biases away from their init, as after training
        for param in model.parameters():
            param.add_(torch.randn_like(param), alpha=0.1)
    config = export_hf(model, tmp_path / "hf", mask_ratio=0.75, norm_pix_loss=True)
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == [
        "config.json",
        "model.safetensors",
    ]
    assert json.loads((tmp_path / "hf" / "config.json").read_text()) == config
    hf, info = transformers.ViTMAEForPreTraining.from_pretrained(
        tmp_path / "hf", output_loading_info=True
    )
    assert {k: list(v) for k, v in info.items()} == {
        "missing_keys": [],
        "unexpected_keys": [],
        "mismatched_keys": [],
        "error_msgs": [],
    }
    assert hf.config.layer_norm_eps == 1e-6 and hf.config.norm_pix_loss
    images = torch.randn(4, 3, 16, 16)
    mask, noise = masks_and_noise(registry, model, seed=7)
    out = their_output(hf.eval(), images, noise)
    loss = our_loss(registry, model, images, mask, norm_pix=True)
    assert abs(loss.item() - out.loss.item()) <= TOLERANCE, (loss.item(), out.loss.item())
    # the hub's names, qkv split in three; and back into a vit, the same weights
    stored = load_file(tmp_path / "hf" / "model.safetensors")
    assert "vit.encoder.layer.1.attention.attention.value.bias" in stored
    assert "decoder.decoder_layers.0.attention.attention.query.weight" in stored
    back = ours(registry, seed=4)
    assert load_weights(back, tmp_path / "hf") == []
    assert all(torch.equal(v, back.state_dict()[k]) for k, v in model.state_dict().items())


def test_an_encoder_only_checkpoint_keeps_a_fresh_decoder(registry, tmp_path):
    hf = theirs(encoder_only=True, mask_ratio=0.0)
    hf.save_pretrained(tmp_path / "encoder")
    model = ours(registry, seed=1)
    decoder_before = {k: v.clone() for k, v in model.decoder.state_dict().items()}
    missing = load_weights(model, tmp_path / "encoder")
    assert missing and all(k.startswith("decoder.") for k in missing)
    assert all(torch.equal(v, model.decoder.state_dict()[k]) for k, v in decoder_before.items())
    # every patch visible, in patch order: the same tokens as transformers' encoder
    images = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        tokens = their_output(hf, images, torch.arange(16.0).expand(3, -1)).last_hidden_state
        ids_all = torch.arange(16).expand(3, -1)
        assert torch.allclose(model.forward_encoder(images, ids_all), tokens, atol=TOLERANCE)


def test_the_hubs_layer_norm_eps_loads_and_changes_the_loss_by_a_negligible_amount(
    registry, tmp_path
):
    """The hub's configs say layer_norm_eps 1e-12; the vit's LayerNorms keep 1e-6 (the
    official MAE's): the weights load as they are, and the loss moves far less than 1e-5."""
    hf = theirs(layer_norm_eps=1e-12)
    hf.save_pretrained(tmp_path / "hf")
    model = ours(registry, seed=1)
    assert load_weights(model, tmp_path / "hf") == []
    images = torch.randn(8, 3, 16, 16)
    mask, noise = masks_and_noise(registry, model, batch=8)
    difference = our_loss(registry, model, images, mask) - their_output(hf, images, noise).loss
    assert abs(difference.item()) <= TOLERANCE


def test_a_config_without_qkv_biases_loads_as_zero_biases(registry, tmp_path):
    hf = theirs(qkv_bias=False)
    hf.save_pretrained(tmp_path / "hf")
    model = ours(registry, seed=1)
    assert load_weights(model, tmp_path / "hf") == []
    assert not model.encoder.blocks[0].attn.qkv.bias.any()
    images = torch.randn(4, 3, 16, 16)
    mask, noise = masks_and_noise(registry, model)
    loss = our_loss(registry, model, images, mask)
    assert abs(loss.item() - their_output(hf, images, noise).loss.item()) <= TOLERANCE


def _refusal(registry, folder: Path, model=None) -> str:
    """The one message loading ``folder`` gives; the model keeps its own weights."""
    model = model or ours(registry, seed=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UserError) as caught:
        load_weights(model, folder)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    return str(caught.value)


def test_a_checkpoint_that_does_not_fit_is_refused_naming_the_field(registry, tmp_path):
    folder = tmp_path / "hf"
    theirs().save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    # the same shapes with other heads: only the config can tell
    cases = {
        "num_attention_heads": (4, "num_attention_heads is 4, the model's is 2 (encoder.heads)"),
        "image_size": (32, "image_size is 32, the model's is 16 (dataset.image_size)"),
        "hidden_act": ("gelu_new", "hidden_act is 'gelu_new', the model's is 'gelu'"),
        "layer_norm_eps": (1e-5, "layer_norm_eps is 1e-05; the vit encoder's LayerNorms use 1e-06"),
        "model_type": ("vit", "model_type is 'vit', not 'vit_mae'"),
    }
    for field, (value, message) in cases.items():
        (folder / "config.json").write_text(json.dumps({**config, field: value}))
        refused = _refusal(registry, folder)
        assert refused.startswith(f"{folder}") and message in refused, refused
    (folder / "config.json").write_text(json.dumps(config))
    mlp = make_encoder(registry, "mlp", patch_size=4, dim=32, hidden=64)
    assert "fit the `vit` encoder only, not 'mlp'" in _refusal(registry, folder, mlp)
    # zero positions, as transformers 5 leaves them in a model built from a config
    weights = load_file(folder / "model.safetensors")
    weights["vit.embeddings.position_embeddings"].zero_()
    save_file(weights, str(folder / "model.safetensors"))
    refused = _refusal(registry, folder)
    assert "vit.embeddings.position_embeddings: the checkpoint's position embedding" in refused
    (folder / "model.safetensors").unlink()
    assert "a Hugging Face folder without weights" in _refusal(registry, folder)


def make_encoder(registry, name: str, **params):
    info = registry.get("encoder", name, "encoder")
    return info.cls(info.cls.Params(**params), image_size=16, in_chans=3)


class Payload:
    """A pickle that runs code when loaded: it creates a file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_a_pickled_bin_carrying_an_object_is_refused_without_running_it(registry, tmp_path):
    folder = tmp_path / "hf"
    folder.mkdir()
    hf = theirs()
    hf.config.to_json_file(folder / "config.json")
    marker = tmp_path / "code-ran"
    torch.save({**_hub_layout(hf), "extra": Payload(marker)}, folder / "pytorch_model.bin")
    assert "refused: the checkpoint holds Python objects" in _refusal(registry, folder)
    assert not marker.exists()


def _vit_only_suite(tmp_path: Path, **encoder) -> Path:
    data = tiny_suite_data()
    data["variants"] = [v for v in data["variants"] if v["name"] == "vit"]
    data["variants"][0]["encoder"].update(encoder)
    data["variants"][0]["masking"] = {"name": "random", "ratio": 0.75}
    data["variants"][0]["loss"] = [{"name": "mse", "norm_pix": True}]
    data["pretrain"]["epochs"] = 1
    data["eval"] = {"reconstruction": {"num_images": 16}}
    return write_suite(tmp_path, data)


def test_through_the_cli_a_hugging_face_folder_initialises_a_run_and_a_cell_exports_to_one(
    registry, tmp_path
):
    """The tiny suite's vit (dim 32, depth 1, heads 2, decoder 32 x 1, 4 heads) starts from a
    Hugging Face folder; its cell exports back to one that transformers loads, with our loss."""
    sizes = {"num_hidden_layers": 1, "decoder_hidden_size": 32, "decoder_intermediate_size": 128}
    theirs(**sizes).save_pretrained(tmp_path / "hf")
    suite = _vit_only_suite(tmp_path, init_from=str(tmp_path / "hf"))
    assert invoke("validate", str(suite)).exit_code == 0
    result = invoke("run", str(suite), "--out", str(tmp_path / "out"), "--device", "cpu")
    assert result.exit_code == 0, result.output
    (cell,) = (tmp_path / "out" / "tiny" / "cells").glob("vit-seed0-*")
    encoder = cell_record(cell)["config"]["variant"]["encoder"]
    assert encoder["init_from"] == str(tmp_path / "hf")
    assert encoder["init_sha256"] == weights_digest(tmp_path / "hf")

    exported = invoke("export", str(cell), str(tmp_path / "export"), "--format", "hf")
    assert exported.exit_code == 0, exported.output
    assert "ViTMAEForPreTraining.from_pretrained(" in exported.stdout
    hf = transformers.ViTMAEForPreTraining.from_pretrained(tmp_path / "export").eval()
    assert (hf.config.mask_ratio, hf.config.norm_pix_loss) == (0.75, True)
    model = rebuild_model(cell, registry)
    images = torch.randn(4, 3, 16, 16)
    mask, noise = masks_and_noise(registry, model)
    loss = our_loss(registry, model, images, mask, norm_pix=True)
    assert abs(loss.item() - their_output(hf, images, noise).loss.item()) <= TOLERANCE
    again = invoke("export", str(cell), str(tmp_path / "export"), "--format", "hf")
    assert again.exit_code == 0, again.output  # an earlier export's folder is rewritten

    (tmp_path / "export" / "notes.txt").write_text("mine")
    crowded = invoke("export", str(cell), str(tmp_path / "export"), "--format", "hf")
    assert crowded.exit_code == 2 and "holds other files (notes.txt)" in crowded.stderr


def test_export_hf_refuses_a_cell_of_another_encoder(tiny_run, tmp_path):
    result = invoke(
        "export", str(tiny_run.cells()["mlp-seed0"]), str(tmp_path / "x"), "--format", "hf"
    )
    assert result.exit_code == 2
    assert "this cell's encoder is 'mlp' (try --format timm)" in result.stderr
    assert "Traceback" not in result.output and not (tmp_path / "x").exists()


def test_a_suite_whose_vit_does_not_fit_the_folder_is_refused_naming_the_field(registry, tmp_path):
    theirs().save_pretrained(tmp_path / "hf")  # two blocks; the tiny suite's vit has one
    data = yaml.safe_load(_vit_only_suite(tmp_path, init_from=str(tmp_path / "hf")).read_text())
    with pytest.raises(ConfigError, match=r"variants\[0\]\.encoder\.init_from: .*config\.json"):
        resolve_suite(data, registry)
    result = invoke("validate", str(tmp_path / "tiny.yaml"))
    assert result.exit_code == 2
    assert "num_hidden_layers is 2, the model's is 1 (encoder.depth)" in result.stderr
