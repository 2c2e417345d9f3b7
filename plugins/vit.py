"""The MAE ViT (He et al. 2021): encoder on visible patches only, light decoder, mask tokens."""

from __future__ import annotations

import torch
from pydantic import PositiveFloat, PositiveInt, model_validator
from timm.layers import PatchEmbed
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from mae_bench import MaskedAutoencoder, Params, hookimpl
from mae_bench.layers import MAEDecoder, gather_tokens, init_mae_weights, sincos_pos_embed


class ViTParams(Params):
    """Encoder and decoder sizes (the decoder is the MAE's lightweight one)."""

    patch_size: PositiveInt = 4
    dim: PositiveInt = 128
    depth: PositiveInt = 4
    heads: PositiveInt = 4
    mlp_ratio: PositiveFloat = 4.0
    decoder_dim: PositiveInt = 64
    decoder_depth: PositiveInt = 2
    decoder_heads: PositiveInt = 4

    @model_validator(mode="after")
    def _heads_divide_dims(self) -> ViTParams:
        for dim, heads in (("dim", "heads"), ("decoder_dim", "decoder_heads")):
            if getattr(self, dim) % getattr(self, heads):
                raise ValueError(f"{dim} must be divisible by {heads}")
            if getattr(self, dim) % 4:
                raise ValueError(f"{dim} must be divisible by 4 (2D sin-cos positions)")
        return self


class ViTEncoder(nn.Module):
    """Patch embedding, fixed 2D sin-cos positions, a cls token and timm ``Block``s."""

    def __init__(self, p: ViTParams, image_size: int, in_chans: int) -> None:
        super().__init__()
        self.patch_embed = PatchEmbed(image_size, p.patch_size, in_chans, p.dim)
        grid = image_size // p.patch_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, p.dim))
        self.register_buffer("pos_embed", sincos_pos_embed(p.dim, grid)[None], persistent=False)
        self.blocks = nn.Sequential(
            *[
                Block(p.dim, p.heads, p.mlp_ratio, qkv_bias=True, norm_layer=nn.LayerNorm)
                for _ in range(p.depth)
            ]
        )
        self.norm = nn.LayerNorm(p.dim, eps=1e-6)
        self.apply(init_mae_weights)
        w = self.patch_embed.proj.weight.data  # init the patch projection like a linear layer
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(self.cls_token, std=0.02)

    def forward(self, imgs: Tensor, ids_keep: Tensor) -> Tensor:
        """(B, C, H, W), (B, K) -> (B, 1 + K, D)."""
        x = gather_tokens(self.patch_embed(imgs) + self.pos_embed, ids_keep)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        return self.norm(self.blocks(x))


class ViTMAE(MaskedAutoencoder):
    """MAE ViT: the encoder runs on the visible patches only, a light decoder fills the rest."""

    name = "vit"
    Params = ViTParams
    num_prefix_tokens = 1

    def __init__(self, params: ViTParams, *, image_size: int, in_chans: int) -> None:
        super().__init__(params, image_size=image_size, in_chans=in_chans)
        self.check_patch_size(params.patch_size)
        self.patch_size = params.patch_size
        self.embed_dim = params.dim
        self.encoder = ViTEncoder(params, image_size, in_chans)
        self.decoder = MAEDecoder(
            num_patches=self.num_patches,
            embed_dim=params.dim,
            patch_size=params.patch_size,
            in_chans=in_chans,
            dim=params.decoder_dim,
            depth=params.decoder_depth,
            heads=params.decoder_heads,
            mlp_ratio=params.mlp_ratio,
            num_prefix_tokens=1,
        )

    def summary(self) -> str:
        p = self.params
        return f"vit(p{p.patch_size},d{p.dim}x{p.depth})"


@hookimpl
def register_encoders(register):
    register(ViTMAE)
