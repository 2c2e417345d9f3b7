"""The ``hog`` target (plugins/hog.py, MaskFeat): against scikit-image's ``hog`` of the whole
image cut into one block per patch, its invariance to the dataset normalisation, its width
and cell-size checks, its ``hog_error`` metric, and a suite that trains it end to end."""

from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from mae_bench_plugins.hog import HOGParams, HOGTarget, hog_patches
from skimage.feature import hog as skimage_hog

from mae_bench import Mask
from mae_bench.layers import random_mask
from tests.conftest import invoke, small_vit, tiny_suite_data, write_suite


def skimage_reference(imgs: torch.Tensor, patch: int, bins: int, cell: int) -> torch.Tensor:
    """(B, L, C, (p/c)^2 * bins): per image and channel, scikit-image's HOG of the WHOLE image
    with blocks of one patch (``cells_per_block`` = cells per patch, L2), keeping the blocks
    that are patches (every k-th of its overlapping blocks, k = cells per patch side)."""
    k = patch // cell
    out = []
    for image in imgs.numpy():
        channels = []
        for channel in image:
            blocks = skimage_hog(
                channel, orientations=bins, pixels_per_cell=(cell, cell),
                cells_per_block=(k, k), block_norm="L2", feature_vector=False,
            )  # fmt: skip  # (blocks_row, blocks_col, k, k, bins), one block per cell offset
            patches = np.ascontiguousarray(blocks[::k, ::k])  # (h, w, k, k, bins)
            channels.append(torch.from_numpy(patches).reshape(-1, k * k * bins))
        out.append(torch.stack(channels, dim=1))  # (L, C, k * k * bins)
    return torch.stack(out)


def blocky_images(generator: torch.Generator, size: int) -> torch.Tensor:
    """(2, 3, size, size) piecewise-constant images from a few uint8 levels: flat areas (zero
    gradients, a flat patch), exact 0 / 90 / 180-degree edges and ties, as stored pixels give."""
    levels = torch.randint(0, 4, (2, 3, size // 4, size // 4), generator=generator) * 60.0
    imgs = levels.repeat_interleave(4, dim=2).repeat_interleave(4, dim=3)
    imgs[0, :, : size // 2, : size // 2] = 100.0  # flat patches: all-zero targets
    return imgs.double() / 255


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(("patch", "cell", "bins"), [(8, 4, 9), (4, 4, 9), (4, 2, 6), (6, 3, 7)])
@pytest.mark.parametrize("kind", ["noise", "blocky"])
def test_matches_skimage_hog_per_patch(dtype, patch, cell, bins, kind):
    g = torch.Generator().manual_seed(patch * 100 + cell * 10 + bins)
    size = 4 * patch
    if kind == "noise":
        imgs = torch.randn(2, 3, size, size, generator=g, dtype=torch.float64)
    else:
        imgs = blocky_images(g, size)
    imgs = imgs.to(dtype)
    ours = hog_patches(imgs, patch, bins, cell)
    k = patch // cell
    assert ours.shape == (2, 16, 3 * k * k * bins) and ours.dtype == dtype
    expected = skimage_reference(imgs, patch, bins, cell).to(dtype)
    atol = 1e-5 if dtype == torch.float64 else 1e-4
    torch.testing.assert_close(ours.view(2, 16, 3, -1), expected, atol=atol, rtol=0)
    norms = ours.view(2, 16, 3, -1).norm(dim=-1)  # each patch and channel: unit norm or flat
    assert torch.all((norms - 1).abs() < 1e-4) if kind == "noise" else norms.min() == 0


def test_whole_image_gradients_cross_patch_borders():
    """A step on a patch border shows in both patches' histograms (the gradient of the whole
    image, as MaskFeat), where HOG of each patch alone would see two flat patches."""
    imgs = torch.zeros(1, 1, 8, 8, dtype=torch.float64)
    imgs[..., 4:] = 1.0  # a vertical edge between the two patch columns
    target = hog_patches(imgs, 4, 9, 4)  # (1, 4, 9): one cell per patch
    assert torch.all(target.argmax(dim=-1) == 0)  # horizontal gradients: orientation bin 0
    torch.testing.assert_close(target[..., 0], torch.ones(1, 4, dtype=torch.float64))


def test_invariant_to_the_per_channel_normalisation():
    """Normalised input (x - mean_c) / std_c gives the HOG of the stored pixels: each channel's
    magnitudes scale by 1 / std_c, which its L2 normalisation removes."""
    g = torch.Generator().manual_seed(1)
    pixels = torch.rand(2, 3, 16, 16, generator=g, dtype=torch.float64)
    mean = torch.tensor([0.4, 0.5, 0.6], dtype=torch.float64).view(1, 3, 1, 1)
    std = torch.tensor([0.1, 0.25, 2.0], dtype=torch.float64).view(1, 3, 1, 1)
    normalised = hog_patches((pixels - mean) / std, 4, 9, 2)
    torch.testing.assert_close(normalised, hog_patches(pixels, 4, 9, 2), atol=1e-6, rtol=0)
    assert not torch.allclose(hog_patches(pixels.flip(-1), 4, 9, 2), hog_patches(pixels, 4, 9, 2))


def test_width_default_cells_and_cell_size_check(registry):
    model = small_vit(registry)  # patch 4 on 16 x 16 RGB: 16 patches
    default = HOGTarget(HOGParams())
    assert default.cell_size(model) == 2 and default.dim(model) == 3 * 2 * 2 * 9
    assert HOGTarget(HOGParams(cell_size=4, orientations=6)).dim(model) == 3 * 1 * 6
    odd = SimpleNamespace(patch_size=5, in_chans=1)
    assert default.cell_size(odd) == 5 and default.dim(odd) == 9  # odd patch: one cell
    imgs = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    mask = Mask(*random_mask(2, 16, 0.75, generator=torch.Generator().manual_seed(0)))
    assert default(imgs, mask, model).shape == (2, 16, 108)
    bad = HOGTarget(HOGParams(cell_size=3))
    for call in (bad.dim, bad.setup):
        with pytest.raises(ValueError, match="cell_size 3 does not divide the encoder's patch_"):
            call(model)
    with pytest.raises(ValueError):
        HOGParams(orientations=0)


def test_hog_error_is_the_masked_patch_mse():
    target = HOGTarget(HOGParams())
    metric = target.metrics()["hog_error"]
    assert not metric.higher_is_better and metric.headline
    truth = torch.rand(2, 4, 6, generator=torch.Generator().manual_seed(0))
    mask = torch.tensor([[1.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0]])
    pred = truth.clone()
    pred[0, 0] += 0.5  # masked: squared error 0.25 on each of its 6 values
    pred[1, 3, :3] -= 1.0  # masked: mean squared error 0.5
    pred[0, 1] += 9.0  # visible: ignored
    scores = target.reconstruction_metrics(pred, truth, mask)
    assert scores == {"hog_error": pytest.approx((0.25 + 0 + 0.5) / 3)}


def hog_suite(**target):
    """The tiny suite's vit variant alone, predicting HOG (MSE only: laplacian reads pixels)."""
    data = tiny_suite_data(seeds=[0])
    vit = next(v for v in data["variants"] if v["name"] == "vit")
    vit.update(target={"name": "hog", **target}, loss=[{"name": "mse"}])
    data["variants"] = [vit]
    data["dataset"].update(n_pretrain=64)
    data["pretrain"].update(epochs=1)
    data["eval"] = {"reconstruction": {"num_images": 16}, "linear_probe": {"enabled": False}}
    data["primary_metric"] = "hog_error"  # ranks by it (lower is better)
    return data


def test_suite_trains_hog_and_reports_hog_error(tmp_path):
    suite = write_suite(tmp_path, hog_suite())
    result = invoke("run", str(suite), "--out", str(tmp_path / "out"), "--device", "cpu")
    assert result.exit_code == 0, result.output
    board = pd.read_csv(tmp_path / "out" / "tiny" / "leaderboard.csv").set_index("variant")
    assert 0 < board.loc["vit", "hog_error"] < 1  # unit-norm histograms: errors below 1
    assert "psnr_masked" not in board.columns or pd.isna(board.loc["vit", "psnr_masked"])


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda vit: vit["target"].update(cell_size=3),
            "cell_size 3 does not divide the encoder's patch_size 4",
        ),
        (
            lambda vit: vit["loss"].append({"name": "laplacian", "weight": 0.1}),
            "variants[0].loss[1]: laplacian reads predictions as an image, and the 'hog' target",
        ),
    ],
)
def test_validate_refuses_bad_hog_variants(tmp_path, edit, message):
    data = hog_suite()
    edit(data["variants"][0])
    result = invoke("validate", str(write_suite(tmp_path, data)))
    assert result.exit_code == 2, result.output
    assert message in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
