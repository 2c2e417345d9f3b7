"""CrossMAE (Fu et al. 2024, "Rethinking Patch Dependence for Masked Autoencoders"): the MAE
ViT encoder with a decoder of cross-attention only, predicting only some masked patches.

One pretraining step (B images, L patches, K visible, M = L - K masked, D / D_dec the encoder /
decoder width), as the official ``models_cross.py`` (TonyLianLong/CrossMAE) computes it:

1. encoder -- ``plugins/vit.py:ViTEncoder``, unchanged: latent (B, 1 + K, D), the visible
   patches with their encoder positions (added before masking) and the cls token, normed.
2. partial reconstruction -- :meth:`CrossMAE.predicted_patches`: Q = ceil(predict_ratio * M)
   of the masked patches, ids (B, Q). The official code takes the first Q of its random
   shuffle (the last ``mask_ratio - kept_mask_ratio`` are masked but not predicted); here
   each image's Q are chosen by a scramble of its own mask (:func:`patch_priority`): the
   same in law for uniform masking, and block and grid masking (which list their masked
   patches row by row) do not always leave their last rows out.
3. queries -- a learned mask token + the decoder's fixed 2D sin-cos position of each
   predicted patch: (B, Q, D_dec). Queries never attend to each other.
4. decoder blocks -- :class:`CrossAttentionBlock`: x += cross_attn(norm1(x), latent), queries
   from x, keys and values projected from the encoder tokens (width D -> D_dec by each block's
   ``kv`` linear, as the official code: no separate decoder embedding, and the visible tokens
   get no decoder positions: they carry the encoder's); x += mlp(norm2(x)).
5. norm, ``pred`` linear -> (B, Q, pred_dim), scattered into pred (B, L, pred_dim) (zeros
   elsewhere) with ``predicted`` (B, L) = 1 at the Q patches; the core's loss averages over
   those only (``mae_bench/train.py:forward_loss``).

In eval mode (reconstruction metrics, pictures) every patch, visible ones included, is a query
and ``predicted`` is None. The decoder's cost is linear in Q (no query-query attention), so
predict_ratio < 1 trains cheaper. Not built: the official ``weight_fm`` option (each decoder
block reading a learned mix of several encoder layers); the decoder reads the last layer.
Module names follow the official code, so a checkpoint of its layout without ``weight_fm``
loads through ``ViTMAE.adapt_state_dict`` (``decoder_blocks.N.cross_attn.q`` ->
``decoder.blocks.N...``); the released checkpoints are ``weight_fm`` ones (``wfm.*``,
``dec_norms.N``, no encoder ``norm``), which the loader refuses, naming those keys.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from mae_bench_plugins.vit import ViTMAE, ViTParams
from pydantic import Field
from timm.layers import Mlp
from torch import Tensor, nn

from mae_bench import MAEOutput, Mask, hookimpl
from mae_bench.layers import LayerNorm, gather_tokens, init_mae_weights, sincos_pos_embed

PRIME = 2_147_483_647  # 2**31 - 1: the products below stay under 2**62, exact in int64


def _scramble(x: Tensor) -> Tensor:
    """Non-negative int64 values below :data:`PRIME`, scrambled (three rounds of a Lehmer
    step and an xorshift): exact integer arithmetic, the same on every device and compiled."""
    for _ in range(3):
        x = (x * 48271) % PRIME
        x = x ^ (x >> 13)
    return x


def patch_priority(ids_restore: Tensor) -> Tensor:
    """(B, L) int64: a pseudo-random priority of each patch, a function of its image's mask
    (``ids_restore``, (B, L)) only; a patch of a lower priority is predicted first."""
    num = ids_restore.shape[1]
    weights = torch.arange(1, num + 1, device=ids_restore.device)
    salt = _scramble((ids_restore * weights).sum(dim=1) % PRIME)  # (B,): one per mask
    patches = torch.arange(num, device=ids_restore.device)
    return _scramble((salt[:, None] * (num + 1) + patches + 1) % PRIME)  # (B, L)


class CrossMAEParams(ViTParams):
    """The ``vit`` sizes (the decoder's: cross-attention blocks) and the share of the masked
    patches predicted in training."""

    predict_ratio: float = Field(1.0, gt=0, le=1)
    """Fraction of the masked patches predicted (and trained on) per step, in (0, 1]."""


class CrossAttention(nn.Module):
    """Multi-head attention from decoder queries to encoder tokens (the official
    ``CrossAttention``): q from the queries, k and v from the encoder's width."""

    def __init__(self, encoder_dim: int, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim, bias=True)
        self.kv = nn.Linear(encoder_dim, 2 * dim, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        """(B, Q, D_dec) queries, (B, N, D) encoder tokens -> (B, Q, D_dec)."""
        b, q_len, d = x.shape
        h = self.heads
        q = self.q(x).reshape(b, q_len, h, d // h).transpose(1, 2)  # (B, h, Q, d/h)
        kv = self.kv(y).reshape(b, y.shape[1], 2, h, d // h).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, kv[0], kv[1])  # (B, h, Q, d/h)
        return self.proj(out.transpose(1, 2).reshape(b, q_len, d))  # (B, Q, D_dec)


class CrossAttentionBlock(nn.Module):
    """Pre-norm cross-attention then MLP, residual each; no self-attention among queries."""

    def __init__(self, encoder_dim: int, dim: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = LayerNorm(dim)
        self.cross_attn = CrossAttention(encoder_dim, dim, heads)
        self.norm2 = LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        """(B, Q, D_dec), (B, N, D) -> (B, Q, D_dec)."""
        x = x + self.cross_attn(self.norm1(x), y)
        return x + self.mlp(self.norm2(x))


class CrossDecoder(nn.Module):
    """Queries (mask token + sin-cos position of a patch) cross-attending to the encoder's
    tokens, block by block; each query's prediction depends on its patch and the encoder only."""

    def __init__(
        self,
        *,
        num_patches: int,
        embed_dim: int,
        pred_dim: int,
        dim: int,
        depth: int,
        heads: int,
        mlp_ratio: float,
    ) -> None:
        super().__init__()
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        grid = math.isqrt(num_patches)
        self.register_buffer("pos_embed", sincos_pos_embed(dim, grid)[None], persistent=False)
        self.blocks = nn.ModuleList(
            [CrossAttentionBlock(embed_dim, dim, heads, mlp_ratio) for _ in range(depth)]
        )
        self.norm = LayerNorm(dim)
        self.pred = nn.Linear(dim, pred_dim)
        self.apply(init_mae_weights)
        nn.init.normal_(self.mask_token, std=0.02)

    def no_weight_decay(self) -> set[str]:
        """Parameters trained without weight decay (timm's convention)."""
        return {"mask_token"}

    def forward(self, latent: Tensor, ids_query: Tensor) -> Tensor:
        """Predict patches ``ids_query``: (B, 1 + K, D), (B, Q) -> (B, Q, pred_dim)."""
        pos = self.pos_embed.expand(len(ids_query), -1, -1)  # (B, L, D_dec)
        x = self.mask_token + gather_tokens(pos, ids_query)  # (B, Q, D_dec): the queries
        for block in self.blocks:
            x = block(x, latent)  # (B, Q, D_dec)
        return self.pred(self.norm(x))  # (B, Q, pred_dim)


class CrossMAE(ViTMAE):
    """The ``vit`` MAE with CrossMAE's decoder: cross-attention only, and in training only
    ``predict_ratio`` of the masked patches predicted (``MAEOutput.predicted``)."""

    name = "crossmae"
    Params = CrossMAEParams

    def build_decoder(self, params: CrossMAEParams, in_chans: int) -> nn.Module:
        """The cross-attention decoder (in place of the MAE's)."""
        return CrossDecoder(
            num_patches=self.num_patches,
            embed_dim=params.dim,
            pred_dim=params.patch_size**2 * in_chans,
            dim=params.decoder_dim,
            depth=params.decoder_depth,
            heads=params.decoder_heads,
            mlp_ratio=params.mlp_ratio,
        )

    def summary(self) -> str:
        p = self.params
        return f"crossmae(p{p.patch_size},d{p.dim}x{p.depth},r{p.predict_ratio:g})"

    def predicted_patches(self, mask: Mask) -> Tensor:
        """The patches predicted in training, (B, Q): Q = ceil(predict_ratio * M) of the M
        masked patches, each image's chosen by a scramble of its own mask
        (:func:`patch_priority`). The official code takes the first Q of the masking's
        shuffle: the same in law for uniform masking, but block and grid masking list their
        masked patches row by row and would always leave their last rows out. A function of
        the image's mask alone, the choice does not depend on the process count (each rank
        holds some rows of the batch's masks), on compilation or on a random stream."""
        visible, patches = mask.ids_keep.shape[1], mask.ids_restore.shape[1]
        masked = patches - visible
        # rounded first: 0.7 * 10 is 7.000000000000001 in floats, and must give 7
        count = min(masked, math.ceil(round(self.params.predict_ratio * masked, 9)))
        ids_shuffle = torch.argsort(mask.ids_restore, dim=1)  # (B, L): [visible..., masked...]
        ids_masked = ids_shuffle[:, visible:]  # (B, M)
        if count == masked:
            return ids_masked
        priority = patch_priority(mask.ids_restore).gather(1, ids_masked)  # (B, M)
        order = torch.argsort(priority, dim=1, stable=True)
        return ids_masked.gather(1, order[:, :count])  # (B, Q)

    def forward_decoder(self, latent: Tensor, ids_restore: Tensor) -> Tensor:
        """Predict every patch, visible ones too: (B, 1 + K, D), (B, L) -> (B, L, pred_dim)."""
        b, n = ids_restore.shape
        return self.decoder(latent, torch.arange(n, device=latent.device).expand(b, n))

    def forward(self, imgs: Tensor, mask: Mask) -> MAEOutput:
        """Training: predict :meth:`predicted_patches` only, scattered into a (B, L, pred_dim)
        ``pred`` with ``predicted`` marking them; eval: every patch, ``predicted`` None."""
        latent = self.forward_encoder(imgs, mask.ids_keep)  # (B, 1 + K, D)
        if not self.training:
            return MAEOutput(pred=self.forward_decoder(latent, mask.ids_restore), latent=latent)
        ids = self.predicted_patches(mask)  # (B, Q)
        queries = self.decoder(latent, ids)  # (B, Q, pred_dim)
        b, n = mask.ids_restore.shape
        index = ids[..., None].expand(-1, -1, queries.shape[-1])  # (B, Q, pred_dim)
        pred = queries.new_zeros(b, n, queries.shape[-1]).scatter(1, index, queries)
        predicted = mask.mask.new_zeros(b, n).scatter(1, ids, 1.0)  # (B, L)
        return MAEOutput(pred=pred, latent=latent, predicted=predicted)


@hookimpl
def register_encoders(register):
    register(CrossMAE)
