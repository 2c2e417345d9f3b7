"""Fine-tuning protocol and the no-pretraining baselines."""

import json

import numpy as np
import pandas as pd
import pytest
import torch
from mae_bench_plugins.finetune import (
    Classifier,
    FinetuneParams,
    finetune,
    label_subset,
    split_validation,
    still_rising,
)
from safetensors.torch import load_file
from timm.layers import DropPath

from mae_bench.data import ImageFeeder
from mae_bench.plan import suite_cells
from mae_bench.suite import resolve_suite
from tests.conftest import ROOT, invoke, tiny_suite_data


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
    assert scales["model.encoder.norm.weight"] == (0.5, 0.0)  # grouped with the last block
    assert scales["model.encoder.patch_embed.proj.weight"] == (0.125, 0.05)
    assert scales["model.encoder.cls_token"] == (0.125, 0.0)
    assert scales["head.weight"] == (1.0, 0.05) and scales["norm.weight"] == (1.0, 0.0)


def test_layer_decay_and_weight_decay_groups(registry):
    clf = Classifier(_vit(registry), num_classes=5, pool="cls")
    groups = clf.param_groups(weight_decay=0.05, layer_decay=0.5)
    scale_of = {}
    for group in groups:
        for p in group["params"]:
            scale_of[id(p)] = (group["lr_scale"], group["weight_decay"])
    named = dict(clf.named_parameters())
    assert scale_of[id(named["head.weight"])] == (1.0, 0.05)
    assert scale_of[id(named["head.bias"])] == (1.0, 0.0)
    assert scale_of[id(named["model.encoder.blocks.2.mlp.fc1.weight"])][0] == 0.5
    assert scale_of[id(named["model.encoder.blocks.0.mlp.fc1.weight"])][0] == 0.125
    assert scale_of[id(named["model.encoder.patch_embed.proj.weight"])][0] == 0.0625
    assert scale_of[id(named["model.encoder.cls_token"])] == (0.0625, 0.0)
    covered = {id(p) for g in groups for p in g["params"]}
    assert covered == {id(p) for p in clf.parameters()}


def test_drop_path_rises_linearly(registry):
    model = _vit(registry, depth=3)
    model.set_drop_path(0.2)
    rates = [getattr(b.drop_path1, "drop_prob", 0.0) for b in model.encoder.blocks]
    assert rates == pytest.approx([0.0, 0.1, 0.2])
    assert isinstance(model.encoder.blocks[2].drop_path2, DropPath)


def test_finetune_learns_from_few_labels(registry):
    suite = resolve_suite(tiny_suite_data(dataset={"name": "digits", "image_size": 16}), registry)
    data = suite.build_dataset().load()
    feeder = ImageFeeder.fit(data.pretrain, image_size=16, channels=3, device=torch.device("cpu"))
    torch.manual_seed(0)
    model = suite.variants[0].build_model(16, 3)  # the MLP: fast
    cfg = FinetuneParams(
        epochs=12, lr=3e-3, warmup_epochs=1, label_fraction=0.3, eval_every=4
    )
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


def test_baseline_cells_skip_pretraining_in_their_key(registry):
    data = tiny_suite_data()
    data["eval"]["baselines"] = True
    cells = suite_cells(resolve_suite(data, registry))
    assert [c.variant.name for c in cells] == ["mlp", "vit", "random-init-mlp", "random-init-vit"]
    data["pretrain"]["epochs"] = 9
    again = suite_cells(resolve_suite(data, registry))
    assert cells[2].cell_id == again[2].cell_id and cells[0].cell_id != again[0].cell_id
    data["variants"][1]["encoder"] = dict(data["variants"][0]["encoder"])
    data["variants"][1]["masking"] = {"name": "random"}
    same_encoder = suite_cells(resolve_suite(data, registry))
    assert [c.variant.name for c in same_encoder][-1] == "random-init"


def test_suite_with_finetune_and_baselines(tmp_path):
    suite = ROOT / "suites" / "tiny.yaml"
    common = ["--out", str(tmp_path / "a"), "--set", "eval.finetune.epochs=2"]
    result = invoke(
        "run",
        str(suite),
        *common,
        "--set",
        "eval.finetune.enabled=true",
        "--set",
        "eval.baselines=true",
    )
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
    # headline columns: fine-tuning where it ran, else the linear probe
    assert rows.loc["vit", "f1_macro"] == rows.loc["vit", "ft_f1_macro"]
    assert rows.loc["scratch-vit", "auc"] == rows.loc["scratch-vit", "ft_auc"]
    assert rows.loc["random-init-vit", "f1_macro"] == rows.loc["random-init-vit", "lp_f1_macro"]
    board = pd.read_csv(root / "leaderboard.csv")
    assert {"ft_acc", "ft_f1_macro", "ft_auc", "ft_acc_ci95"} <= set(board.columns)
    # fine-tuning works on a copy: the stored encoder is the pretrained one
    plain = invoke("run", str(suite), "--out", str(tmp_path / "b"))
    assert plain.exit_code == 0
    for name in ("mlp", "vit"):
        (a,) = (root / "cells").glob(f"{name}-seed0-*")
        (b,) = (tmp_path / "b" / "tiny" / "cells").glob(f"{name}-seed0-*")
        wa, wb = load_file(a / "encoder.safetensors"), load_file(b / "encoder.safetensors")
        assert all(torch.equal(wa[k], wb[k]) for k in wa)
        assert list(a.glob("evals/finetune-*/finetune.csv")) and not list(b.glob("evals/fine*"))
    record = json.loads(next((root / "cells").glob("random-init-vit-*/pretrain.json")).read_text())
    assert record["baseline"] is True and "pretrain" not in record["config"]
    result = invoke("report", str(root))
    assert result.exit_code == 0, result.output + str(result.exception)
    assert (root / "plots" / "finetune_curves.png").stat().st_size > 5_000
    assert (root / "plots" / "tsne.png").stat().st_size > 5_000
