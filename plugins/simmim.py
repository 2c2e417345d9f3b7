"""SimMIM (Xie et al. 2022): the encoder sees every patch, masked ones as a learned mask token,
and a one-layer linear head predicts their pixels.

One pretraining step, in the notation of ``plugins/vit.py`` (B images, L patches, width D):

1. patch_embed: (B, C, H, W) -> (B, L, D).
2. mask tokens: where ``mask.mask`` is 1 the embedding is replaced by the learned
   ``mask_token`` (the official ``x * (1 - w) + mask_token * w``), before positions are added,
   as SimMIM's ``VisionTransformerForSimMIM.forward``.
3. fixed 2D sin-cos positions (the cls token gets none, as in the built-in ``vit``), the cls
   token in front -> (B, 1 + L, D); timm ``Block``s; norm -> latent (B, 1 + L, D).
4. head: one linear layer on each patch token (the cls token dropped) -> pred (B, L, p*p*C).
   The official 1x1 convolution to ``p*p*C`` channels followed by ``PixelShuffle(p)`` is this
   same map: it lays out each patch's outputs as (C, p, p) where ours are (p, p, C), an
   output permutation of a layer trained from scratch.
5. loss: the suite's, e.g. ``l1`` on the masked patches (the paper's recipe), with ``block``
   masking of large regions.

Unlike the MAE the encoder runs on all L patches whatever the mask ratio, so a step costs
about as much as a ViT on the whole image (``mae_bench.cell.pretrain_flops_per_image``).
The encoder is the built-in ``vit``'s plus the mask token, and exports to timm's
``VisionTransformer`` the same way. Official SimMIM ViT checkpoints (layer scale, shared
relative position bias) do not fit this architecture and are not loaded.
"""

from __future__ import annotations

from typing import Any

import torch
from mae_bench_plugins.vit import ViTEncoder, ViTEncoderParams, timm_export
from torch import Tensor, nn

from mae_bench import MAEOutput, Mask, MaskedAutoencoder, hookimpl


class SimMIMParams(ViTEncoderParams):
    """Encoder sizes (as ``vit``'s; there is no decoder, only a linear head)."""


class SimMIMEncoder(ViTEncoder):
    """``vit``'s encoder on every patch, those masked replaced by a learned mask token."""

    def __init__(self, p: SimMIMParams, image_size: int, in_chans: int) -> None:
        super().__init__(p, image_size, in_chans)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, p.dim))  # (1, 1, D)
        nn.init.trunc_normal_(self.mask_token, std=0.02, a=-0.02, b=0.02)  # as the official ViT

    def no_weight_decay(self) -> set[str]:
        return {"cls_token", "mask_token"}

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """timm's layer grouping: the stem (with the mask token), each block, the final norm."""
        return {
            "stem": r"^cls_token|^mask_token|^patch_embed",
            "blocks": [(r"^blocks\.(\d+)", None), (r"^norm", (99999,))],
        }

    def forward(self, imgs: Tensor, mask: Tensor) -> Tensor:  # type: ignore[override]
        """(B, C, H, W), mask (B, L) with 1 = masked -> tokens of every patch (B, 1 + L, D)."""
        x = self.patch_embed(imgs)  # (B, L, D): embed patches
        w = mask.unsqueeze(-1).type_as(x)  # (B, L, 1)
        # mask tokens where masked; arithmetic (not indexing) keeps mask_token in the graph
        # with no patch masked (probes, fine-tuning), so data-parallel training finds its grad
        x = x * (1 - w) + self.mask_token * w  # (B, L, D)
        x = x + self.pos_embed  # (B, L, D): positions, after the mask tokens
        cls = self.cls_token.expand(x.shape[0], -1, -1)  # (B, 1, D): no position (a zero row)
        x = torch.cat([cls, x], dim=1)  # (B, 1 + L, D)
        x = self.blocks(x)  # (B, 1 + L, D)
        return self.norm(x)  # (B, 1 + L, D)


class SimMIMHead(nn.Module):
    """SimMIM's one-layer prediction head: a linear map of each patch token to its pixels."""

    def __init__(self, dim: int, out: int, num_prefix_tokens: int = 1) -> None:
        super().__init__()
        self.num_prefix_tokens = num_prefix_tokens
        self.pred = nn.Linear(dim, out)
        nn.init.xavier_uniform_(self.pred.weight)
        nn.init.zeros_(self.pred.bias)

    def forward(self, latent: Tensor) -> Tensor:
        """(B, prefix + L, D) -> (B, L, out)."""
        return self.pred(latent[:, self.num_prefix_tokens :])


class SimMIM(MaskedAutoencoder):
    """SimMIM: a ViT encoder on all patches with mask tokens, and a linear pixel head.

    ``forward(imgs, mask)`` reads ``mask.mask``; the latent holds every patch's token,
    (B, 1 + L, D). ``forward_encoder(imgs, ids_keep)`` masks the patches not in ``ids_keep``
    (with all of them, as probes call it, it is a plain ViT on the image).
    """

    name = "simmim"
    Params = SimMIMParams
    num_prefix_tokens = 1

    def __init__(self, params: SimMIMParams, *, image_size: int, in_chans: int) -> None:
        super().__init__(params, image_size=image_size, in_chans=in_chans)
        self.check_patch_size(params.patch_size)
        self.patch_size = params.patch_size
        self.embed_dim = params.dim
        self.encoder = SimMIMEncoder(params, image_size, in_chans)
        self.decoder = SimMIMHead(params.dim, params.patch_size**2 * in_chans)

    def summary(self) -> str:
        p = self.params
        return f"simmim(p{p.patch_size},d{p.dim}x{p.depth})"

    def forward_encoder(self, imgs: Tensor, ids_keep: Tensor) -> Tensor:
        """Tokens of every patch, those not in ``ids_keep`` (B, K) masked: (B, 1 + L, D)."""
        mask = torch.ones(ids_keep.shape[0], self.num_patches, device=imgs.device)
        return self.encoder(imgs, mask.scatter(1, ids_keep, 0.0))  # (B, L): 1 = masked

    def forward_decoder(self, latent: Tensor, ids_restore: Tensor) -> Tensor:
        """Pixels of every patch from its token (already in patch order): (B, L, pred_dim)."""
        return self.decoder(latent)

    def forward(self, imgs: Tensor, mask: Mask) -> MAEOutput:
        """Encode every patch, the masked ones as mask tokens; predict every patch."""
        latent = self.encoder(imgs, mask.mask)  # (B, 1 + L, D)
        pred = self.forward_decoder(latent, mask.ids_restore)  # (B, L, pred_dim)
        return MAEOutput(pred=pred, latent=latent)

    def export_state_dict(self, fmt: str) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """``timm``: the encoder without its mask token as timm's ``VisionTransformer`` (cls
        token with a zero position, LayerNorm eps 1e-6, qkv bias), loadable with
        ``strict=True``."""
        if fmt != "timm":
            return super().export_state_dict(fmt)
        return timm_export(
            self.encoder, self.params, self.image_size, self.in_chans, skip=("mask_token",)
        )


@hookimpl
def register_encoders(register):
    register(SimMIM)
