"""Fine-tuning (plugins/finetune.py): label subsets, layer-wise lr decay, budgets and
regularisers, the device, and a suite with fine-tuning and the no-pretraining baselines."""

import dataclasses
import json
import re

import numpy as np
import pandas as pd
import pytest
import torch
from mae_bench_plugins.finetune import (
    Classifier,
    FinetuneParams,
    convergence,
    finetune,
    label_subset,
    split_validation,
    still_rising,
)
from safetensors.torch import load_file

from mae_bench.data import ImageFeeder
from mae_bench.suite import resolve_suite
from tests.conftest import ROOT, invoke, tiny_suite_data

CPU = torch.device("cpu")


def test_label_subset_is_stratified_and_per_seed():
    labels = torch.arange(10).repeat_interleave(20)
    a, b = label_subset(labels, 0.1, seed=0), label_subset(labels, 0.1, seed=1)
    assert len(a) == 20 and torch.bincount(labels[a], minlength=10).tolist() == [2] * 10
    assert not torch.equal(a, b) and torch.equal(a, label_subset(labels, 0.1, seed=0))
    assert torch.equal(label_subset(labels, 1.0, seed=3), torch.arange(200))


def _vit(registry, depth=3, decoder_depth=2):
    info = registry.get("encoder", "vit", "encoder")
    params = info.cls.Params(
        patch_size=4, dim=32, depth=depth, heads=2, decoder_depth=decoder_depth
    )
    return info.cls(params, image_size=16, in_chans=3)


def _scales(clf, groups):
    scale_of = {}
    for group in groups:
        for p in group["params"]:
            scale_of[id(p)] = (group["lr_scale"], group["weight_decay"])
    return {name: scale_of[id(p)] for name, p in clf.named_parameters()}


def test_layer_decay_counts_encoder_blocks_only(registry):
    """Encoder depth 2, decoder depth 4: the last encoder block gets layer_decay ** 1."""
    clf = Classifier(_vit(registry, depth=2, decoder_depth=4), num_classes=5, pool="mean")
    assert not any("decoder" in name for name, _ in clf.named_parameters())
    scales = _scales(clf, clf.param_groups(weight_decay=0.05, layer_decay=0.5))
    assert scales["model.encoder.blocks.1.attn.qkv.weight"] == (0.5, 0.05)
    assert scales["model.encoder.blocks.0.attn.qkv.weight"] == (0.25, 0.05)
    assert scales["model.encoder.norm.weight"] == (1.0, 0.0)  # above the blocks, as official
    assert scales["model.encoder.patch_embed.proj.weight"] == (0.125, 0.05)
    assert scales["model.encoder.cls_token"] == (0.125, 0.0)
    assert scales["head.weight"] == (1.0, 0.05) and scales["norm.weight"] == (1.0, 0.0)


def official_lr_scale(name: str, depth: int, decay: float) -> float:
    """The layer-wise lr scale of a Classifier parameter, by the official MAE rule
    (``param_groups_lrd``: the stem is layer 0, block i layer i + 1, the head layer
    depth + 1 at scale 1; layer k gets decay ** (depth + 1 - k); anything else, the encoder's
    final norm included, is layer depth + 1), written out from the parameter's name."""
    if not name.startswith("model.encoder."):  # the classifier's own norm and head
        return 1.0
    rest = name.removeprefix("model.encoder.")
    block = re.match(r"blocks\.(\d+)\.", rest)
    if block:
        return decay ** (depth + 1 - (int(block.group(1)) + 1))
    if rest.startswith("norm."):
        return 1.0  # not stem, not a block: layer depth + 1, as the head
    assert rest.startswith(("patch_embed.", "cls_token", "pos_embed")), name  # the stem
    return decay ** (depth + 1)


@pytest.mark.parametrize(("depth", "pool", "decay"), [(3, "cls", 0.5), (2, "mean", 0.75)])
def test_layer_decay_and_weight_decay_groups(registry, depth, pool, decay):
    clf = Classifier(_vit(registry, depth=depth), num_classes=5, pool=pool)
    groups = clf.param_groups(weight_decay=0.05, layer_decay=decay)
    scales = _scales(clf, groups)
    for name, param in clf.named_parameters():
        no_decay = param.ndim <= 1 or name == "model.encoder.cls_token"
        expected = (official_lr_scale(name, depth, decay), 0.0 if no_decay else 0.05)
        assert scales[name] == pytest.approx(expected), name
    covered = [id(p) for g in groups for p in g["params"]]
    assert sorted(covered) == sorted(id(p) for p in clf.parameters())  # each exactly once
    if (depth, decay) == (3, 0.5):  # the same, spelt out
        assert scales["head.weight"] == (1.0, 0.05) and scales["head.bias"] == (1.0, 0.0)
        assert scales["model.encoder.blocks.2.mlp.fc1.weight"][0] == 0.5
        assert scales["model.encoder.blocks.0.mlp.fc1.weight"][0] == 0.125
        assert scales["model.encoder.patch_embed.proj.weight"][0] == 0.0625
        assert scales["model.encoder.cls_token"] == (0.0625, 0.0)


def test_finetune_learns_from_few_labels(registry):
    suite = resolve_suite(tiny_suite_data(dataset={"name": "digits", "image_size": 16}), registry)
    data = suite.build_dataset().load()
    feeder = ImageFeeder.fit(data.pretrain, image_size=16, channels=3, device=torch.device("cpu"))
    torch.manual_seed(0)
    model = suite.variants[0].build_model(16, 3)  # the MLP: fast
    cfg = FinetuneParams(epochs=12, lr=3e-3, warmup_epochs=1, label_fraction=0.3, eval_every=4)
    metrics, history, probs = finetune(model, data, feeder, cfg, seed=0)
    assert metrics["ft_acc"] > 0.4  # chance: 0.1
    assert metrics["ft_train_images"] + metrics["ft_val_images"] == pytest.approx(431, abs=1)
    assert metrics["ft_val_images"] == pytest.approx(0.2 * 431, abs=1)
    assert [h["epoch"] for h in history] == list(range(1, 13))
    assert [h["epoch"] for h in history if "test_acc" in h] == [4, 8, 12]
    assert all("val_acc" in h for h in history)
    # the checkpoint kept is the best validation epoch (never chosen on the test set)
    kept = int(metrics["ft_epoch"])
    assert history[kept - 1]["val_acc"] == max(h["val_acc"] for h in history)
    assert metrics["ft_val_acc"] == history[kept - 1]["val_acc"] and metrics["ft_epochs"] == 12
    assert metrics["ft_converged"] in (0.0, 1.0)
    assert history[-1]["test_acc"] > history[3]["test_acc"]
    assert history[-1]["loss"] < history[0]["loss"]
    assert probs.shape == (len(data.test_labels), 10)


def test_validation_split_and_convergence_rule():
    labels = torch.arange(4).repeat_interleave(10)
    fit, val = split_validation(labels, 0.2, seed=0)
    assert len(val) == 8 and torch.bincount(labels[val]).tolist() == [2, 2, 2, 2]
    assert set(fit.tolist()).isdisjoint(val.tolist()) and len(fit) + len(val) == 40
    assert len(split_validation(labels, 0.0, seed=0)[1]) == 0
    assert still_rising([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8], 0.01) is True
    assert still_rising([0.5, 0.7, 0.8, 0.8, 0.81, 0.8, 0.8, 0.8], 0.01) is False
    assert still_rising([0.5, 0.6], 0.01) is None


@pytest.mark.parametrize("k", range(6, 28))
def test_a_gain_of_exactly_one_validation_image_is_not_still_rising(k):
    """Accuracies as fine-tuning measures them (float32) on 29 validation images: the last
    epoch one image better than the best before is converged, at every level (float64 1/n
    against float32 accuracies called 16 of these levels "still rising")."""
    labels = torch.arange(10).repeat(3)[:29]  # majority: 3 images
    right = [k - 3, k - 2, k - 1, k, k, k, k, k + 1]
    scores = [float(torch.tensor(r / 29, dtype=torch.float32)) for r in right]
    assert convergence(scores, labels, tolerance=0.01) == (1.0, 1.0)
    two_up = [*scores[:-1], float(torch.tensor((k + 2) / 29, dtype=torch.float32))]
    assert convergence(two_up, labels, tolerance=0.01) == (0.0, 1.0)


def test_a_run_that_never_learned_is_flagged_not_converged():
    labels = torch.tensor([0] * 6 + [1] * 4)  # majority: 6 of 10
    flat = [0.6, 0.6, 0.5, 0.6, 0.6, 0.6, 0.6, 0.6]  # best epoch 1, the majority class
    assert convergence(flat, labels, tolerance=0.01) == (
        pytest.approx(float("nan"), nan_ok=True),
        0.0,
    )
    converged, learned = convergence([0.6, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9], labels, 0.01)
    assert (converged, learned) == (1.0, 1.0)
    assert all(np.isnan(convergence([], labels[:0], 0.01)))


def test_a_step_budget_runs_exactly_those_steps_and_mixup_mixes_every_batch(registry, monkeypatch):
    from timm.data import Mixup

    suite = resolve_suite(tiny_suite_data(), registry)
    data = suite.build_dataset().load()
    feeder = ImageFeeder.fit(data.pretrain, image_size=16, channels=3, device=CPU)
    model = suite.variants[0].build_model(16, 3)
    optimizer_steps = []
    monkeypatch.setattr(torch.optim.AdamW, "step", lambda self, *a, **k: optimizer_steps.append(1))
    cfg = FinetuneParams(steps=4, batch_size=16, label_fraction=0.5, val_fraction=0.25)
    metrics, history, _ = finetune(model, data, feeder, cfg, seed=0)  # 3 batches an epoch
    assert len(optimizer_steps) == 4 and history[-1]["step"] == 4
    assert metrics["ft_epochs"] == 2 and len(history) == 2
    mixed = []
    real_call = Mixup.__call__

    def counting(self, x, y):
        mixed.append(len(x))
        return real_call(self, x, y)

    monkeypatch.setattr(Mixup, "__call__", counting)
    optimizer_steps.clear()
    cfg = FinetuneParams(epochs=2, batch_size=15, label_fraction=0.5, val_fraction=0.25, mixup=0.8)
    finetune(model, data, feeder, cfg, seed=0)
    assert mixed and len(mixed) == len(optimizer_steps)  # every batch mixed
    assert all(n == 14 for n in mixed)  # even batches; the last partial one dropped


def test_budgets_scratch_and_regularisers(registry):
    suite = resolve_suite(tiny_suite_data(), registry)
    data = suite.build_dataset().load()
    feeder = ImageFeeder.fit(data.pretrain, image_size=16, channels=3, device=torch.device("cpu"))
    model = suite.variants[0].build_model(16, 3)
    cfg = FinetuneParams(epochs=2, steps=9, scratch_epochs=5, batch_size=16, label_fraction=0.5,
                         val_fraction=0.25, label_smoothing=0.1, mixup=0.8, cutmix=1.0,
                         randaugment=True)  # fmt: skip
    metrics, history, _ = finetune(model, data, feeder, cfg, seed=0)
    assert metrics["ft_epochs"] == 3 and len(history) == 3  # 9 steps, 48 images in 3 batches
    scratch, _, _ = finetune(model, data, feeder, cfg, seed=0, baseline=True)
    assert scratch["ft_epochs"] == 5  # the scratch baseline's own budget
    assert all(np.isfinite(h["loss"]) for h in history) and 0 <= metrics["ft_acc"] <= 1


def test_finetuning_head_follows_the_encoders_device(registry, device_checker):
    suite = resolve_suite(tiny_suite_data(), registry)
    data = suite.build_dataset().load()
    cpu_feeder = ImageFeeder.fit(data.pretrain, image_size=16, channels=3, device=CPU)
    feeder = dataclasses.replace(cpu_feeder, device=torch.device("meta"))
    model = suite.variants[1].build_model(16, 3).to("meta")  # as the runner places it
    with pytest.raises((NotImplementedError, RuntimeError), match=r"(?i)meta"):
        finetune(model, data, feeder, FinetuneParams(epochs=1), seed=0)
    assert device_checker.mismatches == [] and device_checker.input_devices == {"meta"}


@pytest.mark.slow
def test_suite_with_finetune_and_baselines(tmp_path, tiny_run):
    suite = ROOT / "suites" / "tiny.yaml"
    result = invoke(
        "run", str(suite), "--out", str(tmp_path / "a"), "--device", "cpu",
        "--set", "eval.finetune.epochs=2", "--set", "eval.finetune.enabled=true",
        "--set", "eval.baselines=true",
    )  # fmt: skip
    assert result.exit_code == 0, result.output + str(result.exception)
    root = tmp_path / "a" / "tiny"
    runs = pd.read_csv(root / "runs.csv")
    assert set(runs["variant"]) == {
        "mlp",
        "vit",
        "random-init-mlp",
        "random-init-vit",
        "scratch-mlp",
        "scratch-vit",
    }
    rows = runs.set_index("variant")
    assert pd.isna(rows.loc["random-init-vit", "ft_acc"]) and pd.isna(
        rows.loc["scratch-vit", "lp_acc"]
    )
    assert pd.isna(rows.loc["random-init-vit", "psnr_masked"]) and rows.loc["vit", "ft_acc"] >= 0
    # a summary column copies one evaluator (fine-tuning here), never the linear probe's
    # value on rows without fine-tuning (issue 17, item 3)
    assert rows.loc["vit", "f1_macro"] == rows.loc["vit", "ft_f1_macro"]
    assert rows.loc["scratch-vit", "auc"] == rows.loc["scratch-vit", "ft_auc"]
    assert pd.isna(rows.loc["random-init-vit", "f1_macro"])
    board = pd.read_csv(root / "leaderboard.csv")
    assert {"ft_acc", "ft_f1_macro", "ft_auc", "ft_acc_ci95"} <= set(board.columns)
    # fine-tuning works on a copy: the stored encoder is the pretrained one (the shared
    # tiny run pretrained the same cells, without fine-tuning)
    for name in ("mlp", "vit"):
        (a,) = (root / "cells").glob(f"{name}-seed0-*")
        b = tiny_run.cells()[f"{name}-seed0"]
        assert a.name == b.name
        wa, wb = load_file(a / "encoder.safetensors"), load_file(b / "encoder.safetensors")
        assert all(torch.equal(wa[k], wb[k]) for k in wa)
        assert list(a.glob("evals/finetune-*/finetune.csv")) and not list(b.glob("evals/fine*"))
    record = json.loads(next((root / "cells").glob("random-init-vit-*/pretrain.json")).read_text())
    assert record["baseline"] is True and "pretrain" not in record["config"]
    result = invoke("report", str(root))
    assert result.exit_code == 0, result.output + str(result.exception)
    assert (root / "plots" / "finetune_curves.png").stat().st_size > 5_000
    assert (root / "plots" / "tsne.png").stat().st_size > 5_000
