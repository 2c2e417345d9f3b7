"""Suites (mae_bench/suite.py): reading and validation (every bad input names its field),
--set overrides, resolved defaults, and the warning for pretraining on the test images."""

import pytest
import yaml

from mae_bench.errors import ConfigError, UserError
from mae_bench.leaderboard import leaderboard_markdown, leaderboard_table, runs_table
from mae_bench.plan import suite_cells
from mae_bench.suite import apply_overrides, load_suite, resolve_suite
from tests.conftest import ROOT, invoke, tiny_suite_data, write_suite


def error_for(registry, data) -> str:
    with pytest.raises(ConfigError) as info:
        resolve_suite(data, registry, source="s.yaml")
    return str(info.value)


def test_builtin_suites_validate(registry):
    for path in sorted((ROOT / "suites").glob("*.yaml")):
        suite = load_suite(path, registry)
        assert suite_cells(suite)


def test_unknown_key_is_an_error(registry):
    data = tiny_suite_data()
    data["pretrain"]["epochz"] = 3
    assert error_for(registry, data).startswith("s.yaml: pretrain.epochz: unknown key")
    data = tiny_suite_data()
    data["variants"][0]["encoder"]["dimm"] = 3  # plugin params are strict too
    assert "variants[0].encoder.dimm: unknown key" in error_for(registry, data)


def test_unknown_plugin_lists_known(registry):
    data = tiny_suite_data()
    data["variants"][1]["masking"] = {"name": "blocky"}
    message = error_for(registry, data)
    assert "variants[1].masking.name: unknown masking 'blocky'" in message
    assert "block, curriculum, grid, random" in message


@pytest.mark.parametrize("ratio", [0, 1, 1.5, -0.1])
def test_mask_ratio_out_of_range(registry, ratio):
    data = tiny_suite_data()
    data["variants"][0]["masking"] = {"name": "random", "ratio": ratio}
    assert "variants[0].masking.ratio" in error_for(registry, data)


def test_non_positive_epochs_and_missing_field(registry):
    data = tiny_suite_data()
    data["pretrain"]["epochs"] = 0
    assert "pretrain.epochs: Input should be greater than 0 (got 0)" in error_for(registry, data)
    data = tiny_suite_data()
    del data["dataset"]
    assert "dataset: required field is missing" in error_for(registry, data)


def test_duplicate_variant_names(registry):
    data = tiny_suite_data()
    data["variants"][1]["name"] = data["variants"][0]["name"]
    assert "duplicate variant names: mlp" in error_for(registry, data)


def test_encoder_that_cannot_be_built_names_the_encoder(registry):
    data = tiny_suite_data()
    data["variants"][0]["encoder"]["patch_size"] = 5
    assert "variants[0].encoder: patch_size 5 does not divide" in error_for(registry, data)
    data = tiny_suite_data()
    data["variants"][1]["encoder"]["heads"] = 3
    assert "variants[1].encoder: Value error" not in error_for(registry, data)
    assert "dim must be divisible by heads" in error_for(registry, data)


def test_yaml_errors(tmp_path, registry):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(UserError, match="suite file not found"):
        load_suite(missing, registry)
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nvariants: [\n")
    with pytest.raises(UserError, match=r"malformed YAML \(line"):
        load_suite(bad, registry)
    tagged = tmp_path / "tag.yaml"
    tagged.write_text("name: !!python/object/apply:os.system ['echo hacked']\n")
    with pytest.raises(UserError, match="malformed YAML"):
        load_suite(tagged, registry)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("just a string\n")
    with pytest.raises(ConfigError, match="must be a YAML mapping"):
        load_suite(scalar, registry)


def test_overrides_by_index_and_name():
    raw = tiny_suite_data()
    out = apply_overrides(
        raw,
        [
            "pretrain.epochs=7",
            "variants.vit.encoder.dim=64",
            "variants.0.masking={name: random, ratio: 0.5}",
            "seeds=[1, 2]",
        ],
    )
    assert out["pretrain"]["epochs"] == 7
    assert out["variants"][1]["encoder"]["dim"] == 64
    assert out["variants"][0]["masking"] == {"name": "random", "ratio": 0.5}
    assert out["seeds"] == [1, 2]
    assert raw["pretrain"]["epochs"] == 2  # the input is not modified
    for bad, message in [
        ("pretrain.epochs", "expected key.path=value"),
        ("variants.nope.encoder.dim=3", "no item named 'nope'"),
        ("variants.9.name=x", "index out of range"),
    ]:
        with pytest.raises(UserError, match=message):
            apply_overrides(raw, [bad])


def test_resolved_suite_has_every_default(registry):
    suite = resolve_suite(tiny_suite_data(), registry)
    resolved = suite.resolved
    assert resolved["variants"][0]["encoder"]["layers"] == 2  # an mlp default
    assert resolved["variants"][0]["loss"] == [
        {"name": "mse", "norm_pix": False, "masked_only": True, "weight": 1.0}
    ]
    yaml.safe_dump(resolved)  # plain data


def test_component_shorthand(registry):
    data = tiny_suite_data()
    data["variants"][1].update(masking="random", loss="l1")
    data["variants"][0]["loss"] = ["mse", {"name": "uniformity", "weight": 0.1}]
    suite = resolve_suite(data, registry)
    assert suite.variants[1].config["masking"] == {"name": "random", "ratio": 0.75}
    assert [t["name"] for t in suite.variants[0].config["loss"]] == ["mse", "uniformity"]
    assert suite.variants[1].config["loss"][0]["name"] == "l1"


def test_dataset_params_are_validated_by_the_plugin(registry):
    data = tiny_suite_data()
    data["dataset"]["n_train"] = -3
    assert "dataset.n_train: Input should be greater than 0" in error_for(registry, data)
    data = tiny_suite_data()
    data["dataset"]["channels"] = 2
    assert "dataset.channels" in error_for(registry, data)


def test_pretraining_on_test_images_is_warned_and_marked(tmp_path, registry):
    data = tiny_suite_data(dataset={"name": "digits", "image_size": 16, "pretrain_split": "all"})
    path = write_suite(tmp_path, data)
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
    assert invoke("validate", str(ROOT / "suites" / "tiny.yaml")).stderr == ""
