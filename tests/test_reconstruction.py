"""The reconstruction evaluator (plugins/reconstruction.py): PSNR over the masked patches in
pixels, whatever space the loss predicts in, on fixed or the variant's own masks."""

import json

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
    model.forward_decoder = lambda latent, ids_restore: torch.zeros(
        len(latent), 16, 48
    )
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
    assert "only run: reconstruction" in result.stderr
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
