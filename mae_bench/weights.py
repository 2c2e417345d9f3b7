"""Model weights: read safely (never executing code), loaded into a model, digested,
rebuilt into a stored cell's model, and exported to other libraries' layouts.

A weights source is a mae-bench cell folder (``encoder.safetensors`` and
``decoder.safetensors``), a ``.safetensors`` file, or a PyTorch ``.pth``/``.pt`` file read
with ``torch.load(weights_only=True)``: a pickle that holds anything but tensors and plain
containers is refused. The model maps foreign layouts itself
(``MaskedAutoencoder.adapt_state_dict``, e.g. the official MAE release's keys). (Training
checkpoints, which resume a run, are :mod:`mae_bench.resume`'s.)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from safetensors.torch import save as safetensors_bytes
from torch import Tensor

from mae_bench.contract import MaskedAutoencoder
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
    """The files of a set of weights (a cell folder's two, or one ``.safetensors`` or ``.pth``
    file); UserError if there are none."""
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
    if path.is_dir():
        return {
            f"{file.name.removesuffix('.safetensors')}.{k}": v
            for file in files
            for k, v in _safetensors(file).items()
        }
    if path.suffix == ".safetensors":
        return _safetensors(path)
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

    UserError if an encoder weight is missing, a key is unknown or a shape differs.
    """
    try:
        state = model.adapt_state_dict(read_state_dict(path))
    except ValueError as exc:
        raise UserError(f"{path}: {exc}") from None
    own = model.state_dict()
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
        if not source.is_file():
            raise UserError(
                f"{cell_dir}: not a finished mae-bench cell ({PRETRAIN_FILE} is missing)"
            )
        try:
            record = json.loads(source.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise UserError(f"{source}: not a mae-bench cell record ({exc})") from None
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
    else:
        model = build(image_size, channels)
    load_weights(model, cell_dir)
    return model.to(device).eval()


def export_cell(
    cell_dir: Path, out: Path, fmt: str, registry: Registry
) -> tuple[Path, dict[str, Any]]:
    """``mae-bench export``: write a finished cell's encoder weights in another library's
    layout (``fmt``, e.g. ``timm``) to ``out`` (safetensors) and the keyword arguments that
    build the matching model to ``out.json``; returns ``(out, kwargs)``."""
    model = rebuild_model(cell_dir, registry)
    try:
        weights, kwargs = model.export_state_dict(fmt)
    except ValueError as exc:
        raise UserError(f"{cell_dir}: {exc}") from None
    if out.suffix != ".safetensors":
        raise UserError(f"{out}: the exported weights are written as .safetensors")
    tensors = {k: v.detach().cpu().contiguous() for k, v in weights.items()}
    atomic_write(out, safetensors_bytes(tensors))
    atomic_write(out.with_name(out.name + ".json"), json.dumps(kwargs, indent=2) + "\n")
    return out, kwargs
