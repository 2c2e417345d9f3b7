"""The MAE ViT (He et al. 2021), read top to bottom like the official ``models_mae.py``.

One pretraining step, in order. B images of C x H x W, patch size p, L = (H/p)*(W/p) patches,
K of them visible, D / D_dec the encoder / decoder width; each step names where its code is.

1. patchify -- ``mae_bench/layers.py:patchify``: (B, C, H, W) -> (B, L, p*p*C), a patch
   flattened as (p, p, C), patches row-major. This is the target the loss compares with
   (``mae_bench/contract.py:LossInputs.target``).
2. random masking -- ``mae_bench/layers.py:random_mask``, drawn per step by
   ``mae_bench/train.py:draw_mask`` through ``mae_bench/contract.py:MaskingStrategy.__call__``
   (``plugins/masking.py`` sets the ratio) into a ``mae_bench/contract.py:Mask``:
   noise (B, L) -> ids_shuffle = argsort(noise); ids_keep = ids_shuffle[:, :K] (B, K), the
   visible patches; ids_restore = argsort(ids_shuffle) (B, L), which puts
   [visible..., masked...] back in patch order; mask (B, L), 1 = masked, 0 = visible.
3. encoder on the visible patches -- ``plugins/vit.py:ViTEncoder.forward`` (the official
   ``forward_encoder``): patch_embed (B, L, D) + fixed 2D sin-cos positions
   (``mae_bench/layers.py:sincos_pos_embed``); gather ids_keep -> (B, K, D); prepend the cls
   token -> (B, 1 + K, D); timm ``Block``s; norm -> latent (B, 1 + K, D).
4. decoder -- ``mae_bench/layers.py:MAEDecoder.forward`` (the official ``forward_decoder``):
   embed -> (B, 1 + K, D_dec); append L - K mask tokens -> (B, L, D_dec) (cls set aside);
   unshuffle with ids_restore; add the decoder's sin-cos positions; cls back in front ->
   (B, 1 + L, D_dec); blocks, norm; predict p*p*C per token and drop the cls token ->
   pred (B, L, p*p*C). ``mae_bench/contract.py:MaskedAutoencoder.forward`` runs 3 then 4
   and returns ``MAEOutput(pred, latent)``.
5. loss on the masked patches only -- ``plugins/losses.py:MSELoss.__call__`` (the official
   ``forward_loss``), called by ``mae_bench/train.py:forward_loss`` (the forward in bf16
   autocast on CUDA, the loss in float32) from ``mae_bench/train.py:train_step``: target =
   patchify(imgs); with ``norm_pix`` each target patch is normalized by its own mean and
   (var + 1e-6) ** 0.5 (``mae_bench/layers.py:patch_stats``); squared error averaged per patch
   (B, L), then over the masked patches (mask == 1).

Same numbers, other lines: positions are added before masking and the cls token gets none
(the official cls position, in the encoder and the decoder, is a zero row). Differences: the
mask is drawn outside the model (a masking plugin can replace step 2), its noise on the CPU
from a seeded generator, and K = int(L * (1 - ratio)) as the official count, but at least 1.
Parameter names, initialisation, LayerNorm
eps 1e-6 and the positions follow ``models_mae.py``, so its checkpoints load
(``ViTMAE.adapt_state_dict``: its ``decoder_*`` and ``mask_token`` keys are our
``decoder.*``, the rest our ``encoder.*``) and an encoder exports to timm's
``VisionTransformer`` unchanged (``ViTMAE.export_state_dict``).
"""

from __future__ import annotations

import re
from typing import Any

import torch
from pydantic import PositiveFloat, PositiveInt, model_validator
from timm.layers import PatchEmbed
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from mae_bench import MaskedAutoencoder, Params, hookimpl
from mae_bench.layers import (
    LayerNorm,
    MAEDecoder,
    gather_tokens,
    init_mae_weights,
    sincos_pos_embed,
)

# Official MAE checkpoint keys -> ours (the encoder's keys are the same, under ``encoder.``).
_OFFICIAL_DECODER = [
    (re.compile(r"^mask_token$"), "decoder.mask_token"),
    (re.compile(r"^decoder_embed\."), "decoder.embed."),
    (re.compile(r"^decoder_blocks\."), "decoder.blocks."),
    (re.compile(r"^decoder_norm\."), "decoder.norm."),
    (re.compile(r"^decoder_pred\."), "decoder.pred."),
]
_OFFICIAL_ENCODER = re.compile(r"^(cls_token|patch_embed\.|blocks\.|norm\.)")
# timm's registered ViTs by (embed dim, depth, heads): the name passed to timm.create_model.
TIMM_NAMES = {
    (192, 12, 3): "vit_tiny_patch16_224",
    (384, 12, 6): "vit_small_patch16_224",
    (768, 12, 12): "vit_base_patch16_224",
    (1024, 24, 16): "vit_large_patch16_224",
    (1280, 32, 16): "vit_huge_patch14_224",
}


class ViTEncoderParams(Params):
    """The encoder's sizes (also ``simmim``'s, which has no decoder)."""

    patch_size: PositiveInt = 4
    dim: PositiveInt = 128
    depth: PositiveInt = 4
    heads: PositiveInt = 4
    mlp_ratio: PositiveFloat = 4.0

    _widths: tuple[tuple[str, str], ...] = (("dim", "heads"),)  # (width, its heads)

    @model_validator(mode="after")
    def _heads_divide_dims(self) -> ViTEncoderParams:
        for dim, heads in self._widths:
            if getattr(self, dim) % getattr(self, heads):
                raise ValueError(f"{dim} must be divisible by {heads}")
            if getattr(self, dim) % 4:
                raise ValueError(f"{dim} must be divisible by 4 (2D sin-cos positions)")
        return self


class ViTParams(ViTEncoderParams):
    """Encoder and decoder sizes (the decoder is the MAE's lightweight one)."""

    decoder_dim: PositiveInt = 64
    decoder_depth: PositiveInt = 2
    decoder_heads: PositiveInt = 4

    _widths = (("dim", "heads"), ("decoder_dim", "decoder_heads"))


class ViTEncoder(nn.Module):
    """Patch embedding, fixed 2D sin-cos positions, a cls token and timm ``Block``s."""

    def __init__(self, p: ViTEncoderParams, image_size: int, in_chans: int) -> None:
        super().__init__()
        self.patch_embed = PatchEmbed(image_size, p.patch_size, in_chans, p.dim)
        grid = image_size // p.patch_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, p.dim))  # (1, 1, D)
        # (1, L, D), fixed: a buffer, not in the state_dict (a checkpoint's is checked)
        self.register_buffer("pos_embed", sincos_pos_embed(p.dim, grid)[None], persistent=False)
        self.blocks = nn.Sequential(
            *[
                Block(p.dim, p.heads, p.mlp_ratio, qkv_bias=True, norm_layer=LayerNorm)
                for _ in range(p.depth)
            ]
        )
        self.norm = LayerNorm(p.dim)
        self.apply(init_mae_weights)
        w = self.patch_embed.proj.weight.data  # init the patch projection like a linear layer
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(self.cls_token, std=0.02)

    def no_weight_decay(self) -> set[str]:
        """Parameters trained without weight decay (timm's convention)."""
        return {"cls_token"}

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """timm's layer grouping: the stem, then one group per block, then the final norm."""
        return {
            "stem": r"^cls_token|patch_embed",
            "blocks": [(r"^blocks\.(\d+)", None), (r"^norm", (99999,))],
        }

    def forward(self, imgs: Tensor, ids_keep: Tensor) -> Tensor:
        """The official ``forward_encoder``, given the visible patches ``ids_keep`` (the
        masking is drawn outside): (B, C, H, W), (B, K) -> (B, 1 + K, D)."""
        x = self.patch_embed(imgs)  # (B, L, D): embed patches
        x = x + self.pos_embed  # (B, L, D): add positions, before masking
        x = gather_tokens(x, ids_keep)  # (B, K, D): the visible patches only
        cls = self.cls_token.expand(x.shape[0], -1, -1)  # (B, 1, D): no position (a zero row)
        x = torch.cat([cls, x], dim=1)  # (B, 1 + K, D)
        x = self.blocks(x)  # (B, 1 + K, D): transformer blocks
        return self.norm(x)  # (B, 1 + K, D)


class ViTMAE(MaskedAutoencoder):
    """MAE ViT: the encoder runs on the visible patches only, a light decoder fills the rest.

    Its forward is ``MaskedAutoencoder.forward``: ``encoder(imgs, mask.ids_keep)`` (step 3 of
    the module docstring) -> latent (B, 1 + K, D), ``decoder(latent, mask.ids_restore)``
    (step 4) -> pred (B, L, p*p*C).
    """

    name = "vit"
    Params = ViTParams
    num_prefix_tokens = 1

    def __init__(self, params: ViTParams, *, image_size: int, in_chans: int) -> None:
        super().__init__(params, image_size=image_size, in_chans=in_chans)
        self.check_patch_size(params.patch_size)
        self.patch_size = params.patch_size
        self.embed_dim = params.dim
        self.encoder = ViTEncoder(params, image_size, in_chans)
        self.decoder = self.build_decoder(params, in_chans)

    def build_decoder(self, params: ViTParams, in_chans: int) -> nn.Module:
        """The MAE's light decoder (a subclass builds another, e.g. ``crossmae``'s)."""
        return MAEDecoder(
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

    def drop_final_norm(self) -> bool:
        """The encoder without its final ``norm`` (for the official global-pool head)."""
        if isinstance(self.encoder.norm, nn.Identity):
            return False
        self.encoder.norm = nn.Identity()
        return True

    def adapt_state_dict(self, state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
        """Accept our own keys (``encoder.*``, ``decoder.*``) or the official MAE's
        (``patch_embed.proj``, ``cls_token``, ``blocks.N``, ``norm``, ``decoder_*``,
        ``mask_token``); the fixed position embeddings are checked, not loaded."""
        out = {}
        for key, value in state_dict.items():
            if key.startswith(("encoder.", "decoder.")):
                out[key] = value
            elif key in ("pos_embed", "decoder_pos_embed"):
                self._check_positions(key, value)
            elif _OFFICIAL_ENCODER.match(key):
                out[f"encoder.{key}"] = value
            else:
                for pattern, ours in _OFFICIAL_DECODER:
                    if pattern.match(key):
                        out[pattern.sub(ours, key)] = value
                        break
                else:
                    out[key] = value  # unknown: reported by the loader as unexpected
        return out

    def _check_positions(self, key: str, value: Tensor) -> None:
        module = self.encoder if key == "pos_embed" else self.decoder
        ours = module.pos_embed[0].cpu()
        theirs = value.reshape(-1, value.shape[-1]).float()[-len(ours) :]
        if theirs.shape != ours.shape or not torch.allclose(theirs, ours, atol=1e-4):
            raise ValueError(
                f"{key}: the checkpoint's position embedding {tuple(value.shape)} is not the "
                f"fixed 2D sin-cos embedding of this model ({tuple(ours.shape)} patches x dim)"
            )

    def export_state_dict(self, fmt: str) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """``timm``: the encoder as timm's ``VisionTransformer`` (cls token with a zero
        position, LayerNorm eps 1e-6, qkv bias), loadable with ``strict=True``."""
        if fmt != "timm":
            return super().export_state_dict(fmt)
        return timm_export(self.encoder, self.params, self.image_size, self.in_chans)


def timm_export(
    encoder: ViTEncoder,
    p: ViTEncoderParams,
    image_size: int,
    in_chans: int,
    skip: tuple[str, ...] = (),
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """A ``ViTEncoder``'s weights as timm's ``VisionTransformer`` (its fixed positions with a
    zero row for the cls token; ``skip``: other parameters timm has no place for), and the
    ``timm.create_model`` keyword arguments of that model."""
    left_out = ("pos_embed", *skip)
    weights = {k: v for k, v in encoder.state_dict().items() if not k.startswith(left_out)}
    weights["pos_embed"] = torch.cat(
        [torch.zeros(1, 1, p.dim), encoder.pos_embed.detach().cpu()], dim=1
    )  # (1, 1 + L, D)
    kwargs = {
        "model_name": TIMM_NAMES.get((p.dim, p.depth, p.heads), "vit_base_patch16_224"),
        "img_size": image_size,
        "patch_size": p.patch_size,
        "in_chans": in_chans,
        "embed_dim": p.dim,
        "depth": p.depth,
        "num_heads": p.heads,
        "mlp_ratio": p.mlp_ratio,
        "num_classes": 0,
    }
    return weights, kwargs


@hookimpl
def register_encoders(register):
    register(ViTMAE)
