"""Pictures of each variant's own masks (the reconstruction evaluator's ``masks`` and
``mask_images`` tables, drawn as ``plots/variant_masks.png``), and the reconstruction
grid drawn with the variant's own masks when ``eval.reconstruction.masks: variant``."""

from types import SimpleNamespace

import matplotlib.image
import torch
from mae_bench_plugins.reconstruction import (
    MASK_PICTURE_IMAGES,
    ReconstructionEvaluator,
    ReconstructionParams,
)

from mae_bench.contract import call_masking
from mae_bench.data import ImageFeeder
from mae_bench.evaluate import evaluation_masks, fixed_masks
from mae_bench.suite import resolve_suite
from tests.conftest import invoke, make_component, small_vit, tiny_suite_data, write_suite

CPU = torch.device("cpu")


def evaluate_with(registry, masking, **params):
    """The reconstruction evaluator's result on a 4 x 4 patch grid with ``masking``."""
    suite = resolve_suite(tiny_suite_data(), registry)
    data = suite.build_dataset().load()
    feeder = ImageFeeder.fit(data.pretrain, image_size=16, channels=3, device=CPU)
    ctx = SimpleNamespace(
        data=data, model=small_vit(registry), feeder=feeder, masking=masking,
        mean_image=feeder.mean_image(data.pretrain),
        decoder_loss=make_component(registry, "loss", "mse"), target=None,
    )  # fmt: skip
    return ReconstructionEvaluator(ReconstructionParams(num_images=16, **params)).evaluate(ctx)


def test_masks_table_of_random_masking_holds_the_variants_own_masks(registry):
    masking = make_component(registry, "masking", "random", ratio=0.75)
    tables = evaluate_with(registry, masking).tables
    masks = tables["masks"]
    assert set(masks["progress"]) == {1.0} and set(masks["ratio"]) == {0.75}
    assert sorted(set(masks["image"])) == list(range(MASK_PICTURE_IMAGES))
    per_image = masks.groupby("image")["masked"]
    assert (per_image.count() == 16).all() and (per_image.sum() == 12).all()  # 12 of 4 x 4
    drawn = call_masking(masking, MASK_PICTURE_IMAGES, (4, 4), progress=1.0,
                         generator=torch.Generator().manual_seed(0), device=None)  # fmt: skip
    stored = torch.tensor(masks.sort_values(["image", "patch"])["masked"].to_numpy())
    assert torch.equal(stored.view(MASK_PICTURE_IMAGES, 16).float(), drawn.mask)
    assert (masks["row"] * 4 + masks["col"] == masks["patch"]).all()  # row-major patches
    pixels = tables["mask_images"]
    assert len(pixels) == MASK_PICTURE_IMAGES * 16 * 16
    assert pixels[["c0", "c1", "c2"]].stack().between(0, 1).all()


def test_masks_table_of_a_curriculum_shows_its_start_and_end(registry):
    masking = make_component(registry, "masking", "curriculum", start=0.5, end=0.75)
    masks = evaluate_with(registry, masking).tables["masks"]
    masked = masks.groupby(["progress", "image"])["masked"].sum()
    assert set(masked.loc[0.0]) == {8} and set(masked.loc[1.0]) == {12}  # 50% then 75%
    assert dict(masks.groupby("progress")["ratio"].first()) == {0.0: 0.5, 1.0: 0.75}


def test_variant_masks_are_the_variants_own_not_the_fixed_random_ones(registry):
    block = make_component(registry, "masking", "block", ratio=0.5)
    model = small_vit(registry)  # a 4 x 4 patch grid
    own = evaluation_masks(model, 8, ratio=0.75, seed=3, masking=block)
    drawn = call_masking(block, 8, (4, 4), progress=1.0,
                         generator=torch.Generator().manual_seed(3), device=None)  # fmt: skip
    assert torch.equal(own.mask, drawn.mask) and set(own.mask.sum(dim=1).tolist()) == {8}
    fixed = evaluation_masks(model, 8, ratio=0.75, seed=3, masking=None)
    assert torch.equal(fixed.mask, fixed_masks(8, 16, 0.75, 3).mask)


def test_report_draws_each_variants_masks(tiny_run_copy):
    result = invoke("report", str(tiny_run_copy.root))
    assert result.exit_code == 0, result.output
    picture = matplotlib.image.imread(tiny_run_copy.root / "plots" / "variant_masks.png")
    assert picture.ndim == 3 and picture.shape[0] > 100 and picture.std() > 0.05
    page = (tiny_run_copy.root / "report.html").read_text()
    assert 'alt="variant_masks" src="data:image/png;base64,' in page


def test_reconstruction_grid_uses_the_variants_masks(tmp_path, monkeypatch):
    """With ``masks: variant`` each variant's row of ``reconstructions.png`` is drawn with
    the masks its metrics were measured on (here 50% random, not the fixed 75%)."""
    import mae_bench.plots

    data = tiny_suite_data(seeds=[0])
    data["variants"] = [v for v in data["variants"] if v["name"] == "vit"]
    data["variants"][0]["masking"] = {"name": "random", "ratio": 0.5}
    data["eval"]["reconstruction"] = {"num_images": 16, "masks": "variant"}
    result = invoke("run", str(write_suite(tmp_path, data)), "--out", str(tmp_path / "out"))
    assert result.exit_code == 0, result.output
    drawn = []
    real = mae_bench.plots.reconstruct

    def recording(model, x, mask, decoder_loss, target=None):
        drawn.append(mask)
        return real(model, x, mask, decoder_loss, target)

    monkeypatch.setattr(mae_bench.plots, "reconstruct", recording)
    assert invoke("report", str(tmp_path / "out" / "tiny")).exit_code == 0
    (mask,) = drawn
    assert set(mask.mask.sum(dim=1).tolist()) == {8}  # 50% of 16 patches, the variant's
