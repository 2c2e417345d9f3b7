"""Model weights: read safely (never executing code), loaded into a model, digested,
rebuilt into a stored cell's model, and exported to other libraries' layouts.

A weights source is a mae-bench cell folder (``encoder.safetensors`` and
``decoder.safetensors``), a Hugging Face ``ViTMAE`` folder (``config.json`` with
``model.safetensors`` or ``pytorch_model.bin``, sharded or not), a ``.safetensors`` file, or a
PyTorch ``.pth``/``.pt`` file; PyTorch files are read with ``torch.load(weights_only=True)``:
a pickle that holds anything but tensors and plain containers is refused. The model maps
foreign layouts itself (``MaskedAutoencoder.adapt_state_dict``, e.g. the official MAE
release's keys); Hugging Face's layout is mapped here, both ways (:func:`from_hf`,
:func:`to_hf`), as it is transformers' and not a model's. (Training checkpoints, which resume
a run, are :mod:`mae_bench.resume`'s.)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import pickle
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from safetensors.torch import save as safetensors_bytes
from torch import Tensor

from mae_bench.contract import MaskedAutoencoder, prediction_loss
from mae_bench.errors import UserError
from mae_bench.files import atomic_write, grant_umask
from mae_bench.plugins import Registry
from mae_bench.results import PRETRAIN_FILE, WEIGHT_FILES

CORE_ENCODER_KEYS = ("name", "init_from", "init_sha256")  # in a record, not the plugin's
ModelBuilder = Callable[[int, int], MaskedAutoencoder]
"""A fresh model from ``(image_size, in_chans)``, e.g. a resolved variant's ``build_model``."""


def save_weights(model: MaskedAutoencoder, folder: Path, metadata: dict[str, str]) -> None:
    """Write ``model``'s encoder and decoder as the cell folder's two safetensors files
    (:data:`WEIGHT_FILES`), each carrying ``metadata``; :func:`load_weights` reads them back.
    They get the permissions the umask allows, as every other result (safetensors creates
    its files 0600)."""
    for part, name in zip(("encoder", "decoder"), WEIGHT_FILES, strict=True):
        state = getattr(model, part).state_dict()
        tensors = {k: v.detach().cpu().clone().contiguous() for k, v in state.items()}
        save_file(tensors, str(folder / name), metadata=metadata)
        grant_umask(folder / name)


def weight_files(path: Path) -> list[Path]:
    """The files of a set of weights (a cell folder's two, a Hugging Face folder's
    ``config.json`` and weight files, or one ``.safetensors`` or ``.pth`` file); UserError if
    there are none."""
    if is_hf_folder(path):
        return [path / HF_CONFIG, *_hf_weight_files(path)]
    if path.is_dir():
        files = [path / name for name in WEIGHT_FILES if (path / name).is_file()]
        if not files or files[0].name != WEIGHT_FILES[0]:
            raise UserError(f"{path}: not a mae-bench cell folder (no {WEIGHT_FILES[0]})")
        return files
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    return [path]


def weights_digest(path: Path) -> str:
    """SHA-256 of the weight files at ``path``, so a result records exactly which weights it
    started from."""
    digest = hashlib.sha256()
    for file in weight_files(path):
        with file.open("rb") as handle:
            while chunk := handle.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()


def read_state_dict(path: Path) -> dict[str, Tensor]:
    """Every tensor of a checkpoint by name, on the CPU; UserError naming the file if it
    cannot be read safely."""
    files = weight_files(path)
    if is_hf_folder(path):
        state: dict[str, Tensor] = {}
        for file in files[1:]:
            state.update(_safetensors(file) if file.suffix == ".safetensors" else _pytorch(file))
        return state
    if path.is_dir():
        return {
            f"{file.name.removesuffix('.safetensors')}.{k}": v
            for file in files
            for k, v in _safetensors(file).items()
        }
    if path.suffix == ".safetensors":
        return _safetensors(path)
    return _pytorch(path)


def _pytorch(path: Path) -> dict[str, Tensor]:
    """A PyTorch checkpoint's state dict, read with ``weights_only=True``."""
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):  # official MAE `args`
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        reason = str(exc).strip().splitlines()[-1][:200]
        raise UserError(
            f"{path}: refused: the checkpoint holds Python objects other than tensors, and "
            f"loading it could run code ({reason}). Save its state_dict alone, or as "
            "safetensors."
        ) from None
    except (RuntimeError, OSError, EOFError) as exc:
        raise UserError(f"{path}: not a readable PyTorch checkpoint ({exc})") from None
    for key in ("model", "state_dict"):  # {"model": state_dict, ...} as official releases
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise UserError(f"{path}: expected a state dict of tensors (or {{'model': ...}})")
    return obj


def _safetensors(path: Path) -> dict[str, Tensor]:
    try:
        return load_file(path)
    except (SafetensorError, OSError) as exc:
        raise UserError(f"{path}: not a readable safetensors file ({exc})") from None


def load_weights(model: MaskedAutoencoder, path: Path) -> list[str]:
    """Load a checkpoint into ``model``; returns the decoder keys it lacked (an encoder-only
    release such as ``mae_pretrain_vit_base.pth``: the decoder keeps its fresh init).

    A Hugging Face folder's ``config.json`` is checked against the model first (one message
    naming each field that differs). A model whose head predicts a target's width keeps its
    fresh head (the checkpoint's pixel head is left out). UserError if an encoder weight is
    missing, a key is unknown or a shape differs.
    """
    try:
        state = read_state_dict(path)
        if is_hf_folder(path):
            state = from_hf(model, state, read_hf_config(path))
        state = model.adapt_state_dict(state)
    except ValueError as exc:
        raise UserError(f"{path}: {exc}") from None
    own = model.state_dict()
    if model.pred_dim != model.patch_size**2 * model.in_chans:  # a target's head: fresh
        state = {
            k: v
            for k, v in state.items()
            if not (k.startswith("decoder.") and k in own and v.shape != own[k].shape)
        }
    unexpected = sorted(set(state) - set(own))
    missing = sorted(set(own) - set(state))
    missing_encoder = [k for k in missing if not k.startswith("decoder.")]
    wrong = [
        f"{k} {tuple(v.shape)} (model: {tuple(own[k].shape)})"
        for k, v in state.items()
        if k in own and v.shape != own[k].shape
    ]
    for problem, keys in (
        ("keys this model does not have", unexpected),
        ("encoder weights missing", missing_encoder),
        ("shapes that differ", wrong),
    ):
        if keys:
            shown = ", ".join(keys[:6]) + (f" and {len(keys) - 6} more" if len(keys) > 6 else "")
            raise UserError(f"{path}: does not fit the {model.summary()} model: {problem}: {shown}")
    model.load_state_dict(state, strict=False)
    return [k for k in missing if k.startswith("decoder.")]


def read_record(cell_dir: Path) -> dict[str, Any]:
    """A finished cell's ``pretrain.json``; UserError naming the file if it is not one."""
    source = cell_dir / PRETRAIN_FILE
    if not source.is_file():
        raise UserError(f"{cell_dir}: not a finished mae-bench cell ({PRETRAIN_FILE} is missing)")
    try:
        return json.loads(source.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise UserError(f"{source}: not a mae-bench cell record ({exc})") from None


def rebuild_model(
    cell_dir: Path,
    build: ModelBuilder | Registry,
    *,
    record: dict[str, Any] | None = None,
    device: torch.device | str = "cpu",
) -> MaskedAutoencoder:
    """A finished cell's model with its stored weights, in eval mode on ``device``.

    ``build`` makes the fresh model (on the CPU, at the image size and channels of the cell's
    dataset): a resolved variant's ``build_model``, or a registry, which builds the encoder
    plugin the record names with the params it stores. ``record`` is the cell's
    ``pretrain.json`` (read from ``cell_dir`` when not given). UserError naming the file if
    the record, the encoder's params or the weights do not fit.
    """
    source = cell_dir / PRETRAIN_FILE
    if record is None:
        record = read_record(cell_dir)
    try:
        config = record["config"]
        encoder, dataset = config["variant"]["encoder"], config["dataset"]
        name, image_size, channels = encoder["name"], dataset["image_size"], dataset["channels"]
    except (KeyError, TypeError) as exc:
        raise UserError(f"{source}: not a mae-bench cell record ({exc})") from None
    if isinstance(build, Registry):
        info = build.get("encoder", name, f"{source}: variant.encoder.name")
        params = {k: v for k, v in encoder.items() if k not in CORE_ENCODER_KEYS}
        try:
            validated = info.cls.Params.model_validate(params)
        except ValidationError as exc:
            raise UserError(
                f"{source}: the encoder's parameters no longer validate: {exc}"
            ) from None
        model = info.cls(validated, image_size=image_size, in_chans=channels)
        target = config["variant"].get("target")
        if target:  # the head its cell trained: the target's width
            model.size_head(_component(build, "target", target, source))
    else:
        model = build(image_size, channels)
    load_weights(model, cell_dir)
    return model.to(device).eval()


def export_cell(
    cell_dir: Path, out: Path, fmt: str, registry: Registry
) -> tuple[Path, dict[str, Any]]:
    """``mae-bench export``: write a finished cell's weights in another library's layout.

    ``timm`` (or another format the model exports itself): the encoder as ``out``
    (safetensors) and the keyword arguments that build the matching model as ``out.json``;
    returns ``(out, kwargs)``. ``hf``: the whole model as the Hugging Face folder ``out``
    (:func:`export_hf`); returns ``(out, config)``.
    """
    if fmt == "hf":
        _check_hf_out(out)
        record = read_record(cell_dir)
        model = rebuild_model(cell_dir, registry, record=record)
        if model.name != "vit":
            raise UserError(
                f"{cell_dir}: --format hf writes a Hugging Face ViTMAEForPreTraining, the layout "
                f"of the `vit` encoder; this cell's encoder is {model.name!r} (try --format timm)"
            )
        target = record["config"]["variant"].get("target")
        space = _component(registry, "target", target).prediction_space if target else "pixels"
        if space not in ("pixels", "norm_pix"):
            raise UserError(
                f"{cell_dir}: --format hf writes a ViTMAEForPreTraining, which predicts pixels; "
                f"this cell's model predicts {space} targets (export its encoder with --format "
                "timm)"
            )
        return out, export_hf(model, out, **_pretraining_settings(record, registry))
    if out.suffix != ".safetensors":
        raise UserError(f"{out}: the exported weights are written as .safetensors")
    model = rebuild_model(cell_dir, registry)
    try:
        weights, kwargs = model.export_state_dict(fmt)
    except ValueError as exc:
        raise UserError(f"{cell_dir}: {exc}") from None
    tensors = {k: v.detach().cpu().contiguous() for k, v in weights.items()}
    atomic_write(out, safetensors_bytes(tensors))
    atomic_write(out.with_name(out.name + ".json"), json.dumps(kwargs, indent=2) + "\n")
    return out, kwargs


# ------------------------------------------------------------------ Hugging Face ViTMAE
HF_CONFIG = "config.json"
HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # transformers' preference order
HF_DEFAULTS: dict[str, Any] = {
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.0,
    "attention_probs_dropout_prob": 0.0,
    "initializer_range": 0.02,
    "layer_norm_eps": 1e-12,
    "image_size": 224,
    "patch_size": 16,
    "num_channels": 3,
    "qkv_bias": True,
    "decoder_num_attention_heads": 16,
    "decoder_hidden_size": 512,
    "decoder_num_hidden_layers": 8,
    "decoder_intermediate_size": 2048,
    "mask_ratio": 0.75,
    "norm_pix_loss": False,
}
"""``transformers.ViTMAEConfig``'s defaults: what a ``config.json`` that leaves a field out
means (transformers 4 writes only the fields that differ from them)."""
VIT_LAYER_NORM_EPS = 1e-6
"""The `vit` encoder's LayerNorm eps (the official MAE's); Hugging Face's configs say 1e-12."""

# Our keys <-> Hugging Face's, by prefix, in the layout the hub's checkpoints store
# (``facebook/vit-mae-base``: transformers 4's names, which transformers 5 still reads and saves).
_HF_NAMES = (
    ("encoder.cls_token", "vit.embeddings.cls_token"),
    ("encoder.patch_embed.proj.", "vit.embeddings.patch_embeddings.projection."),
    ("encoder.blocks.", "vit.encoder.layer."),
    ("encoder.norm.", "vit.layernorm."),
    ("decoder.mask_token", "decoder.mask_token"),
    ("decoder.embed.", "decoder.decoder_embed."),
    ("decoder.blocks.", "decoder.decoder_layers."),
    ("decoder.norm.", "decoder.decoder_norm."),
    ("decoder.pred.", "decoder.decoder_pred."),
)
# Within a block: timm's ``Block`` <-> Hugging Face's ``ViTMAELayer``; the fused ``attn.qkv``
# is Hugging Face's ``query``, ``key`` and ``value``, in that order.
_HF_BLOCK_NAMES = (
    ("norm1.", "layernorm_before."),
    ("attn.proj.", "attention.output.dense."),
    ("norm2.", "layernorm_after."),
    ("mlp.fc1.", "intermediate.dense."),
    ("mlp.fc2.", "output.dense."),
)
_HF_QKV = ("attention.attention.query.", "attention.attention.key.", "attention.attention.value.")
_HF_POSITIONS = {
    "vit.embeddings.position_embeddings": "encoder",
    "decoder.decoder_pos_embed": "decoder",
}
# Other spellings of the same weights, rewritten to the hub's before mapping: an encoder-only
# ``ViTMAEModel`` (no ``vit.``) and transformers 5's own module names.
_HF_ALIASES = (
    (re.compile(r"^(embeddings|encoder\.layer|layernorm)\."), r"vit.\1."),
    (re.compile(r"^(vit\.)?layers\."), "vit.encoder.layer."),
    (re.compile(r"^decoder\.decoder_encoder\.layer\."), "decoder.decoder_layers."),
    (re.compile(r"\.attention\.q_proj\."), ".attention.attention.query."),
    (re.compile(r"\.attention\.k_proj\."), ".attention.attention.key."),
    (re.compile(r"\.attention\.v_proj\."), ".attention.attention.value."),
    (re.compile(r"\.attention\.o_proj\."), ".attention.output.dense."),
    (re.compile(r"\.mlp\.fc1\."), ".intermediate.dense."),
    (re.compile(r"\.mlp\.fc2\."), ".output.dense."),
)
# config.json's architecture fields and where the `vit` model's value comes from
_HF_FIELDS = {
    "hidden_size": "encoder.dim",
    "num_hidden_layers": "encoder.depth",
    "num_attention_heads": "encoder.heads",
    "intermediate_size": "encoder.dim x encoder.mlp_ratio",
    "patch_size": "encoder.patch_size",
    "image_size": "dataset.image_size",
    "num_channels": "dataset.channels",
    "hidden_act": "the vit encoder's exact GELU",
    "decoder_hidden_size": "encoder.decoder_dim",
    "decoder_num_hidden_layers": "encoder.decoder_depth",
    "decoder_num_attention_heads": "encoder.decoder_heads",
    "decoder_intermediate_size": "encoder.decoder_dim x encoder.mlp_ratio",
}


def is_hf_folder(path: Path) -> bool:
    """Whether ``path`` is a Hugging Face model folder (it has a ``config.json``)."""
    return path.is_dir() and (path / HF_CONFIG).is_file()


def _hf_weight_files(folder: Path) -> list[Path]:
    """The weight files of a Hugging Face folder: ``model.safetensors`` (preferred, as
    transformers prefers it) or ``pytorch_model.bin``, or the shards their index lists."""
    for name in HF_WEIGHT_FILES:
        if (folder / name).is_file():
            return [folder / name]
        index = folder / f"{name}.index.json"
        if index.is_file():
            try:
                shards = sorted(
                    set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
                )
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
                raise UserError(f"{index}: not a readable shard index ({exc!r})") from None
            missing = [shard for shard in shards if not (folder / shard).is_file()]
            if missing:
                raise UserError(f"{index}: shards missing: {', '.join(missing)}")
            return [folder / shard for shard in shards]
    raise UserError(
        f"{folder}: a Hugging Face folder without weights (no {' or '.join(HF_WEIGHT_FILES)})"
    )


def read_hf_config(folder: Path) -> dict[str, Any]:
    """A Hugging Face ViTMAE folder's ``config.json``, every field it leaves out at
    :data:`HF_DEFAULTS`; UserError naming the file if it is not a ViTMAE config."""
    path = folder / HF_CONFIG
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as exc:
        raise UserError(f"{path}: not a readable config ({exc})") from None
    if not isinstance(config, dict):
        raise UserError(f"{path}: not a Hugging Face config (a JSON object)")
    if config.get("model_type") != "vit_mae":
        raise UserError(
            f"{path}: model_type is {config.get('model_type')!r}, not 'vit_mae': only "
            "Hugging Face ViTMAE checkpoints (ViTMAEForPreTraining, ViTMAEModel) load"
        )
    return {**HF_DEFAULTS, **config}


def hf_config(model: MaskedAutoencoder) -> dict[str, Any]:
    """The Hugging Face ``ViTMAEConfig`` fields of a `vit` model (ValueError for another)."""
    if model.name != "vit":
        raise ValueError(
            f"Hugging Face ViTMAE weights fit the `vit` encoder only, not {model.name!r}"
        )
    p = model.params
    return {
        "hidden_size": p.dim,
        "num_hidden_layers": p.depth,
        "num_attention_heads": p.heads,
        "intermediate_size": int(p.dim * p.mlp_ratio),  # timm's Mlp width
        "patch_size": p.patch_size,
        "image_size": model.image_size,
        "num_channels": model.in_chans,
        "hidden_act": "gelu",
        "decoder_hidden_size": p.decoder_dim,
        "decoder_num_hidden_layers": p.decoder_depth,
        "decoder_num_attention_heads": p.decoder_heads,
        "decoder_intermediate_size": int(p.decoder_dim * p.mlp_ratio),
        "qkv_bias": True,
        "layer_norm_eps": VIT_LAYER_NORM_EPS,
    }


def _square(value: Any) -> Any:
    """``image_size``/``patch_size`` as one side: ``[16, 16]`` is 16."""
    if isinstance(value, list | tuple) and len(value) == 2 and value[0] == value[1]:
        return value[0]
    return value


def _check_hf_config(model: MaskedAutoencoder, config: dict[str, Any], decoder: bool) -> None:
    """ValueError naming every ``config.json`` field the model differs in (the decoder's
    only when the checkpoint has one)."""
    ours = hf_config(model)
    wrong = [
        f"{field} is {_square(config[field])!r}, the model's is {ours[field]!r} ({where})"
        for field, where in _HF_FIELDS.items()
        if (decoder or not field.startswith("decoder_")) and _square(config[field]) != ours[field]
    ]
    eps = config["layer_norm_eps"]
    if not isinstance(eps, int | float) or eps > VIT_LAYER_NORM_EPS:
        wrong.append(
            f"layer_norm_eps is {eps!r}; the vit encoder's LayerNorms use "
            f"{VIT_LAYER_NORM_EPS:g} (the official MAE's), so configs at {VIT_LAYER_NORM_EPS:g} "
            "or below (transformers' default 1e-12) load"
        )
    if wrong:
        raise ValueError(
            f"{HF_CONFIG} does not fit the {model.summary()} model: " + "; ".join(wrong)
        )


def _hub_name(key: str) -> str:
    """A Hugging Face key in the hub's spelling (see ``_HF_ALIASES``)."""
    for pattern, replacement in _HF_ALIASES:
        key = pattern.sub(replacement, key)
    return key


def from_hf(
    model: MaskedAutoencoder, state: dict[str, Tensor], config: dict[str, Any]
) -> dict[str, Tensor]:
    """A Hugging Face ViTMAE state dict (``ViTMAEForPreTraining``, or ``ViTMAEModel``: the
    encoder alone) in ``model``'s keys, its ``config`` (:func:`read_hf_config`) checked
    against the model first.

    ``query``, ``key`` and ``value`` become timm's fused ``qkv`` (zero biases when the config
    says ``qkv_bias: false``); the fixed position embeddings are checked against the model's
    2D sin-cos ones (their cls row must be zero), not loaded. Keys it does not know are kept
    as they are (the loader reports them). ValueError naming the field or key that does not
    fit.

    The LayerNorms keep the vit's eps 1e-6 where a config says 1e-12 (transformers' default):
    the hub's MAE checkpoints are conversions of the official ones, trained at 1e-6, so this
    runs them as they were trained; transformers runs them at 1e-12. A LayerNorm divides by
    ``sqrt(var + eps)``: on inputs of variance ``v`` the two differ by about ``eps / (2 v)``.
    """
    hub = {_hub_name(k): v for k, v in state.items()}
    _check_hf_config(model, config, decoder=any(k.startswith("decoder.") for k in hub))
    out: dict[str, Tensor] = {}
    qkv: dict[str, dict[int, Tensor]] = {}
    for key, value in hub.items():
        if key in _HF_POSITIONS:
            _check_hf_positions(model, key, value)
            continue
        ours, part = _our_name(key)
        if part is None:
            out[ours] = value
        else:
            qkv.setdefault(ours, {})[part] = value
    for ours, parts in qkv.items():
        if len(parts) != 3:
            found = ", ".join(_HF_QKV[i].split(".")[-2] for i in sorted(parts))
            raise ValueError(
                f"{ours}: query, key and value are not all in the checkpoint (found {found})"
            )
        out[ours] = torch.cat([parts[0], parts[1], parts[2]], dim=0)
    if config["qkv_bias"] is False:  # no q/k/v biases: the same layer with zero ones
        for key in [k for k in out if k.endswith(".attn.qkv.weight")]:
            out.setdefault(key.removesuffix("weight") + "bias", out[key].new_zeros(len(out[key])))
    return out


def _our_name(key: str) -> tuple[str, int | None]:
    """Our key for a Hugging Face key in the hub's spelling, and which third of ``qkv`` it is
    (None for the others); an unknown key is returned as it is."""
    for ours, theirs in _HF_NAMES:
        if not key.startswith(theirs):
            continue
        rest = key.removeprefix(theirs)
        if not ours.endswith("blocks."):
            return ours + rest, None
        index, _, part = rest.partition(".")
        for our_part, their_part in _HF_BLOCK_NAMES:
            if part.startswith(their_part):
                return f"{ours}{index}.{our_part}{part.removeprefix(their_part)}", None
        for third, their_part in enumerate(_HF_QKV):
            if part.startswith(their_part):
                return f"{ours}{index}.attn.qkv.{part.removeprefix(their_part)}", third
    return key, None


def _check_hf_positions(model: MaskedAutoencoder, key: str, value: Tensor) -> None:
    """ValueError unless ``value`` is the model's fixed sin-cos embedding with a zero cls row."""
    ours = getattr(model, _HF_POSITIONS[key]).pos_embed[0].cpu()  # (L, D)
    theirs = value.reshape(-1, value.shape[-1]).float()
    fits = theirs.shape == (len(ours) + 1, ours.shape[1])
    if not fits or not torch.allclose(theirs[1:], ours, atol=1e-4) or theirs[0].any():
        raise ValueError(
            f"{key}: the checkpoint's position embedding {tuple(value.shape)} is not the fixed "
            f"2D sin-cos embedding of this model (a zero cls row, then {tuple(ours.shape)} "
            "patches x dim)"
        )


def to_hf(model: MaskedAutoencoder) -> dict[str, Tensor]:
    """A `vit` model's weights as Hugging Face's ``ViTMAEForPreTraining`` stores them (the
    hub's layout, which transformers 4 and 5 read): ``qkv`` split in three, the fixed
    position embeddings with a zero cls row."""
    hf_config(model)  # ValueError for a model of another layout
    out: dict[str, Tensor] = {}
    for key, value in model.state_dict().items():
        value = value.detach().cpu()
        ours, theirs = next((o, t) for o, t in _HF_NAMES if key.startswith(o))
        rest = key.removeprefix(ours)
        if not ours.endswith("blocks."):
            out[theirs + rest] = value
            continue
        index, _, part = rest.partition(".")
        if part.startswith("attn.qkv."):
            suffix = part.removeprefix("attn.qkv.")
            for their_part, third in zip(_HF_QKV, value.chunk(3, dim=0), strict=True):
                out[f"{theirs}{index}.{their_part}{suffix}"] = third
            continue
        our_part, their_part = next((o, t) for o, t in _HF_BLOCK_NAMES if part.startswith(o))
        out[f"{theirs}{index}.{their_part}{part.removeprefix(our_part)}"] = value
    for key, part in _HF_POSITIONS.items():
        positions = getattr(model, part).pos_embed.detach().cpu()  # (1, L, D)
        out[key] = torch.cat([positions.new_zeros(1, 1, positions.shape[-1]), positions], dim=1)
    return {k: v.contiguous() for k, v in out.items()}


def _check_hf_out(out: Path) -> None:
    """UserError unless ``out`` can become the export's folder: new, empty, or holding only
    an earlier export's two files."""
    ours = {HF_CONFIG, HF_WEIGHT_FILES[0]}
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: --format hf writes a folder (config.json, model.safetensors)")
    if out.is_dir():
        others = sorted(p.name for p in out.iterdir() if p.name not in ours)
        if others:
            raise UserError(
                f"{out}: the folder holds other files ({', '.join(others[:3])}); export into a "
                "new or empty folder"
            )


def export_hf(
    model: MaskedAutoencoder, out: Path, *, mask_ratio: float = 0.75, norm_pix_loss: bool = False
) -> dict[str, Any]:
    """Write a `vit` model as a Hugging Face ``ViTMAEForPreTraining`` folder ``out``
    (``config.json`` + ``model.safetensors``) that
    ``transformers.ViTMAEForPreTraining.from_pretrained(out)`` loads with every key used;
    returns the config. ``mask_ratio`` and ``norm_pix_loss`` describe the pretraining (Hugging
    Face's own forward masks and computes its loss with them); LayerNorm eps is the vit's 1e-6.
    """
    _check_hf_out(out)
    try:
        weights = to_hf(model)
        config = {
            "architectures": ["ViTMAEForPreTraining"],
            "model_type": "vit_mae",
            **HF_DEFAULTS,
            **hf_config(model),
            "mask_ratio": mask_ratio,
            "norm_pix_loss": norm_pix_loss,
        }
    except ValueError as exc:
        raise UserError(str(exc)) from None
    atomic_write(out / HF_WEIGHT_FILES[0], safetensors_bytes(weights, metadata={"format": "pt"}))
    atomic_write(out / HF_CONFIG, json.dumps(config, indent=2) + "\n")
    return config


def _pretraining_settings(record: dict[str, Any], registry: Registry) -> dict[str, Any]:
    """A cell's Hugging Face ``mask_ratio`` (its masking's ratio at the end of pretraining)
    and ``norm_pix_loss`` (whether its losses predict normalized pixels); the fields it cannot
    rebuild keep Hugging Face's defaults."""
    settings: dict[str, Any] = {}
    try:
        variant = record["config"]["variant"]
        masking = _component(registry, "masking", variant["masking"])
        ratio = float(masking.ratio_at(1.0))
        if math.isfinite(ratio) and 0 < ratio < 1:
            settings["mask_ratio"] = ratio
        losses = [_component(registry, "loss", term) for term in variant["loss"]]
        reader = prediction_loss(losses)
        target = variant.get("target")
        space = (
            _component(registry, "target", target).prediction_space
            if target
            else (reader.prediction_space if reader is not None else "pixels")
        )
        settings["norm_pix_loss"] = space == "norm_pix"
    except (KeyError, TypeError, ValueError, UserError, ValidationError):
        pass
    return settings


def _component(
    registry: Registry, kind: str, config: dict[str, Any], source: Path | None = None
) -> Any:
    """The ``kind`` component a cell record (``source``) describes (its name and params);
    UserError naming the record if its params no longer validate."""
    where = f"{source}: " if source is not None else ""
    info = registry.get(kind, config["name"], f"{where}variant.{kind}.name")
    params = {k: v for k, v in config.items() if k not in ("name", "weight")}
    try:
        return info.cls(info.cls.Params.model_validate(params))
    except ValidationError as exc:
        raise UserError(f"{where}the {kind}'s parameters no longer validate: {exc}") from None
