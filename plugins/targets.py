"""Pixel targets: the input's patches as they are (``pixels``) or each normalized by its own
mean and std (``norm_pix``, the MAE paper's best target). HOG and a teacher's features live
in their own modules (``plugins/hog.py``, ``plugins/data2vec.py``)."""

from __future__ import annotations

from torch import Tensor

from mae_bench import Mask, MaskedAutoencoder, Target, hookimpl
from mae_bench.layers import denormalize_patches, normalize_patches, patchify


class PixelTarget(Target):
    """The input's patches, (B, L, p*p*C): what a variant without a target predicts (written
    out, it is a component of its own, so its cells get keys of their own)."""

    name = "pixels"
    predicts_pixels = True
    # prediction_space "pixels" (its name): image-reading losses (laplacian) may train it

    def __call__(self, imgs: Tensor, mask: Mask, model: MaskedAutoencoder) -> Tensor:
        return patchify(imgs, model.patch_size)

    def to_input_space(self, pred: Tensor, patches: Tensor, mask: Tensor) -> Tensor:
        return pred


class NormPixTarget(Target):
    """Each patch normalized by its own mean and (var + 1e-6) ** 0.5, as the official MAE's
    ``norm_pix_loss``; predictions map back with the image's visible-patch statistics."""

    name = "norm_pix"
    predicts_pixels = True

    def __call__(self, imgs: Tensor, mask: Mask, model: MaskedAutoencoder) -> Tensor:
        return normalize_patches(patchify(imgs, model.patch_size))

    def to_input_space(self, pred: Tensor, patches: Tensor, mask: Tensor) -> Tensor:
        return denormalize_patches(pred, patches, mask)


@hookimpl
def register_targets(register):
    register(PixelTarget)
    register(NormPixTarget)
