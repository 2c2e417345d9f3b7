"""Every shipped dataset suite (suites/*.yaml) end to end through the CLI, on tiny fixtures
in the official formats, shrunk with --set."""


import pandas as pd
import pytest

from tests.conftest import ROOT, cell_record, invoke
from tests.formats import write_cifar10, write_imagefolder, write_stl10

SMALL = [
    "--set",
    "pretrain.epochs=1",
    "--set",
    "pretrain.batch_size=8",
    "--set",
    "seeds=[0]",
    "--set",
    "eval.linear_probe.epochs=2",
    "--set",
    "eval.reconstruction.num_images=8",
    "--set",
    "eval.finetune.epochs=1",
]
# 3 thresholds, not 15, in the one-vs-rest analysis of the 10-class sets (its cost grows with
# both); the image-folder suites keep theirs: their tables are checked
FEW_THRESHOLDS = ["--set", "eval.thresholds={start: 0.15, stop: 0.85, step: 0.35}"]


def run_suite(name, out, *overrides):
    result = invoke(
        "run",
        str(ROOT / "suites" / f"{name}.yaml"),
        "--out",
        str(out),
        "--device",
        "cpu",
        *SMALL,
        *overrides,
    )
    assert result.exit_code == 0, result.output + str(result.exception)
    return result


def finished(out, suite):
    runs = pd.read_csv(out / suite / "runs.csv")
    pretrained = runs[runs["psnr_masked"].notna()]
    assert len(pretrained) and pretrained["lp_acc"].between(0, 1).all()
    assert (pretrained["psnr_masked"] > 0).all()
    assert runs["lp_acc"].dropna().between(0, 1).all()
    return runs


@pytest.mark.slow
def test_stl10_suite(tmp_path):
    write_stl10(tmp_path / "data")
    run_suite(
        "stl10", tmp_path / "out", "--set", f"dataset.root={tmp_path / 'data'}",
        "--set", "dataset.image_size=32",  # the shipped model, on smaller images
        *FEW_THRESHOLDS,
    )  # fmt: skip
    runs = finished(tmp_path / "out", "stl10")
    assert sorted(runs["variant"]) == ["mae-improved", "mae-original", "random-init", "scratch"]
    assert runs["ft_acc"].notna().sum() == 3  # the two variants and scratch


@pytest.mark.slow
def test_stl10_vitb_suite_shrunk(tmp_path):
    write_stl10(tmp_path / "data")
    run_suite(
        "stl10_vitb",
        tmp_path / "out",
        *FEW_THRESHOLDS,
        "--set",
        f"dataset.root={tmp_path / 'data'}",
        "--set",
        "dataset.image_size=64",
        "--set",
        "dataset.pretrain_split=train+unlabeled",
        "--set",
        "variants.vitb-l1.encoder.model_args={depth: 1}",
        "--set",
        "variants.vitb-l1.encoder.decoder_depth=1",
    )
    (cell,) = (tmp_path / "out" / "stl10-vitb" / "cells").glob("vitb-l1-*")
    record = cell_record(cell)
    assert record["components"]["encoder"] == "timm(vit_base_patch16_224)"
    assert record["config"]["dataset"]["pretrain_split"] == "train+unlabeled"


@pytest.mark.slow
def test_cifar10_suite(tmp_path):
    write_cifar10(tmp_path / "data")
    run_suite(
        "cifar10",
        tmp_path / "out",
        *FEW_THRESHOLDS,
        "--set",
        f"dataset.root={tmp_path / 'data'}",
        "--set",
        "variants=[{name: vit, encoder: {name: vit, patch_size: 4, dim: 32, "
        "depth: 1, heads: 2, decoder_dim: 32, decoder_depth: 1}}]",
    )
    assert sorted(finished(tmp_path / "out", "cifar10")["variant"]) == [
        "random-init",
        "scratch",
        "vit",
    ]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("suite", "classes"),
    [("cats_dogs", ("cat", "dog")), ("medical_binary", ("abnormal", "normal"))],
)
def test_imagefolder_suites(tmp_path, suite, classes):
    write_imagefolder(tmp_path / "images", classes=classes, per_class=10)
    out = tmp_path / "out"
    run_suite(
        suite,
        out,
        "--set",
        f"dataset.root={tmp_path / 'images'}",
        "--set",
        f"dataset.cache_dir={tmp_path / 'cache'}",
    )
    runs = finished(out, suite.replace("_", "-"))
    assert len(runs) == (2 if suite == "cats_dogs" else 1) + (4 if suite == "cats_dogs" else 2)
    md = (out / suite.replace("_", "-") / "leaderboard.md").read_text()
    positive = "dog" if suite == "cats_dogs" else "abnormal"
    assert "## Threshold analysis" in md and f"(positive: {positive})" in md
    table = pd.read_csv(next((out / suite.replace("_", "-") / "thresholds").iterdir()))
    assert table["threshold"].round(2).tolist()[0] == 0.15 and len(table) == 15
    assert set(table["class"]) == {positive}
    assert "lp_youden_threshold" in runs.columns
    result = invoke("report", str(out / suite.replace("_", "-")))
    assert result.exit_code == 0, result.output + str(result.exception)
    plots = {p.name for p in (out / suite.replace("_", "-") / "plots").glob("*.png")}
    assert {"roc.png", "thresholds.png", "reconstructions.png"} <= plots


def test_missing_dataset_is_one_clear_error_and_writes_nothing(tmp_path):
    result = invoke(
        "run",
        str(ROOT / "suites" / "stl10.yaml"),
        "--out",
        str(tmp_path / "out"),
        "--set",
        f"dataset.root={tmp_path / 'none'}",
    )
    assert result.exit_code == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: stl10: folder not found: ")
    assert result.stderr.splitlines()[-1] == errors[0] and "Traceback" not in result.stderr
    assert "stl10_binary" in result.stderr and "download: true" in result.stderr
    assert not (tmp_path / "out" / "stl10").exists()
