"""Reference implementations written out for the tests, independent of the code under test:
the official MAE's fixed positions and the layout its released checkpoints store."""

from __future__ import annotations

import numpy as np
import torch


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
