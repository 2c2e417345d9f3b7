"""The data2vec target (Baevski et al. 2022): an exponential-moving-average teacher's features.

A frozen copy of the student's encoder (the teacher) sees the FULL image (every patch
visible); the target of a patch is the average of the outputs of its top-K transformer
blocks, each instance-normalised first (every channel over the image's patch tokens, prefix
tokens such as cls dropped), then layer-normalised without affine parameters. In fairseq's
terms (``examples/data2vec``): ``end_of_block_targets`` (data2vec 1.0's image model reads
whole block outputs; data2vec 2.0's image config reads the FFN output before the block's
last residual instead) with ``instance_norm_target_layer`` + ``layer_norm_targets``, the
normalisation of data2vec 2.0's image config (``config/v2/base_images_only_task.yaml``;
data2vec 1.0's normalises only the average). After every optimizer step the teacher follows
the student, ``teacher = tau * teacher + (1 - tau) * student``, tau rising linearly from
``ema_decay`` to ``ema_end_decay`` over training (fairseq's ``get_annealed_rate``); buffers
are copied. On CUDA the teacher runs in bf16 autocast, as the student does; the norms in
float32.

The teacher runs through the model's own ``forward_encoder`` (its encoder swapped for the
teacher on a shallow copy of the model; the student is untouched), its blocks' outputs read
by forward hooks: any encoder with a ``blocks`` sequence of transformer blocks (the built-in
``vit``, timm ViTs) works. The teacher's weights are saved with the pretraining checkpoint,
so a cell resumes with the same teacher.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field, PositiveInt
from torch import Tensor, nn

from mae_bench import Mask, MaskedAutoencoder, Params, Target, hookimpl


class Data2VecParams(Params):
    """``top_k``: teacher blocks averaged (the last ones); ``ema_decay`` -> ``ema_end_decay``:
    the teacher's EMA decay at the start and the end of training (linear in between)."""

    top_k: PositiveInt = 2
    ema_decay: float = Field(0.999, ge=0.0, le=1.0)
    ema_end_decay: float = Field(0.9999, ge=0.0, le=1.0)


def _blocks(model: MaskedAutoencoder, encoder: nn.Module, top_k: int) -> list[nn.Module]:
    """The encoder's transformer blocks, in order; ``ValueError`` naming the encoder when it
    has no ``blocks`` sequence, or fewer blocks than ``top_k``."""
    blocks = getattr(encoder, "blocks", None)
    where = f"encoder {model.name!r} ({type(model).__module__}.{type(model).__qualname__})"
    if not isinstance(blocks, nn.Sequential | nn.ModuleList):
        raise ValueError(
            f"the data2vec target reads the outputs of the encoder's transformer blocks, and "
            f"{where} has no encoder.blocks (an nn.Sequential or nn.ModuleList, as the vit and "
            f"timm encoders have)"
        )
    if len(blocks) < top_k:
        raise ValueError(
            f"data2vec top_k={top_k} averages more blocks than the {len(blocks)} of {where}"
        )
    return list(blocks)


def _with_encoder(model: MaskedAutoencoder, encoder: nn.Module) -> MaskedAutoencoder:
    """A shallow copy of ``model`` whose ``encoder`` is ``encoder``: its own forward_encoder
    then runs the teacher; the model itself (and its other modules, shared) is unchanged."""
    view = copy.copy(model)
    view.__dict__["_modules"] = {**model._modules, "encoder": encoder}
    return view


def _frozen_copy(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` in eval mode, its parameters frozen. Each tensor is cloned
    into the copy's memo first: deepcopy's own tensor copy reads data pointers, which the
    fake tensors of the core's memory estimate deprecate."""
    memo: dict[int, Any] = {}
    for t in module.buffers():
        memo[id(t)] = t.detach().clone()
    for p in module.parameters():
        memo[id(p)] = nn.Parameter(p.detach().clone(), requires_grad=False)
    return copy.deepcopy(module, memo).eval()


class Data2VecTarget(Target):
    """The average of an EMA teacher's top-K block outputs on the full image, each
    instance-normalised, then layer-normalised: (B, L, D) per image, D the encoder's width."""

    name = "data2vec"
    Params = Data2VecParams
    params: Data2VecParams

    def __init__(self, params: Data2VecParams) -> None:
        super().__init__(params)
        self.teacher: nn.Module | None = None

    def summary(self) -> str:
        p = self.params
        return f"data2vec(top{p.top_k},ema{p.ema_decay:g}->{p.ema_end_decay:g})"

    def dim(self, model: MaskedAutoencoder) -> int:
        """The encoder's width; ``ValueError`` (at validation) for an encoder without
        transformer blocks to read, or with fewer than ``top_k``."""
        _blocks(model, model.encoder, self.params.top_k)
        return model.embed_dim

    def setup(self, model: MaskedAutoencoder) -> None:
        """The teacher: a frozen copy of the student's encoder, in eval mode."""
        _blocks(model, model.encoder, self.params.top_k)
        self.teacher = _frozen_copy(model.encoder)

    def decay_at(self, progress: float) -> float:
        """The EMA decay tau after ``progress`` of training: linear from ``ema_decay`` (0)
        to ``ema_end_decay`` (1)."""
        p = self.params
        return p.ema_decay + (p.ema_end_decay - p.ema_decay) * min(max(progress, 0.0), 1.0)

    def _teacher(self) -> nn.Module:
        if self.teacher is None:
            raise RuntimeError("the data2vec target has no teacher: call setup(model) first")
        return self.teacher

    def __call__(self, imgs: Tensor, mask: Mask, model: MaskedAutoencoder) -> Tensor:
        """(B, C, H, W) -> (B, L, D) targets of every patch; the mask is not read (the
        teacher sees every patch)."""
        teacher = self._teacher()
        k, n = self.params.top_k, model.num_prefix_tokens
        b, num = imgs.shape[0], model.num_patches
        outputs: list[Tensor] = []
        hooks = [  # the top K only: no other block's output is kept alive
            block.register_forward_hook(lambda _m, _i, out: outputs.append(out))
            for block in _blocks(model, teacher, k)[-k:]
        ]
        ids_all = torch.arange(num, device=imgs.device).expand(b, num)  # (B, L): all visible
        bf16 = torch.autocast("cuda", dtype=torch.bfloat16) if imgs.is_cuda else None
        try:
            with torch.no_grad(), bf16 or contextlib.nullcontext():
                _with_encoder(model, teacher).forward_encoder(imgs, ids_all)
        finally:
            for hook in hooks:
                hook.remove()
        layers = [out[:, n:].float() for out in outputs]  # K x (B, L, D): no cls
        # instance norm: each channel over the image's tokens, (B, D, L) as F.instance_norm
        normed = [F.instance_norm(y.transpose(1, 2)).transpose(1, 2) for y in layers]
        y = torch.stack(normed).mean(dim=0)  # (B, L, D): the top-K average
        return F.layer_norm(y, y.shape[-1:])  # (B, L, D): no affine parameters

    @torch.no_grad()
    def after_step(self, model: MaskedAutoencoder, progress: float) -> None:
        """teacher = tau * teacher + (1 - tau) * student for trained parameters (a frozen
        one, and every buffer, is copied), tau = :meth:`decay_at` ``(progress)``."""
        teacher, tau = self._teacher(), self.decay_at(progress)
        pairs = list(zip(teacher.parameters(), model.encoder.parameters(), strict=True))
        ema = [(t, s) for t, s in pairs if s.requires_grad]
        if ema:
            ts, ss = [t for t, _ in ema], [s.detach() for _, s in ema]
            torch._foreach_mul_(ts, tau)
            torch._foreach_add_(ts, ss, alpha=1.0 - tau)
        for t, s in pairs:
            if not s.requires_grad:
                t.copy_(s)
        for t, s in zip(teacher.buffers(), model.encoder.buffers(), strict=True):
            t.copy_(s)

    def state_dict(self) -> dict[str, Any]:
        """The teacher's weights (none before setup)."""
        return {} if self.teacher is None else {"teacher": self.teacher.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """The teacher's weights, as :meth:`state_dict` saved them (a checkpoint without a
        teacher leaves the fresh copy)."""
        if "teacher" in state:
            self._teacher().load_state_dict(state["teacher"])


@hookimpl
def register_targets(register):
    register(Data2VecTarget)
