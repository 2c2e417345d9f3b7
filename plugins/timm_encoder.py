"""Any timm Vision Transformer, by model name, as the encoder of a masked autoencoder."""

from __future__ import annotations

from typing import Any

import timm
import torch
from pydantic import Field, PositiveFloat, PositiveInt
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from mae_bench import MaskedAutoencoder, Params, hookimpl
from mae_bench.layers import MAEDecoder, gather_tokens, sincos_pos_embed


class TimmParams(Params):
    """A timm ViT model name, extra ``create_model`` arguments and the MAE decoder size."""

    model: str = "vit_tiny_patch16_224"
    model_args: dict[str, Any] = Field(default_factory=dict)
    sincos_pos_embed: bool = True
    decoder_dim: PositiveInt = 128
    decoder_depth: PositiveInt = 2
    decoder_heads: PositiveInt = 4
    decoder_mlp_ratio: PositiveFloat = 4.0


class TimmMAE(MaskedAutoencoder):
    """A timm VisionTransformer (random init, no download) as the MAE encoder."""

    name = "timm"
    Params = TimmParams

    def __init__(self, params: TimmParams, *, image_size: int, in_chans: int) -> None:
        super().__init__(params, image_size=image_size, in_chans=in_chans)
        if not timm.is_model(params.model):
            raise ValueError(f"unknown timm model {params.model!r}")
        try:
            vit = timm.create_model(
                params.model,
                pretrained=False,
                img_size=image_size,
                in_chans=in_chans,
                num_classes=0,
                **params.model_args,
            )
        except (TypeError, AssertionError, RuntimeError) as exc:
            raise ValueError(f"timm could not build {params.model!r} as a ViT: {exc}") from None
        if not isinstance(vit, VisionTransformer):
            raise ValueError(f"{params.model!r} is a {type(vit).__name__}, not a VisionTransformer")
        self.patch_size = vit.patch_embed.patch_size[0]
        self.check_patch_size(self.patch_size)
        self.embed_dim = vit.embed_dim
        self.num_prefix_tokens = vit.num_prefix_tokens
        if params.sincos_pos_embed and vit.pos_embed is not None:
            # MAE uses fixed 2D sin-cos positions: overwrite timm's learned ones and freeze them.
            patches = sincos_pos_embed(vit.embed_dim, self.grid_size)
            pos = vit.pos_embed.data
            pos[0, pos.shape[1] - patches.shape[0] :] = patches
            pos[0, : pos.shape[1] - patches.shape[0]] = 0
            vit.pos_embed.requires_grad_(False)
        vit.head = nn.Identity()
        # timm's pooling head (fc_norm with global_pool avg, attn_pool with map) is never
        # applied by forward_encoder: frozen, it keeps its initial weights (exported as timm
        # expects) and gets no gradient data-parallel training would wait for
        for name in ("fc_norm", "attn_pool"):
            unused = getattr(vit, name, None)
            if unused is not None:
                unused.requires_grad_(False)
        self.encoder = vit
        self.decoder = MAEDecoder(
            num_patches=self.num_patches,
            embed_dim=vit.embed_dim,
            patch_size=self.patch_size,
            in_chans=in_chans,
            dim=params.decoder_dim,
            depth=params.decoder_depth,
            heads=params.decoder_heads,
            mlp_ratio=params.decoder_mlp_ratio,
            num_prefix_tokens=vit.num_prefix_tokens,
        )

    def forward_encoder(self, imgs: Tensor, ids_keep: Tensor) -> Tensor:
        vit = self.encoder
        x = vit._pos_embed(vit.patch_embed(imgs))  # prefix tokens + positioned patches
        n = self.num_prefix_tokens
        x = torch.cat([x[:, :n], gather_tokens(x[:, n:], ids_keep)], dim=1)
        x = vit.norm_pre(x)
        x = vit.blocks(x)
        return vit.norm(x)

    def summary(self) -> str:
        return f"timm({self.params.model})"

    def drop_final_norm(self) -> bool:
        """The timm ViT without its final ``norm`` (for the official global-pool head);
        False where it has none (e.g. built with ``global_pool: avg``, whose ``fc_norm``
        ``forward_encoder`` does not apply)."""
        if isinstance(self.encoder.norm, nn.Identity):
            return False
        self.encoder.norm = nn.Identity()
        return True

    def export_state_dict(self, fmt: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """``timm``: the encoder is a timm model already; its weights as they are."""
        if fmt != "timm":
            return super().export_state_dict(fmt)
        vit = self.encoder
        weights = {k: v.detach().cpu() for k, v in vit.state_dict().items()}
        kwargs = {
            "model_name": self.params.model,
            "img_size": self.image_size,
            "in_chans": self.in_chans,
            "num_classes": 0,
            **self.params.model_args,
        }
        return weights, kwargs


@hookimpl
def register_encoders(register):
    register(TimmMAE)
