"""Regression tests for the figures a leaderboard reports: each failed on the code before the
"numbers you can trust" fixes (device placement, norm_pix PSNR, Laplacian masking, probe
BatchNorm, crop sampling, evaluation sample, test leakage, weight decay, logged mask ratio)."""

import dataclasses

import pandas as pd
import pytest
import torch
from mae_bench_plugins.finetune import FinetuneParams, finetune
from mae_bench_plugins.probes import LinearProbeParams, linear_probe
from mae_bench_plugins.reconstruction import ReconstructionParams, reconstruction_quality
from scipy.stats import ks_2samp
from torch import Tensor

from mae_bench.cell import evaluate_cell, pretrain_cell
from mae_bench.contract import LossInputs, Mask
from mae_bench.data import ImageFeeder, sample_crops
from mae_bench.evaluate import evaluation_sample
from mae_bench.layers import (
    masked_laplacian_error,
    patch_mask_to_pixels,
    patchify,
    random_mask,
    unpatchify,
)
from mae_bench.leaderboard import leaderboard_markdown, leaderboard_table, runs_table
from mae_bench.plan import suite_cells
from mae_bench.suite import resolve_suite
from mae_bench.train import pretrain
from tests.conftest import invoke, tiny_suite_data

CPU = torch.device("cpu")


def make(registry, kind, name, **params):
    info = registry.get(kind, name, kind)
    return info.cls(info.cls.Params(**params))


def _vit(registry, **changes):
    info = registry.get("encoder", "vit", "encoder")
    params = {"patch_size": 4, "dim": 32, "depth": 2, "heads": 2, "decoder_dim": 16, **changes}
    return info.cls(info.cls.Params(**params), image_size=16, in_chans=3)


# --------------------------------------------------------------- 1. device placement
class DeviceChecker:
    """A global forward pre-hook: every module's inputs must be where its weights are."""

    def __init__(self) -> None:
        self.mismatches: list[str] = []
        self.input_devices: set[str] = set()

    def __call__(self, module: torch.nn.Module, args: tuple) -> None:
        own = [*module.parameters(recurse=False), *module.buffers(recurse=False)]
        for t in args:
            if isinstance(t, Tensor):
                self.input_devices.add(t.device.type)
                self.mismatches += [
                    f"{type(module).__name__}: input on {t.device}, weights on {w.device}"
                    for w in own
                    if w.device != t.device
                ]


@pytest.fixture
def device_checker():
    checker = DeviceChecker()
    handle = torch.nn.modules.module.register_module_forward_pre_hook(checker)
    yield checker
    handle.remove()


def test_every_cell_runs_its_model_on_the_feeders_device(registry, device_checker):
    """The feeder's device is `meta` (no GPU here): pretrained and baseline cells must send
    inputs and weights to it alike. Meta tensors hold no data, so each cell stops at its
    first read-back; by then every model call has been checked."""
    data_cfg = tiny_suite_data()
    data_cfg["eval"]["baselines"] = True
    suite = resolve_suite(data_cfg, registry)
    data = suite.build_dataset().load()
    cpu_feeder = ImageFeeder.fit(data.pretrain, image_size=16, channels=3, device=CPU)
    feeder = dataclasses.replace(cpu_feeder, device=torch.device("meta"))
    cells = suite_cells(suite)
    assert [c.variant.baseline for c in cells] == [False, False, True, True]
    mean_image = cpu_feeder.mean_image(data.pretrain)
    for cell in cells:
        with pytest.raises((NotImplementedError, RuntimeError), match=r"(?i)meta"):
            pre = pretrain_cell(cell, suite, data, feeder)
            evaluated = evaluate_cell(
                cell, suite, data, feeder, pre.model, mean_image, list(cell.evaluations)
            )
            list(evaluated)
    assert device_checker.mismatches == []
    assert device_checker.input_devices == {"meta"}


def test_finetuning_head_follows_the_encoders_device(registry, device_checker):
    suite = resolve_suite(tiny_suite_data(), registry)
    data = suite.build_dataset().load()
    cpu_feeder = ImageFeeder.fit(data.pretrain, image_size=16, channels=3, device=CPU)
    feeder = dataclasses.replace(cpu_feeder, device=torch.device("meta"))
    model = suite.variants[1].build_model(16, 3).to("meta")  # as the runner places it
    with pytest.raises((NotImplementedError, RuntimeError), match=r"(?i)meta"):
        finetune(model, data, feeder, FinetuneParams(epochs=1), seed=0)
    assert device_checker.mismatches == [] and device_checker.input_devices == {"meta"}


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_tiny_suite_with_baselines_and_finetuning_on_cuda(tmp_path, device_checker):
    result = invoke(
        "run", "suites/tiny.yaml", "--out", str(tmp_path), "--device", "cuda",
        "--set", "eval.baselines=true", "--set", "eval.finetune.enabled=true",
        "--set", "eval.finetune.epochs=1",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert device_checker.mismatches == [] and "cuda" in device_checker.input_devices


# --------------------------------------------------------------- 2. norm_pix PSNR
def test_norm_pix_maps_back_without_the_masked_patches_statistics(registry):
    loss = make(registry, "loss", "mse", norm_pix=True)
    g = torch.Generator().manual_seed(0)
    target, pred = torch.randn(2, 16, 48, generator=g), torch.randn(2, 16, 48, generator=g)
    mask = random_mask(2, 16, 0.75, generator=g)[2]
    hidden = mask.bool()
    altered = target.clone()
    altered[hidden] = altered[hidden] * 5 + 3  # other content in the masked patches
    a, b = loss.to_input_space(pred, target, mask), loss.to_input_space(pred, altered, mask)
    assert torch.equal(a[hidden], b[hidden])
    mean, std = target.mean(-1, keepdim=True), (target.var(-1, keepdim=True) + 1e-6).sqrt()
    assert torch.allclose(a[~hidden], (pred * std + mean)[~hidden])  # visible: their own
    assert make(registry, "loss", "mse").to_input_space(pred, target, mask) is pred


def test_norm_pix_psnr_of_a_zero_predictor_is_the_visible_mean_guess(registry):
    """Predicting zeros in norm_pix space means predicting each image's visible mean: it
    must score what that guess scores, not the 15.5 dB the true patch means gave it."""
    suite = resolve_suite(tiny_suite_data(), registry)
    data = suite.build_dataset().load()
    feeder = ImageFeeder.fit(data.pretrain, image_size=16, channels=3, device=CPU)
    model = _vit(registry)
    model.forward_decoder = lambda latent, ids_restore: torch.zeros(
        len(latent), 16, 48
    )
    cfg = ReconstructionParams(num_images=32)
    images = data.test_images[:32]
    norm = reconstruction_quality(
        model, images, feeder, cfg,
        decoder_loss=make(registry, "loss", "mse", norm_pix=True),
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


# --------------------------------------------------------------- 4. uniformity pooling
def test_uniformity_spreads_the_pooled_embedding_the_probes_read(registry):
    g = torch.Generator().manual_seed(0)
    latent = torch.randn(6, 5, 8, generator=g)
    latent[:, 1:] = 1.0  # identical patch tokens, distinct cls tokens
    model = _vit(registry, dim=8)
    inputs = LossInputs(
        torch.zeros(6, 3, 16, 16), torch.zeros(6, 16, 48), torch.ones(6, 16), latent, 4,
        model.pool,
    )  # fmt: skip
    default = make(registry, "loss", "uniformity")
    assert default.params.pool == "mean" and default.summary() == "uniformity(mean)"
    assert default(inputs).item() == pytest.approx(0.0, abs=1e-6)  # collapsed mean embedding
    assert make(registry, "loss", "uniformity", pool="cls")(inputs).item() < -0.5


# --------------------------------------------------------------- 5. Laplacian masking
def test_laplacian_loss_reads_visible_truth_and_trains_masked_patches_only(registry):
    loss = make(registry, "loss", "laplacian")
    g = torch.Generator().manual_seed(0)
    imgs = torch.randn(2, 3, 16, 16, generator=g)
    mask = random_mask(2, 16, 0.5, generator=g)[2]
    target = patchify(imgs, 4)
    perfect = target.clone()
    perfect[~mask.bool()] = 9.0  # garbage where the patch is visible: not the model's job
    inputs = LossInputs(imgs, perfect, mask, torch.zeros(2, 1, 8), 4)
    assert loss(inputs).item() == pytest.approx(0.0, abs=1e-10)
    pred = (target + torch.randn(target.shape, generator=g)).requires_grad_()
    value = loss(LossInputs(imgs, pred, mask, torch.zeros(2, 1, 8), 4))
    value.backward()
    per_patch = pred.grad.abs().sum(dim=-1)
    assert torch.all(per_patch[~mask.bool()] == 0) and torch.all(per_patch[mask.bool()] > 0)
    recon = unpatchify(pred.detach(), 4, 3)
    pm = patch_mask_to_pixels(mask, 4)
    per_image = masked_laplacian_error(recon, imgs, pm)  # the hf_error metric
    weights = pm.sum(dim=(1, 2, 3))
    assert value.item() == pytest.approx(((per_image * weights).sum() / weights.sum()).item())


def test_laplacian_with_norm_pix_mse_is_refused(registry):
    data = tiny_suite_data()
    data["variants"][1]["loss"] = [{"name": "mse", "norm_pix": True}, {"name": "laplacian"}]
    with pytest.raises(Exception, match=r"variants\[1\]\.loss: .*mse\(norm_pix\).*norm_pix"):
        resolve_suite(data, registry)
    data["variants"][1]["loss"] = [{"name": "mse", "norm_pix": True}, {"name": "uniformity"}]
    resolve_suite(data, registry)  # a regularizer does not read predictions: fine


# --------------------------------------------------------------- 6. probe BatchNorm
def test_linear_probe_normalises_test_features_with_exact_training_statistics():
    """Features far from zero, a short probe: momentum-averaged running statistics would
    still sit near zero and put every test feature on one side of the boundary."""
    g = torch.Generator().manual_seed(0)
    y = torch.randint(2, (400,), generator=g)
    x = 100.0 + torch.randn(400, 4, generator=g) * 0.1
    x[:, 0] += 0.3 * (2 * y - 1)
    out, _ = linear_probe(
        x[:300], y[:300], x[300:], y[300:], LinearProbeParams(epochs=2, batch_size=50),
        num_classes=2, seed=0,
    )  # fmt: skip
    assert out["lp_acc"] > 0.9


# --------------------------------------------------------------- 7. crops as torchvision
def test_crop_boxes_follow_torchvision_random_resized_crop():
    from torchvision.transforms import RandomResizedCrop

    n, (h, w), scale, ratio = 4000, (96, 80), (0.2, 1.0), (3 / 4, 4 / 3)
    x0, y0, cw, ch = sample_crops(n, h, w, scale, ratio, torch.Generator().manual_seed(0))
    assert torch.all((x0 >= 0) & (x0 + cw <= w) & (y0 >= 0) & (y0 + ch <= h))
    assert torch.equal(cw, cw.round()) and torch.equal(x0, x0.round())
    torch.manual_seed(1)
    image = torch.zeros(3, h, w)
    ref = torch.tensor([RandomResizedCrop.get_params(image, scale, ratio) for _ in range(n)])
    ref_h, ref_w = ref[:, 2].float(), ref[:, 3].float()
    ours_area, ref_area = (cw * ch / (h * w)).numpy(), (ref_w * ref_h / (h * w)).numpy()
    assert ks_2samp(ours_area, ref_area).pvalue > 0.001
    assert ks_2samp(torch.log(cw / ch).numpy(), torch.log(ref_w / ref_h).numpy()).pvalue > 0.001
    full_ours = ((cw == w) | (ch == h)).float().mean().item()
    full_ref = ((ref_w == w) | (ref_h == h)).float().mean().item()
    assert full_ours == pytest.approx(full_ref, abs=0.02)
    # the centre-crop fallback when nothing fits: the whole image at the nearest ratio
    x0, y0, cw, ch = sample_crops(8, 10, 40, (1.0, 1.0), (1.0, 1.0))
    assert cw.tolist() == [10.0] * 8 and ch.tolist() == [10.0] * 8 and x0.tolist() == [15.0] * 8


# --------------------------------------------------------------- 8. evaluation sample
def test_evaluation_sample_is_stratified_and_fixed():
    labels = torch.arange(5).repeat_interleave(40)  # sorted by class, as an image folder
    a = evaluation_sample(labels, 50, seed=0)
    assert torch.bincount(labels[a], minlength=5).tolist() == [10] * 5
    assert torch.equal(a, evaluation_sample(labels, 50, seed=0))
    assert not torch.equal(a, evaluation_sample(labels, 50, seed=1))
    assert torch.equal(evaluation_sample(labels, 500), torch.arange(200))


# --------------------------------------------------------------- 9. test leakage
def test_pretraining_on_test_images_is_warned_and_marked(tmp_path, registry):
    import yaml

    data = tiny_suite_data(dataset={"name": "digits", "image_size": 16, "pretrain_split": "all"})
    path = tmp_path / "leak.yaml"
    path.write_text(yaml.safe_dump(data))
    result = invoke("validate", str(path))
    assert result.exit_code == 0 and "warning:" in result.stderr
    assert "pretraining (and the input normalisation) sees the test images" in result.stderr
    records = [
        {
            "variant": v, "seed": 0, "cell_id": v, "config_hash": "x", "baseline": False,
            "components": {"encoder": "e", "masking": "m", "loss": "l"},
            "metrics": {"lp_acc": acc}, "data": {"pretrain_sees_test": leak},
        }
        for v, acc, leak in (("a", 0.9, True), ("b", 0.8, False))
    ]  # fmt: skip
    board = leaderboard_table(runs_table(records), "lp_acc")
    assert board["pretrain_sees_test"].tolist() == [True, False]
    text = leaderboard_markdown(board)
    assert "| a †" in text and "| b " in text and "†: pretrained on the test images" in text
    assert invoke("validate", "suites/tiny.yaml").stderr == ""


# --------------------------------------------------------------- 10. smaller ones
def test_weight_decay_skips_tokens_by_their_qualified_names(registry):
    model = _vit(registry)
    decay_of = {id(p): g["weight_decay"] for g in model.param_groups(0.05) for p in g["params"]}
    named = dict(model.named_parameters())
    assert decay_of[id(named["encoder.cls_token"])] == 0.0
    assert decay_of[id(named["decoder.mask_token"])] == 0.0
    assert decay_of[id(named["encoder.blocks.0.attn.qkv.weight"])] == 0.05


def test_layer_norms_use_the_official_eps(registry):
    norms = [m for m in _vit(registry).modules() if isinstance(m, torch.nn.LayerNorm)]
    assert len(norms) == 2 * 2 + 1 + 2 * 2 + 1 and {m.eps for m in norms} == {1e-6}


def test_logged_mask_ratio_is_the_drawn_one(registry):
    """16 patches at ratio 0.3 hide round(16 * 0.3) = 5 of them: 0.3125, not 0.3."""
    data = tiny_suite_data()
    data["pretrain"]["epochs"] = 1
    data["variants"][1]["masking"] = {"name": "random", "ratio": 0.3}
    suite = resolve_suite(data, registry)
    ds = suite.build_dataset().load()
    feeder = ImageFeeder.fit(ds.pretrain, image_size=16, channels=3, device=CPU)
    v = suite.variants[1]
    result = pretrain(
        v.build_model(16, 3), ds.pretrain, feeder, v.build_masking(), v.build_losses(),
        suite.config.pretrain, seed=0,
    )  # fmt: skip
    assert result.history[0]["mask_ratio"] == pytest.approx(5 / 16)
    assert not hasattr(Mask, "ratio")



def test_norm_pix_variant_runs_and_reports(tmp_path):
    """End to end: the leaderboard's PSNR and the report's grid both map norm_pix back."""
    result = invoke(
        "run", "suites/tiny.yaml", "--out", str(tmp_path),
        "--set", "variants.vit.loss=[{name: mse, norm_pix: true}, {name: uniformity}]",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    runs = pd.read_csv(tmp_path / "tiny" / "runs.csv").set_index("variant")
    assert runs.loc["vit", "loss"] == "mse(norm_pix) + uniformity(mean)"
    assert 5 < runs.loc["vit", "psnr_masked"] < 40
    assert invoke("report", str(tmp_path / "tiny")).exit_code == 0
    assert (tmp_path / "tiny" / "plots" / "reconstructions.png").is_file()
