"""Building blocks shared by the core and by encoder plugins (public, stable).

Patch layout follows the official MAE code: a patch is flattened as (p, p, C), patches in
row-major order over the grid.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Iterable
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import DropPath
from timm.models import group_parameters
from timm.models._manipulate import MATCH_PREV_GROUP, group_with_matcher
from timm.models.vision_transformer import Block
from timm.optim import param_groups_weight_decay
from torch import Tensor, nn
from torch._subclasses.fake_tensor import is_fake

LayerNorm = partial(nn.LayerNorm, eps=1e-6)
"""The LayerNorm of the official MAE (and of timm's ViTs): eps 1e-6."""


def patchify(imgs: Tensor, patch_size: int) -> Tensor:
    """(B, C, H, W) -> (B, L, p*p*C)."""
    b, c, h, w = imgs.shape
    p = patch_size
    x = imgs.reshape(b, c, h // p, p, w // p, p)
    x = torch.einsum("nchpwq->nhwpqc", x)
    return x.reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(x: Tensor, patch_size: int, channels: int) -> Tensor:
    """(B, L, p*p*C) -> (B, C, H, W) for a square grid."""
    b, n, _ = x.shape
    p = patch_size
    g = math.isqrt(n)
    if g * g != n:
        raise ValueError(f"{n} patches do not form a square grid")
    x = x.reshape(b, g, g, p, p, channels)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(b, channels, g * p, g * p)


def patch_mask_to_pixels(mask: Tensor, patch_size: int) -> Tensor:
    """(B, L) patch mask -> (B, 1, H, W) pixel mask."""
    b, n = mask.shape
    g = math.isqrt(n)
    grid = mask.reshape(b, 1, g, g)
    return grid.repeat_interleave(patch_size, dim=2).repeat_interleave(patch_size, dim=3)


def patch_stats(patches: Tensor) -> tuple[Tensor, Tensor]:
    """Per-patch mean and std of (B, L, p*p*C) patches (the official MAE's ``norm_pix_loss``:
    std = (var + 1e-6) ** 0.5), (B, L, 1) each."""
    mean = patches.mean(dim=-1, keepdim=True)
    std = (patches.var(dim=-1, keepdim=True) + 1e-6) ** 0.5
    return mean, std


def normalize_patches(patches: Tensor) -> Tensor:
    """Each patch normalized by its own mean and std (:func:`patch_stats`)."""
    mean, std = patch_stats(patches)
    return (patches - mean) / std


def denormalize_patches(pred: Tensor, patches: Tensor, mask: Tensor) -> Tensor:
    """Normalized-patch predictions back to the input: a visible patch (``mask`` 0) with its
    own statistics, a masked one with the image's average visible-patch mean and std
    (statistics the model could know: a masked patch's own are never used)."""
    mean, std = patch_stats(patches)
    visible = (1 - mask)[..., None]
    count = visible.sum(dim=1, keepdim=True).clamp_min(1.0)
    image_mean = (mean * visible).sum(dim=1, keepdim=True) / count
    image_std = (std * visible).sum(dim=1, keepdim=True) / count
    known_mean = torch.where(visible.bool(), mean, image_mean)
    known_std = torch.where(visible.bool(), std, image_std)
    return pred * known_std + known_mean


def random_mask(
    batch_size: int,
    num_patches: int,
    ratio: float,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-sample uniform masking (argsort of noise) keeping ``int(L * (1 - ratio))``
    patches, the official MAE's count (at L=16, ratio 0.7: 4 kept, 12 masked).

    Returns ``(ids_keep, ids_restore, mask)`` as in the MAE paper; at least one patch stays
    visible (where the official count would keep none). The noise is drawn on the CPU from
    ``generator`` so masks are reproducible on every device.
    """
    len_keep = max(1, int(num_patches * (1.0 - ratio)))  # K, as the official code counts
    noise = torch.rand(batch_size, num_patches, generator=generator)  # (B, L) in [0, 1)
    ids_shuffle = torch.argsort(noise, dim=1)  # (B, L): small noise is kept, large is masked
    ids_restore = torch.argsort(ids_shuffle, dim=1)  # (B, L): the inverse permutation
    ids_keep = ids_shuffle[:, :len_keep]  # (B, K)
    mask = torch.ones(batch_size, num_patches)  # (B, L) in shuffled order: 0 keep, 1 masked
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, 1, ids_restore)  # (B, L) unshuffled to patch order
    return ids_keep.to(device), ids_restore.to(device), mask.to(device)


def gather_tokens(x: Tensor, ids: Tensor) -> Tensor:
    """Select tokens ``ids`` (B, K) from ``x`` (B, L, D)."""
    return torch.gather(x, 1, ids.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def sincos_pos_embed(dim: int, grid_size: int) -> Tensor:
    """Fixed 2D sine-cosine position embedding, (grid_size**2, dim), row-major over the grid.

    Channels in the official MAE order: ``[sin x, cos x, sin y, cos y]`` with ``x`` the column
    and ``y`` the row of the patch, frequencies ``1 / 10000 ** (k / (dim / 4))``, computed in
    float64 as the official numpy code does, so official checkpoints' positions match exactly.
    """
    if dim % 4:
        raise ValueError(f"embedding dim {dim} must be divisible by 4 for 2D sin-cos positions")
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    rows, cols = torch.meshgrid(
        torch.arange(grid_size, dtype=torch.float64),
        torch.arange(grid_size, dtype=torch.float64),
        indexing="ij",
    )

    def axis(pos: Tensor) -> Tensor:
        angles = pos.flatten()[:, None] * omega[None, :]
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([axis(cols), axis(rows)], dim=1).float()


@functools.lru_cache(maxsize=32)
def _laplacian_kernel(device: torch.device, dtype: torch.dtype) -> Tensor:
    """The 3x3 4-neighbour Laplacian kernel, made on ``device`` once (filled there: no copy
    from the host), usable by autograd whatever the caller's inference mode."""
    with torch.inference_mode(False):
        kernel = torch.zeros(3, 3, device=device, dtype=dtype)
        kernel[1, :] = 1.0
        kernel[:, 1] = 1.0
        kernel[1, 1] = -4.0
    return kernel


def laplacian(imgs: Tensor) -> Tensor:
    """Per-channel 3x3 Laplacian (4-neighbour) high-pass filter with replicate padding."""
    # a kernel made while tracing with fake tensors (the memory estimate) is fake too: never
    # cached, or a later real call would get it
    make = _laplacian_kernel.__wrapped__ if is_fake(imgs) else _laplacian_kernel
    kernel = make(imgs.device, imgs.dtype)
    c = imgs.shape[1]
    weight = kernel.expand(c, 1, 3, 3)
    return F.conv2d(F.pad(imgs, (1, 1, 1, 1), mode="replicate"), weight, groups=c)


def masked_laplacian_error(
    recon: Tensor, truth: Tensor, pixel_mask: Tensor, squared: bool = True
) -> Tensor:
    """Per-image high-frequency error of a reconstruction over its masked pixels, (B,).

    The reconstruction is first made a composite: ``recon`` on masked pixels, ``truth`` on
    visible ones, so the filter at a masked patch's border reads the true visible pixels and
    no gradient reaches the predictions of visible patches. Then the Laplacian of the
    composite is compared with the Laplacian of ``truth`` (squared or absolute difference),
    averaged over masked pixels and channels. The training loss ``laplacian`` and the metric
    ``hf_error`` are both this function.
    """
    composite = recon * pixel_mask + truth * (1 - pixel_mask)
    diff = laplacian(composite) - laplacian(truth)
    err = diff**2 if squared else diff.abs()
    denom = (pixel_mask.sum(dim=(1, 2, 3)) * truth.shape[1]).clamp_min(1.0)
    return (err * pixel_mask).sum(dim=(1, 2, 3)) / denom


def init_mae_weights(module: nn.Module) -> None:
    """The official MAE init: xavier-uniform linears, zero biases, unit LayerNorms."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class MAEDecoder(nn.Module):
    """The lightweight MAE transformer decoder with a learned mask token.

    Takes encoder tokens of the visible patches (after ``num_prefix_tokens`` prefix tokens such
    as cls), inserts mask tokens, restores patch order, adds fixed sin-cos positions and
    predicts the pixels of every patch.
    """

    def __init__(
        self,
        *,
        num_patches: int,
        embed_dim: int,
        patch_size: int,
        in_chans: int,
        dim: int = 128,
        depth: int = 2,
        heads: int = 4,
        mlp_ratio: float = 4.0,
        num_prefix_tokens: int = 1,
    ) -> None:
        super().__init__()
        self.num_prefix_tokens = num_prefix_tokens
        self.embed = nn.Linear(embed_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        grid = math.isqrt(num_patches)
        self.register_buffer("pos_embed", sincos_pos_embed(dim, grid)[None], persistent=False)
        self.blocks = nn.Sequential(
            *[
                Block(dim, heads, mlp_ratio, qkv_bias=True, norm_layer=LayerNorm)
                for _ in range(depth)
            ]
        )
        self.norm = LayerNorm(dim)
        self.pred = nn.Linear(dim, patch_size * patch_size * in_chans)
        self.apply(init_mae_weights)
        nn.init.normal_(self.mask_token, std=0.02)

    def no_weight_decay(self) -> set[str]:
        """Parameters trained without weight decay (timm's convention)."""
        return {"mask_token"}

    def forward(self, latent: Tensor, ids_restore: Tensor) -> Tensor:
        """The official MAE's ``forward_decoder``: (B, prefix + K, D_enc), (B, L) ->
        (B, L, p*p*C), n = ``num_prefix_tokens``."""
        x = self.embed(latent)  # (B, n + K, D_dec): embed tokens
        n = self.num_prefix_tokens
        prefix, visible = x[:, :n], x[:, n:]  # (B, n, D_dec), (B, K, D_dec)
        b, k, d = visible.shape
        mask_tokens = self.mask_token.expand(b, ids_restore.shape[1] - k, d)  # (B, L - K, D_dec)
        # append mask tokens, then unshuffle to patch order: (B, L, D_dec)
        patches = gather_tokens(torch.cat([visible, mask_tokens], dim=1), ids_restore)
        # add positions (the prefix gets none: the official one is a zero row): (B, n + L, D_dec)
        x = torch.cat([prefix, patches + self.pos_embed], dim=1)
        x = self.norm(self.blocks(x))  # (B, n + L, D_dec): transformer blocks
        return self.pred(x[:, n:])  # (B, L, p*p*C): predict pixels, prefix dropped


# ----------------------------------------------------------- optimizer policy (timm's rules)
def weight_decay_param_groups(
    model: nn.Module, weight_decay: float, no_weight_decay: Iterable[str] = ()
) -> list[dict[str, Any]]:
    """AdamW groups of ``model``: weight decay except on 1-D parameters (biases, norms) and
    the qualified names in ``no_weight_decay`` (tokens, positions), as timm groups them."""
    return param_groups_weight_decay(
        model, weight_decay, no_weight_decay_list=sorted(no_weight_decay)
    )


def layer_decay_param_groups(
    encoder: nn.Module, weight_decay: float, layer_decay: float
) -> list[dict[str, Any]]:
    """AdamW groups of an encoder for fine-tuning, each with an ``lr_scale``.

    The official MAE rule (``util/lr_decay.py:param_groups_lrd``): the stem is layer 0,
    block ``i`` layer ``i + 1``, and everything else (the encoder's final norm, a head)
    layer ``depth + 1``; layer ``k`` gets ``layer_decay ** (depth + 1 - k)``, so the last
    block gets ``layer_decay`` and the final norm 1. The stem and blocks come from the
    encoder's timm-style ``group_matcher``; what it merges into the last block (timm's
    ``MATCH_PREV_GROUP``, e.g. ``norm``) or does not match sits at the top, scale 1.
    Encoders without a ``group_matcher`` get one scale, 1. No weight decay on 1-D
    parameters and ``no_weight_decay()`` names.
    """
    no_decay = set(getattr(encoder, "no_weight_decay", set)())
    layer_of: dict[str, int] = {}
    if hasattr(encoder, "group_matcher"):
        layer_of = _stem_and_block_layers(encoder, encoder.group_matcher(coarse=False))
    top = max(layer_of.values(), default=-1) + 1
    groups: dict[tuple[float, bool], dict[str, Any]] = {}
    for name, param in encoder.named_parameters():
        if not param.requires_grad:
            continue
        scale = layer_decay ** (top - layer_of.get(name, top))
        skip_decay = param.ndim <= 1 or name in no_decay
        decay = 0.0 if skip_decay else weight_decay
        group = groups.setdefault(
            (scale, skip_decay), {"params": [], "weight_decay": decay, "lr_scale": scale}
        )
        group["params"].append(param)
    return list(groups.values())


def _stem_and_block_layers(encoder: nn.Module, matcher: Any) -> dict[str, int]:
    """Layer ids (0, 1, ...) of the parameters a timm ``group_matcher`` places in the stem
    or a block; parameters it merges into the previous group (``MATCH_PREV_GROUP``) or does
    not match are left out (the caller puts them at the top)."""
    if not isinstance(matcher, dict):  # a callable matcher: its groups as they are
        return group_parameters(encoder, matcher, reverse=True)
    rules: dict[str, Any] = {}
    for group, spec in matcher.items():
        if isinstance(spec, list | tuple):
            spec = [rule for rule in spec if rule[1] != MATCH_PREV_GROUP]
        rules[group] = spec
    patterns = [
        re.compile(rule[0] if isinstance(rule, list | tuple) else rule)
        for spec in rules.values()
        if spec
        for rule in ([spec] if isinstance(spec, str) else spec)
    ]
    named = [(n, p) for n, p in encoder.named_parameters() if any(r.match(n) for r in patterns)]
    return group_with_matcher(named, rules, reverse=True)


def set_block_drop_path(module: nn.Module, rate: float) -> None:
    """Stochastic depth on the timm ``Block``s of ``module``, rising linearly from 0 at the
    first block to ``rate`` at the last."""
    blocks = [m for m in module.modules() if isinstance(m, Block)]
    for i, block in enumerate(blocks):
        r = rate * i / max(1, len(blocks) - 1)
        block.drop_path1 = DropPath(r) if r > 0 else nn.Identity()
        block.drop_path2 = DropPath(r) if r > 0 else nn.Identity()
