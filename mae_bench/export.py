"""``mae-bench export``: a finished cell's encoder in another library's layout (timm)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from safetensors.torch import save_file

from mae_bench.checkpoints import load_weights
from mae_bench.contract import MaskedAutoencoder
from mae_bench.errors import UserError
from mae_bench.plugins import Registry
from mae_bench.results import PRETRAIN_FILE, atomic_write_text

CORE_ENCODER_KEYS = ("name", "init_from", "init_sha256")


def load_cell_model(cell_dir: Path, registry: Registry) -> MaskedAutoencoder:
    """Rebuild a finished cell's model from its ``result.json`` and stored weights (CPU)."""
    result = cell_dir / PRETRAIN_FILE
    if not result.is_file():
        raise UserError(f"{cell_dir}: not a finished mae-bench cell ({PRETRAIN_FILE} is missing)")
    try:
        config = json.loads(result.read_text(encoding="utf-8"))["config"]
        encoder, dataset = config["variant"]["encoder"], config["dataset"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise UserError(f"{result}: not a mae-bench cell record ({exc})") from None
    info = registry.get("encoder", encoder["name"], f"{result}: variant.encoder.name")
    params = {k: v for k, v in encoder.items() if k not in CORE_ENCODER_KEYS}
    try:
        validated = info.cls.Params.model_validate(params)
    except ValidationError as exc:
        raise UserError(f"{result}: the encoder's parameters no longer validate: {exc}") from None
    model = info.cls(validated, image_size=dataset["image_size"], in_chans=dataset["channels"])
    load_weights(model, cell_dir)
    return model.eval()


def export_cell(
    cell_dir: Path, out: Path, fmt: str, registry: Registry
) -> tuple[Path, dict[str, Any]]:
    """Write the cell's encoder weights to ``out`` (safetensors) and the keyword arguments
    that build the matching model to ``out.json``; returns ``(out, kwargs)``."""
    model = load_cell_model(cell_dir, registry)
    try:
        weights, kwargs = model.export_state_dict(fmt)
    except ValueError as exc:
        raise UserError(f"{cell_dir}: {exc}") from None
    if out.suffix != ".safetensors":
        raise UserError(f"{out}: the exported weights are written as .safetensors")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in weights.items()}, str(tmp))
    tmp.replace(out)
    atomic_write_text(out.with_name(out.name + ".json"), json.dumps(kwargs, indent=2) + "\n")
    return out, kwargs
