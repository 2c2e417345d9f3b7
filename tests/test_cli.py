"""The command line (mae_bench/cli.py), end to end: what `run` writes and prints,
`leaderboard`, `validate`, and bad input as one message with exit code 2 and nothing written
(also from the installed `mae-bench` command)."""

import pandas as pd
import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.conftest import ROOT, cell_record, invoke, run_cli, tiny_suite_data, write_suite

LEADERBOARD_COLUMNS = [
    "variant",
    "encoder",
    "masking",
    "loss",
    "seeds",
    "psnr_masked",
    "lp_acc",
    "pretrain_s",
    "imgs_per_s",
    "params_m",
]


def test_run_writes_cells_and_leaderboards(tiny_run):
    """The shared tiny run: seeds [0, 1] on the CPU."""
    root = tiny_run.root
    cells = sorted(p for p in (root / "cells").iterdir())
    assert len(cells) == 4 and not any(p.name.startswith(".") for p in cells)
    for cell in cells:
        assert {p.name for p in cell.iterdir()} == {
            "pretrain.json",
            "history.csv",
            "encoder.safetensors",
            "decoder.safetensors",
            "evals",
        }
        evals = {p.name.split("-")[0]: p for p in (cell / "evals").iterdir()}
        assert set(evals) == {"reconstruction", "linear_probe", "knn"}
        assert {p.name for p in evals["linear_probe"].iterdir()} == {
            "result.json",
            "thresholds.csv",
            "predictions.csv",
        }
        record = cell_record(cell)
        prov = record["provenance"]
        for key in (
            "mae_bench_version",
            "git_commit",
            "torch_version",
            "timm_version",
            "device",
            "date",
        ):
            assert prov[key], key
        assert record["config"]["seed"] == record["seed"]
        assert record["metrics"]["peak_mem_mb"] > 10
        matrix = record["confusion"]["linear_probe"]
        assert len(matrix) == 4 and sum(map(sum, matrix)) == 64  # tiny: 4 classes, 64 tests
        assert cell.name.endswith(record["config_hash"][:10])
        assert load_file(cell / "encoder.safetensors")
    runs = pd.read_csv(root / "runs.csv")
    assert len(runs) == 4 and set(runs["seed"]) == {0, 1}
    board = pd.read_csv(root / "leaderboard.csv")
    positions = [list(board.columns).index(c) for c in LEADERBOARD_COLUMNS]
    assert positions == sorted(positions)  # all there, in this order
    assert "lp_acc_std" in board.columns and "psnr_masked_std" in board.columns
    for column in (
        "psnr_full",
        "hf_error",
        "knn_acc",
        "lp_f1_macro",
        "lp_auc",
        "lp_acc_ci95",
        "f1_macro",
        "auc",
        "precision_macro",
        "recall_macro",
        "f1_macro_std",
    ):
        assert column in board.columns, column
    assert board["rank"].tolist() == [1, 2]
    assert len(list((root / "thresholds").glob("*-seed*.csv"))) == 4
    assert sorted(board["variant"]) == ["mlp", "vit"] and set(board["seeds"]) == {2}
    for _, row in board.iterrows():
        assert 0.0 <= row["lp_acc"] <= 1.0 and row["psnr_masked"] > 5
    md = (root / "leaderboard.md").read_text()
    assert "| variant" in md and " ± " in md
    assert "| variant" in tiny_run.stdout  # the leaderboard is printed


def test_leaderboard_command_rerenders(tiny_run_copy):
    root = tiny_run_copy.root
    (root / "leaderboard.md").unlink()
    result = invoke("leaderboard", str(root))
    assert result.exit_code == 0, result.output
    assert (root / "leaderboard.md").is_file() and "| vit" in result.stdout
    assert "4 of 4 cells finished" in result.stderr


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d["pretrain"].update(epochs=-1), "pretrain.epochs"),
        (
            lambda d: d["variants"][0].update(encoder={"name": "resnet"}),
            "variants[0].encoder.name: unknown encoder 'resnet'; "
            "known: crossmae, mlp, simmim, timm, vit",
        ),
        (
            lambda d: d["variants"][1].update(masking={"name": "random", "ratio": 1.2}),
            "variants[1].masking.ratio",
        ),
        (lambda d: d.update(colour="red"), "colour: unknown key"),
        (lambda d: d["variants"].append(dict(d["variants"][0])), "duplicate variant names"),
    ],
)
def test_bad_suite_exits_2_with_one_message_and_writes_nothing(tmp_path, edit, message):
    data = tiny_suite_data()
    edit(data)
    suite = tmp_path / "bad.yaml"
    suite.write_text(yaml.safe_dump(data))
    out = tmp_path / "out"
    for command in (["run", str(suite), "--out", str(out)], ["validate", str(suite)]):
        result = invoke(*command)
        assert result.exit_code == 2
        assert message in result.stderr
        assert result.stderr.startswith("error: ") and "Traceback" not in result.stderr
    assert not out.exists()


@pytest.mark.slow
def test_bad_input_from_the_real_command_has_no_traceback(tmp_path):
    data = tiny_suite_data()
    data["variants"][0]["masking"] = {"name": "random", "ratio": 1.5}
    suite = tmp_path / "bad.yaml"
    suite.write_text(yaml.safe_dump(data))
    result = run_cli("run", str(suite), "--out", str(tmp_path / "out"))
    assert result.returncode == 2
    assert result.stderr.startswith(f"error: {suite}: variants[0].masking.ratio: ")
    assert "Traceback" not in result.stderr and len(result.stderr.splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_missing_suite_and_bad_yaml_and_bad_set(tmp_path):
    result = invoke("run", str(tmp_path / "missing.yaml"), "--out", str(tmp_path / "o"))
    assert result.exit_code == 2 and "suite file not found" in result.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    result = invoke("validate", str(bad))
    assert result.exit_code == 2 and "malformed YAML (line" in result.stderr
    result = invoke(
        "run",
        str(ROOT / "suites" / "tiny.yaml"),
        "--set",
        "pretrain.epochs",
        "--out",
        str(tmp_path / "o"),
    )
    assert result.exit_code == 2 and "expected key.path=value" in result.stderr
    result = invoke("leaderboard", str(tmp_path))
    assert result.exit_code == 2 and "suite.json is missing" in result.stderr
    assert not (tmp_path / "o").exists()
    assert "Traceback" not in result.stderr


def test_validate_show_prints_resolved_suite():
    result = invoke("validate", str(ROOT / "suites" / "quick.yaml"), "--show")
    assert result.exit_code == 0, result.output
    assert "ok: suite 'quick': (7 variants + 2 baselines) x 3 seeds = 27 cells" in result.stdout
    resolved = yaml.safe_load(result.stdout.split("\n", 1)[1])
    assert resolved["variants"][1]["masking"] == {"name": "random", "ratio": 0.75}


def test_validate_counts_in_the_singular_too(tmp_path):
    data = tiny_suite_data(seeds=[0])
    data["variants"] = data["variants"][:1]
    result = invoke("validate", str(write_suite(tmp_path, data)))
    assert result.exit_code == 0, result.output
    assert "ok: suite 'tiny': (1 variant) x 1 seed = 1 cell" in result.stdout
    data["eval"]["baselines"] = True
    result = invoke("validate", str(write_suite(tmp_path, data)))
    assert "(1 variant + 1 baseline) x 1 seed = 2 cells" in result.stdout, result.output


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_unavailable_device_is_a_clear_error(tmp_path):
    result = invoke(
        "run", str(ROOT / "suites" / "tiny.yaml"), "--device", "cuda", "--out", str(tmp_path / "o")
    )
    assert result.exit_code == 2 and "CUDA was requested but is not available" in result.stderr
    assert not (tmp_path / "o").exists()


def test_bad_suite_files_and_devices_are_one_clear_error(tmp_path):
    suite = write_suite(tmp_path)
    latin = tmp_path / "latin.yaml"
    latin.write_bytes("name: caf\xe9\n".encode("latin-1"))
    result = invoke("validate", str(latin))
    assert result.exit_code == 2 and result.stderr.startswith(f"error: {latin}: not UTF-8")
    for device in ("meta", "xla", "hpu"):
        result = invoke("run", str(suite), "--device", device, "--out", str(tmp_path))
        assert result.exit_code == 2 and f"unsupported device {device!r}" in result.stderr
    for setting, field in (("pretrain.lr=.inf", "pretrain.lr"), (f"seeds=[{2**63}]", "seeds[0]")):
        result = invoke("validate", str(suite), "--set", setting)
        assert result.exit_code == 2 and f": {field}: " in result.stderr, result.stderr
