"""The reconstruction evaluator (plugins/reconstruction.py): PSNR over the masked patches in
pixels, whatever space the loss predicts in, on fixed or the variant's own masks."""

import json
import re

import pandas as pd
import pytest
import torch
from mae_bench_plugins.reconstruction import ReconstructionParams, reconstruction_quality

from mae_bench.data import ImageFeeder
from mae_bench.layers import patch_mask_to_pixels, patchify, random_mask
from mae_bench.suite import resolve_suite
from tests.conftest import invoke, make_component, small_vit, tiny_suite_data, write_suite

CPU = torch.device("cpu")


def vit_only_suite(folder):
    """The tiny suite's vit variant alone (the assertions below read only it)."""
    data = tiny_suite_data()
    data["variants"] = [v for v in data["variants"] if v["name"] == "vit"]
    return write_suite(folder, data)


def test_norm_pix_psnr_of_a_zero_predictor_is_the_visible_mean_guess(registry):
    """Predicting zeros in norm_pix space means predicting each image's visible mean: it
    must score what that guess scores, not the 15.5 dB the true patch means gave it."""
    suite = resolve_suite(tiny_suite_data(), registry)
    data = suite.build_dataset().load()
    feeder = ImageFeeder.fit(data.pretrain, image_size=16, channels=3, device=CPU)
    model = small_vit(registry)
    model.forward_decoder = lambda latent, ids_restore: torch.zeros(len(latent), 16, 48)
    cfg = ReconstructionParams(num_images=32)
    images = data.test_images[:32]
    norm = reconstruction_quality(
        model, images, feeder, cfg,
        decoder_loss=make_component(registry, "loss", "mse", norm_pix=True),
        mean_image=feeder.mean_image(data.pretrain),
    )  # fmt: skip
    x = feeder(images)
    masks = random_mask(32, 16, 0.75, generator=torch.Generator().manual_seed(cfg.mask_seed))[2]
    visible = patchify(x, 4)[~masks.bool()].view(32, 4, 48)
    guess = visible.mean(dim=-1).mean(dim=1)  # mean of the visible patches' means
    recon = feeder.to_pixels(guess.view(32, 1, 1, 1).expand_as(x))
    truth = feeder.to_pixels(x)
    pm = patch_mask_to_pixels(masks, 4)
    mse = (((recon - truth) ** 2) * pm).sum(dim=(1, 2, 3)) / (pm.sum(dim=(1, 2, 3)) * 3)
    expected = (10 * torch.log10(1 / mse)).mean().item()
    assert norm["psnr_masked"] == pytest.approx(expected, abs=1e-3)


def test_reconstruction_can_use_each_variants_own_masks(tmp_path):
    suite, out = vit_only_suite(tmp_path), tmp_path / "out"
    common = ["--set", "variants.vit.masking={name: random, ratio: 0.5}", "--set", "seeds=[0]"]
    scores = {}
    for masks in ("random", "variant"):  # the second re-runs reconstruction alone
        result = invoke("run", str(suite), "--out", str(out), *common,
                        "--set", f"eval.reconstruction.masks={masks}")  # fmt: skip
        assert result.exit_code == 0, result.output
        (cell,) = (out / "tiny" / "cells").glob("vit-*")
        stored = [json.loads(p.read_text()) for p in cell.glob("evals/recon*/result.json")]
        (evaluation,) = [e for e in stored if e["config"]["evaluator"]["masks"] == masks]
        scores[masks] = evaluation["metrics"]["psnr_masked"]
        assert evaluation["sanity"]["masks"] == masks  # stored with the result
    assert re.search(r"only runs?: reconstruction", result.stderr)  # one cell: "runs"
    assert scores["random"] != scores["variant"]  # 75% random masks vs the variant's own 50%


def test_norm_pix_variant_runs_and_reports(tmp_path):
    """End to end: the leaderboard's PSNR and the report's grid both map norm_pix back."""
    result = invoke(
        "run", str(vit_only_suite(tmp_path)), "--out", str(tmp_path),
        "--set", "variants.vit.loss=[{name: mse, norm_pix: true}, {name: uniformity}]",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    runs = pd.read_csv(tmp_path / "tiny" / "runs.csv").set_index("variant")
    assert runs.loc["vit", "loss"] == "mse(norm_pix) + uniformity(mean)"
    assert 5 < runs.loc["vit", "psnr_masked"] < 40
    assert invoke("report", str(tmp_path / "tiny")).exit_code == 0
    assert (tmp_path / "tiny" / "plots" / "reconstructions.png").is_file()


def test_reconstruction_below_the_mean_image_is_warned_in_its_sanity(registry):
    """A model whose masked patches are worse than the mean training image: its result says
    so, with the sample it was measured on."""
    from types import SimpleNamespace

    from mae_bench_plugins.reconstruction import ReconstructionEvaluator

    suite = resolve_suite(tiny_suite_data(), registry)
    data = suite.build_dataset().load()
    feeder = ImageFeeder.fit(data.pretrain, image_size=16, channels=3, device=CPU)
    model = small_vit(registry)
    model.forward_decoder = lambda latent, ids_restore: torch.full((len(latent), 16, 48), 5.0)
    ctx = SimpleNamespace(
        data=data, model=model, feeder=feeder, masking=None,
        mean_image=feeder.mean_image(data.pretrain),
        decoder_loss=make_component(registry, "loss", "mse"),
        target=None,
    )  # fmt: skip
    result = ReconstructionEvaluator(ReconstructionParams(num_images=24)).evaluate(ctx)
    scores, sanity = result.metrics, result.sanity
    assert scores["psnr_masked"] < scores["psnr_mean_image"]
    assert sanity["n_images"] == 24 and sanity["masks"] == "random"
    (warning,) = sanity["warnings"]
    assert warning.startswith(
        f"psnr_masked {scores['psnr_masked']:.2f} dB is below psnr_mean_image"
    )


def test_reconstruction_above_its_floor_warns_of_nothing():
    from mae_bench_plugins.reconstruction import reconstruction_sanity

    above = {"psnr_masked": 21.0, "psnr_full": 25.0, "hf_error": 0.1, "psnr_mean_image": 18.0}
    assert reconstruction_sanity(above, 512, "random")["warnings"] == []
    below = reconstruction_sanity({**above, "psnr_masked": 17.5}, 512, "random")
    assert below["warnings"] == [
        "psnr_masked 17.50 dB is below psnr_mean_image 18.00 dB: predicting the mean training "
        "image reconstructs the masked patches better than this model"
    ]


def test_reconstruction_metrics_declare_what_is_compared(registry):
    from mae_bench_plugins.reconstruction import ReconstructionEvaluator

    metrics = ReconstructionEvaluator(ReconstructionParams()).metrics()
    assert metrics["psnr_mean_image"].compare is False  # a floor, not a result
    assert metrics["psnr_masked"].compare and metrics["hf_error"].bounds == (0, None)
