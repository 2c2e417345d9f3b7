"""The MLP patch-autoencoder baseline: no attention, no convolution."""

from __future__ import annotations

import itertools

import torch
from pydantic import PositiveInt, field_validator
from torch import Tensor, nn

from mae_bench import MaskedAutoencoder, Params, hookimpl
from mae_bench.layers import gather_tokens, init_mae_weights, patchify, sincos_pos_embed


class MLPParams(Params):
    """Per-patch encoder MLP sizes and the decoder MLP's hidden width."""

    patch_size: PositiveInt = 4
    dim: PositiveInt = 64
    hidden: PositiveInt = 256
    layers: PositiveInt = 2
    decoder_hidden: PositiveInt = 512

    @field_validator("dim")
    @classmethod
    def _dim_multiple_of_4(cls, dim: int) -> int:
        if dim % 4:
            raise ValueError("must be divisible by 4 (2D sin-cos positions)")
        return dim


def _mlp(sizes: list[int]) -> nn.Sequential:
    """Linear layers with ReLU between them (none after the last)."""
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(itertools.pairwise(sizes)):
        layers.append(nn.Linear(n_in, n_out))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class MLPEncoder(nn.Module):
    """Encodes each visible patch on its own: linear + ReLU layers, plus its position."""

    def __init__(self, p: MLPParams, patch_dim: int, grid: int) -> None:
        super().__init__()
        self.patch_size = p.patch_size
        self.mlp = _mlp([patch_dim] + [p.hidden] * (p.layers - 1) + [p.dim])
        self.register_buffer("pos_embed", sincos_pos_embed(p.dim, grid)[None], persistent=False)

    def forward(self, imgs: Tensor, ids_keep: Tensor) -> Tensor:
        """(B, C, H, W), (B, K) -> (B, K, D)."""
        patches = gather_tokens(patchify(imgs, self.patch_size), ids_keep)
        return self.mlp(patches) + gather_tokens(self.pos_embed.expand(len(imgs), -1, -1), ids_keep)


class MLPDecoder(nn.Module):
    """Fills masked slots with a learned mask token and maps the whole grid through an MLP."""

    def __init__(self, p: MLPParams, patch_dim: int, num_patches: int) -> None:
        super().__init__()
        self.mask_token = nn.Parameter(torch.zeros(1, 1, p.dim))
        sizes = [num_patches * p.dim, p.decoder_hidden, p.decoder_hidden, num_patches * patch_dim]
        self.mlp = _mlp(sizes)
        self.patch_dim = patch_dim

    def no_weight_decay(self) -> set[str]:
        """Parameters trained without weight decay (timm's convention)."""
        return {"mask_token"}

    def forward(self, latent: Tensor, ids_restore: Tensor) -> Tensor:
        b, k, d = latent.shape
        mask_tokens = self.mask_token.expand(b, ids_restore.shape[1] - k, d)
        x = gather_tokens(torch.cat([latent, mask_tokens], dim=1), ids_restore)
        return self.mlp(x.flatten(1)).view(b, -1, self.patch_dim)


class MLPMAE(MaskedAutoencoder):
    """MLP patch autoencoder baseline: per-patch MLP encoder, whole-grid MLP decoder."""

    name = "mlp"
    Params = MLPParams
    num_prefix_tokens = 0

    def __init__(self, params: MLPParams, *, image_size: int, in_chans: int) -> None:
        super().__init__(params, image_size=image_size, in_chans=in_chans)
        self.check_patch_size(params.patch_size)
        self.patch_size = params.patch_size
        self.embed_dim = params.dim
        patch_dim = params.patch_size**2 * in_chans
        self.encoder = MLPEncoder(params, patch_dim, self.grid_size)
        self.decoder = MLPDecoder(params, patch_dim, self.num_patches)
        self.apply(init_mae_weights)
        nn.init.normal_(self.decoder.mask_token, std=0.02)

    def summary(self) -> str:
        p = self.params
        return f"mlp(p{p.patch_size},d{p.dim})"

    def drop_final_norm(self) -> bool:
        """Nothing to drop: the per-patch MLP has no final norm."""
        return False

    def reset_head(self, dim: int) -> None:
        """Predict ``dim`` values per patch (a target's width): the decoder's last layer,
        which maps the grid to every patch's prediction, is replaced and freshly initialised."""
        last = self.decoder.mlp[-1]
        new = nn.Linear(last.in_features, self.num_patches * dim).to(last.weight.device)
        init_mae_weights(new)
        self.decoder.mlp[-1] = new
        self.decoder.patch_dim = dim
        self._pred_dim = dim


@hookimpl
def register_encoders(register):
    register(MLPMAE)
