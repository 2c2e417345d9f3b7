"""Parameter sweeps (``mae_bench/sweeps.py`` and their resolution in ``suite.py``): points,
names, ``zip``, the swept-path columns, ``--sweep``, and editing a sweep in place."""

from __future__ import annotations

import pandas as pd
import pytest
import yaml
from PIL import Image

from mae_bench.errors import ConfigError
from mae_bench.plan import suite_cells
from mae_bench.plugins import load_registry
from mae_bench.suite import load_suite, resolve_suite
from mae_bench.sweeps import PathError, expand, format_value, get_path, set_path, sweep_axes
from tests.conftest import invoke, tiny_suite_data, write_suite

VIT = {"name": "vit", "patch_size": 4, "dim": 32, "depth": 1, "heads": 2, "decoder_dim": 32}


def swept_suite(sweep: dict, **changes) -> dict:
    """The tiny suite with one ViT variant sweeping ``sweep``, and the MLP."""
    data = tiny_suite_data(**changes)
    data["variants"] = [
        {"name": "vit-mae", "encoder": dict(VIT), "masking": {"name": "random", "ratio": 0.75},
         "sweep": sweep},
        {"name": "mlp", "encoder": {"name": "mlp", "patch_size": 4, "dim": 32, "hidden": 64}},
    ]  # fmt: skip
    data["eval"] = {"linear_probe": {"epochs": 3}, "knn": {"k": 5}}
    data["primary_metric"] = "lp_acc"
    return data


# --------------------------------------------------------------- points and names
def test_points_are_the_product_with_zipped_lists_moving_together():
    points = expand(
        "vit",
        {
            "masking.ratio": [0.5, 0.75],
            "zip": {"encoder.decoder_depth": [1, 8], "encoder.decoder_dim": [16, 64]},
        },
    )
    assert [p.name for p in points] == [
        "vit-ratio0.5-decoder_depth1-decoder_dim16",
        "vit-ratio0.5-decoder_depth8-decoder_dim64",
        "vit-ratio0.75-decoder_depth1-decoder_dim16",
        "vit-ratio0.75-decoder_depth8-decoder_dim64",
    ]
    assert points[1].values == {
        "masking.ratio": 0.5, "encoder.decoder_depth": 8, "encoder.decoder_dim": 64
    }  # fmt: skip


def test_names_are_file_safe_unambiguous_and_depend_on_the_point_alone():
    assert [p.name for p in expand("v", {"masking.name": ["random", "block"]})] == [
        "v-masking_namerandom",
        "v-masking_nameblock",
    ]
    clash = expand("v", {"encoder.ratio": [1], "masking.ratio": [0.5]})
    assert clash[0].name == "v-encoder_ratio1-masking_ratio0.5"
    assert format_value(True) == "true" and format_value("a/b c") == "a_b_c"
    assert format_value(1e-4) == "0.0001" and len(format_value({"a": 1})) == 8
    # adding values keeps every earlier point's name (and so its cells)
    before = {p.name for p in expand("v", {"masking.ratio": [0.5, 0.75]})}
    assert before < {p.name for p in expand("v", {"masking.ratio": [0.25, 0.5, 0.75, 0.9]})}


@pytest.mark.parametrize(
    ("sweep", "message"),
    [
        ({"masking.ratio": 0.5}, "masking.ratio: a non-empty list"),
        ({"masking.ratio": []}, "masking.ratio: a non-empty list"),
        ({"ratio": [0.5]}, "a sweep names a field inside the variant's"),
        ({"name": ["a"]}, "a sweep names a field inside"),
        ({"masking.ratio": [0.5, 0.5]}, "a value is listed twice"),
        ({"zip": {"encoder.dim": [1, 2], "encoder.depth": [1]}}, "its lists must have one length"),
        ({"zip": {"encoder.dim": [1, 2]}}, "two or more field paths"),
        ({"encoder.dim": [1], "zip": {"encoder.dim": [1], "encoder.depth": [1]}}, "swept twice"),
        ({}, "a mapping of field paths"),
    ],
)
def test_a_malformed_sweep_names_its_problem(sweep, message):
    with pytest.raises(ValueError, match=message):
        sweep_axes(sweep)


def test_paths_step_into_mappings_and_lists_by_index_or_name():
    data = {"loss": [{"name": "mse", "weight": 1.0}, {"name": "laplacian", "weight": 0.1}]}
    set_path(data, "loss.laplacian.weight", 0.5)
    set_path(data, "loss.0.weight", 2.0)
    assert get_path(data, "loss.1.weight") == 0.5 and get_path(data, "loss.mse.weight") == 2.0
    with pytest.raises(PathError, match=r"loss\.l1: no item named 'l1'"):
        get_path(data, "loss.l1.weight")
    with pytest.raises(PathError, match="masking: no such field"):
        get_path(data, "masking.ratio")


# --------------------------------------------------------------- resolution
def test_a_sweep_resolves_to_one_variant_per_point_with_the_reference_at_its_unswept_value():
    suite = resolve_suite(swept_suite({"masking.ratio": [0.5, 0.75, 0.9]}), load_registry())
    names = [v.name for v in suite.variants]
    assert names == ["vit-mae-ratio0.5", "vit-mae-ratio0.75", "vit-mae-ratio0.9", "mlp"]
    assert [v.masking.config["ratio"] for v in suite.variants[:3]] == [0.5, 0.75, 0.9]
    assert suite.variants[0].sweep_record == {
        "family": "vit-mae", "values": {"masking.ratio": 0.5}
    }  # fmt: skip
    assert suite.variants[3].family is None
    assert suite.reference == "vit-mae-ratio0.75"  # the first variant, at its own value
    assert suite.resolved["reference"] == "vit-mae-ratio0.75"
    named = resolve_suite(
        {**swept_suite({"masking.ratio": [0.5, 0.9]}), "reference": "vit-mae"}, load_registry()
    )
    assert named.reference == "vit-mae-ratio0.5"  # 0.75 is not swept: its first point
    mlp = resolve_suite({**swept_suite({"masking.ratio": [0.5]}), "reference": "mlp"},
                        load_registry())  # fmt: skip
    assert mlp.reference == "mlp"


def test_a_default_counts_as_the_unswept_value():
    data = swept_suite({"encoder.decoder_depth": [1, 2]})  # decoder_depth left at its default
    suite = resolve_suite(data, load_registry())
    default = suite.variants[0].encoder.cls.Params().decoder_depth
    assert suite.reference == f"vit-mae-decoder_depth{default}"


@pytest.mark.parametrize(
    ("sweep", "field", "message"),
    [
        ({"masking.ratioo": [0.5]}, "variants[0].sweep", "masking.ratioo: no such field "
         "(masking has: ratio)"),
        ({"loss.l1.weight": [1.0]}, "variants[0].sweep", "loss.l1: no item named 'l1'"),
        ({"masking.ratio": [0.5, 1.5]}, "variants[0].masking.ratio",
         "(at the sweep point vit-mae-ratio1.5)"),
        ({"encoder.dim": [32, True]}, "variants[0].encoder.dim", "vit-mae-dimtrue"),
    ],
)  # fmt: skip
def test_validation_names_the_swept_path_or_the_point(sweep, field, message):
    with pytest.raises(ConfigError) as caught:
        resolve_suite(swept_suite(sweep), load_registry())
    assert caught.value.field == field and message in caught.value.message


def test_a_point_named_as_another_variant_is_refused():
    data = swept_suite({"masking.ratio": [0.5]})
    data["variants"][1]["name"] = "vit-mae-ratio0.5"
    with pytest.raises(ConfigError, match="duplicate variant names once sweeps are expanded"):
        resolve_suite(data, load_registry())


def test_the_command_line_sweeps_every_variant_or_one(tmp_path):
    path = write_suite(tmp_path, swept_suite({"masking.ratio": [0.5, 0.75]}))
    one = load_suite(path, load_registry(), sweeps=["variants.mlp.masking.ratio=0.6,0.9"])
    assert [v.name for v in one.variants][2:] == ["mlp-ratio0.6", "mlp-ratio0.9"]
    every = load_suite(path, load_registry(), sweeps=["masking.ratio=0.25,0.75"])
    assert [v.name for v in every.variants] == [
        "vit-mae-ratio0.25", "vit-mae-ratio0.75", "mlp-ratio0.25", "mlp-ratio0.75"
    ]  # fmt: skip
    result = invoke("validate", str(path), "-m", "masking.ratioo=0.5")
    assert result.exit_code == 2 and "masking.ratioo: no such field" in result.stderr
    result = invoke("validate", str(path), "--sweep", "variants.nope.masking.ratio=0.5")
    assert result.exit_code == 2 and "--sweep variants.nope: no item named 'nope'" in result.stderr


# --------------------------------------------------------------- through the CLI
def test_a_sweep_run_writes_its_columns_and_an_edit_in_place_reuses_finished_cells(tmp_path):
    path = write_suite(tmp_path, swept_suite({"masking.ratio": [0.5, 0.75]}))
    out = tmp_path / "out"
    first = invoke("run", str(path), "--out", str(out), "--device", "cpu")
    assert first.exit_code == 0, first.output
    root = out / "tiny"
    runs = pd.read_csv(root / "runs.csv")
    board = pd.read_csv(root / "leaderboard.csv")
    for table in (runs, board):
        assert list(table.columns[table.columns.get_loc("loss") + 1 :][:2]) == [
            "sweep_family", "masking.ratio"
        ]  # fmt: skip
    ratios = dict(zip(board["variant"], board["masking.ratio"], strict=True))
    assert ratios["vit-mae-ratio0.5"] == 0.5 and ratios["vit-mae-ratio0.75"] == 0.75
    assert pd.isna(ratios["mlp"]) and "lp_acc" in board and "masking.ratio_std" not in board
    ranked = dict(zip(board["variant"], board["verdict"], strict=True))
    assert ranked["vit-mae-ratio0.75"] == "reference"
    markdown = (root / "leaderboard.md").read_text()
    header = next(line for line in markdown.splitlines() if line.startswith("| rank"))
    column = [c.strip() for c in header.split("|")].index("masking.ratio")
    rows = [line.split("|") for line in markdown.splitlines() if "vit-mae-ratio0.5" in line]
    assert rows[0][column].strip() == "0.5"
    data = yaml.safe_load(path.read_text())
    data["variants"][0]["sweep"]["masking.ratio"] = [0.5, 0.75, 0.9]  # edited in place
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    second = invoke("run", str(path), "--out", str(out), "--device", "cpu")
    assert second.exit_code == 0, second.output
    assert "3 of 4 cells already finished: skipped" in second.stderr
    board = pd.read_csv(root / "leaderboard.csv")
    assert sorted(board["masking.ratio"].dropna()) == [0.5, 0.75, 0.9]
    report = invoke("report", str(root))
    assert report.exit_code == 0, report.output
    figure = root / "plots" / "sweep_masking.ratio.png"
    with Image.open(figure) as image:
        image.verify()
    assert (
        figure.name in (root / "report.html").read_text()
        or "sweep_masking" in (root / "report.html").read_text()
    )


def test_the_recorded_suite_expands_to_the_same_points_for_a_worker():
    """suite.json holds a sweep unexpanded (its unswept config resolved): a worker that
    resolves it again gets the same cells, each with its point."""
    suite = resolve_suite(swept_suite({"masking.ratio": [0.5, 0.75]}), load_registry())
    assert suite.resolved["variants"][0]["sweep"] == {"masking.ratio": [0.5, 0.75]}
    again = resolve_suite(suite.resolved, load_registry())
    assert [c.cell_id for c in suite_cells(again)] == [c.cell_id for c in suite_cells(suite)]
    assert [v.sweep_record for v in again.variants] == [v.sweep_record for v in suite.variants]
    assert again.reference == suite.reference == "vit-mae-ratio0.75"


@pytest.mark.slow
def test_a_worker_process_records_the_sweep_point(tmp_path):
    data = swept_suite({"masking.ratio": [0.5]})
    data["variants"] = data["variants"][:1]
    path = write_suite(tmp_path, data)
    out = tmp_path / "out"
    result = invoke(
        "run", str(path), "--out", str(out), "--device", "cpu", "--launcher", "local",
        "--workers", "1",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    runs = pd.read_csv(out / "tiny" / "runs.csv")
    assert list(runs["masking.ratio"]) == [0.5] and list(runs["sweep_family"]) == ["vit-mae"]
