"""Bad input gets one clear message, quickly (issue 21, items 4, 11, 12, 14 and 18): a dataset
or encoder plugin that fails, YAML bombs, duplicate keys and booleans given for numbers, a
negative loss weight, and an unwritable ``--out`` found before the dataset is loaded.

The misbehaving plugins live here, registered beside the built-in ones with ``registry_with``
and handed to the command line in place of the installed registry."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Literal

import pytest
import torch
import yaml
from mae_bench_plugins.mlp import MLPMAE

from mae_bench import Dataset, Evaluator, ImageData, Params, hookimpl
from mae_bench.errors import ConfigError, UserError
from mae_bench.suite import apply_overrides, load_suite, read_suite_file
from tests.conftest import invoke, registry_with, tiny_suite_data, write_suite

Fault = Literal["none", "raise", "float", "labels", "empty", "count", "none-returned", "init"]
LOADS: list[str] = []  # the faults each load() was called with


class FaultyParams(Params):
    """Which fault the dataset shows."""

    fault: Fault = "none"


class FaultyDataset(Dataset):
    """16 x 16 RGB noise in two classes, or one of the faults a dataset plugin can have."""

    name = "faulty"
    Params = FaultyParams

    def __init__(self, params: FaultyParams) -> None:
        if params.fault == "init":
            raise RuntimeError("cannot reach the data server")
        super().__init__(params)

    def load(self) -> ImageData:
        fault = self.params.fault
        LOADS.append(fault)
        if fault == "raise":
            raise OSError("disk on fire")
        if fault == "none-returned":
            return None  # type: ignore[return-value]
        g = torch.Generator().manual_seed(0)
        images = torch.randint(0, 256, (16, 3, 16, 16), dtype=torch.uint8, generator=g)
        labels = torch.arange(16) % 2
        train = images.float() if fault == "float" else images
        pretrain = images[:0] if fault == "empty" else images
        train_labels = labels + 5 if fault == "labels" else labels
        test_labels = labels[:-1] if fault == "count" else labels
        return ImageData(pretrain, train, train_labels, images, test_labels, ["a", "b"])


class BrokenEncoder(MLPMAE):
    """An encoder whose constructor fails (e.g. a missing compiled kernel)."""

    name = "broken"

    def __init__(self, params, *, image_size: int, in_chans: int) -> None:
        raise RuntimeError("no kernel for this GPU")


class BrokenEvaluator(Evaluator):
    """An evaluator whose constructor fails (its optional package is not installed)."""

    name = "broken_eval"

    def __init__(self, params: Params) -> None:
        raise ModuleNotFoundError("No module named 'faiss'")

    def metrics(self):
        return {}

    def evaluate(self, ctx):
        raise AssertionError("never built")


class Faults:
    @staticmethod
    @hookimpl
    def register_datasets(register):
        register(FaultyDataset)

    @staticmethod
    @hookimpl
    def register_evaluators(register):
        register(BrokenEvaluator)

    @staticmethod
    @hookimpl
    def register_encoders(register):
        register(BrokenEncoder)


@pytest.fixture
def faults(monkeypatch):
    """The built-in plugins plus the faulty ones, as every command loads them."""
    registry = registry_with(Faults, "faults")
    monkeypatch.setattr("mae_bench.plugins.load_registry", lambda: registry)
    LOADS.clear()
    return registry


def faulty_suite(folder: Path, fault: str = "none", **changes) -> Path:
    """One MLP variant on the faulty dataset (16 training images), one epoch, reconstruction
    and k-NN (k = 20) evaluated."""
    data = tiny_suite_data(
        dataset={"name": "faulty", "fault": fault, "image_size": 16},
        pretrain={"epochs": 1, "batch_size": 8},
        variants=[tiny_suite_data()["variants"][0]],
        eval={"linear_probe": {"enabled": False}, "knn": {"k": 20}},
        primary_metric="knn_acc",
        **changes,
    )
    return write_suite(folder, data)


def one_line_error(result) -> str:
    """The command's only stderr line, checked to be an error (exit 2) without a traceback."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and not isinstance(result.exception, Exception)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    return errors[0]


# --------------------------------------------------------------- item 4: plugin failures
@pytest.mark.parametrize(
    ("fault", "expected"),
    [
        ("raise", "failed to load: OSError: disk on fire"),
        ("float", "returned invalid data: train_images must be a uint8"),
        ("labels", "returned invalid data: labels must lie in [0, 2)"),
        ("empty", "returned invalid data: pretrain is empty"),
        ("count", "returned invalid data: test_labels must have one label per image"),
        ("none-returned", "returned NoneType, not an ImageData"),
    ],
)
def test_a_failing_dataset_plugin_is_one_line_naming_it(tmp_path, faults, fault, expected):
    suite = faulty_suite(tmp_path, fault)
    line = one_line_error(
        invoke("run", str(suite), "--out", str(tmp_path / "out"), "--device", "cpu")
    )
    assert line.startswith(f"error: {suite}: dataset: 'faulty' (mae-bench-faults 0.1) ")
    assert expected in line
    assert [fault] == LOADS
    assert not (tmp_path / "out").exists()  # nothing written


def test_a_dataset_plugin_whose_constructor_fails_is_one_line(tmp_path, faults):
    suite = faulty_suite(tmp_path, "init")
    for args in (["validate"], ["run", "--out", str(tmp_path / "out")]):
        line = one_line_error(invoke(*args, str(suite)))
        assert line == (
            f"error: {suite}: dataset: 'faulty' (mae-bench-faults 0.1) could not be built: "
            "RuntimeError: cannot reach the data server"
        )


def test_an_encoder_whose_constructor_fails_names_the_variant(tmp_path, faults):
    data = tiny_suite_data()
    data["variants"][1]["encoder"] = {"name": "broken"}
    suite = write_suite(tmp_path, data)
    for args in (["validate"], ["run", "--out", str(tmp_path / "out")]):
        line = one_line_error(invoke(*args, str(suite)))
        assert line == (
            f"error: {suite}: variants[1].encoder: 'broken' (mae-bench-faults 0.1) could not "
            "be built: RuntimeError: no kernel for this GPU"
        )


def test_an_evaluator_whose_constructor_fails_names_it(tmp_path, faults):
    suite = write_suite(tmp_path, eval={"broken_eval": {}})
    assert one_line_error(invoke("validate", str(suite))) == (
        f"error: {suite}: eval.broken_eval: 'broken_eval' (mae-bench-faults 0.1) could not be "
        "built: ModuleNotFoundError: No module named 'faiss'"
    )


# --------------------------------------------------------------- item 18: --out before loading
def test_an_unwritable_out_is_refused_before_the_dataset_is_loaded(tmp_path, faults):
    suite = faulty_suite(tmp_path)
    (tmp_path / "file").write_text("x")
    line = one_line_error(invoke("run", str(suite), "--out", str(tmp_path / "file")))
    assert "--out: cannot write results under" in line
    assert LOADS == []  # never loaded


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_out_is_refused_before_the_dataset_is_loaded(tmp_path, faults):
    suite = faulty_suite(tmp_path)
    (tmp_path / "ro").mkdir(mode=0o555)
    line = one_line_error(invoke("run", str(suite), "--out", str(tmp_path / "ro")))
    assert "cannot write results under" in line and LOADS == []


def test_a_healthy_faulty_dataset_runs(tmp_path, faults):
    """The control: the same plugin without a fault runs the suite."""
    suite = faulty_suite(tmp_path)
    result = invoke("run", str(suite), "--out", str(tmp_path / "out"), "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert LOADS == ["none"] and (tmp_path / "out" / "tiny" / "leaderboard.md").is_file()
    # item 14: k above the 16 training images is said, once, and all 16 vote
    warned = "warning: eval.knn.k: 20 is more than the 16 training images: all 16 vote (k = 16)"
    assert result.stderr.count(warned) == 1


# --------------------------------------------------------------- item 11: YAML bombs
BOMB = """\
a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]
b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]
c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]
d: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]
e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d]
f: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e]
g: &g [*f, *f, *f, *f, *f, *f, *f, *f, *f]
h: &h [*g, *g, *g, *g, *g, *g, *g, *g, *g]
i: &i [*h, *h, *h, *h, *h, *h, *h, *h, *h]
"""


def bomb_suite(folder: Path, where: str) -> Path:
    """The tiny suite with a billion-laughs bomb (9^9 strings) in ``where``."""
    text = yaml.safe_dump(tiny_suite_data(), sort_keys=False)
    lines = [f"x-{line}" for line in BOMB.splitlines()]  # anchors defined under keys x-a...
    if where == "description":
        text += "\n".join(lines) + "\ndescription: *i\n"
    else:
        text = text.replace("    name: curriculum\n", "    name: curriculum\n    bomb: *i\n")
        assert "bomb: *i" in text
        text = "\n".join(lines) + "\n" + text
    path = folder / "bomb.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("where", ["description", "masking"])
def test_a_yaml_alias_bomb_is_refused_at_once(tmp_path, registry, where):
    path = bomb_suite(tmp_path, where)
    start = time.perf_counter()
    with pytest.raises(UserError) as info:
        load_suite(path, registry)
    assert time.perf_counter() - start < 1.0
    assert str(info.value).startswith(f"{path}: the YAML expands to more than")
    assert "aliases" in str(info.value)
    line = one_line_error(invoke("validate", str(path)))
    assert str(path) in line


def test_a_launcher_config_bomb_and_a_set_bomb_are_refused(tmp_path):
    config = tmp_path / "launcher.yaml"
    config.write_text(BOMB + "workers: *i\n")
    start = time.perf_counter()
    with pytest.raises(UserError, match=r"launcher\.yaml: the YAML expands"):
        read_suite_file(config, "launcher options")
    with pytest.raises(UserError, match="--set description: the value expands"):
        apply_overrides({}, ["description=" + "{" + BOMB.strip().replace("\n", ", ") + ", z: *i}"])
    assert time.perf_counter() - start < 1.0


def test_recursive_and_deeply_nested_yaml_is_one_message(tmp_path):
    loop = tmp_path / "loop.yaml"
    loop.write_text("name: &x [*x]\n")
    with pytest.raises(UserError, match=r"loop\.yaml: .*refers to itself"):
        read_suite_file(loop)
    deep = tmp_path / "deep.yaml"
    deep.write_text("name: " + "[" * 50_000 + "]" * 50_000 + "\n")
    with pytest.raises(UserError, match=r"deep\.yaml: the YAML nests"):
        read_suite_file(deep)


def test_harmless_anchors_and_merge_keys_still_load(tmp_path, registry):
    path = tmp_path / "ok.yaml"
    path.write_text(
        "shared: &enc {name: mlp, patch_size: 4, dim: 32}\n"
        + yaml.safe_dump({k: v for k, v in tiny_suite_data().items() if k != "variants"})
        + "variants:\n"
        "  - {name: a, encoder: *enc}\n"
        "  - name: b\n"
        "    encoder: {<<: *enc, dim: 64}\n"
    )
    raw = read_suite_file(path)
    assert raw["variants"][1]["encoder"] == {"name": "mlp", "patch_size": 4, "dim": 64}
    raw.pop("shared")
    path.write_text(yaml.safe_dump(raw))
    assert [v.encoder.config["dim"] for v in load_suite(path, registry).variants] == [32, 64]


# --------------------------------------------------------------- item 12: duplicates, booleans
def test_a_duplicate_key_is_refused_with_its_line(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text(
        "name: dup\npretrain: {epochs: 2}\ndataset: {name: synthetic}\npretrain: {epochs: 9}\n"
    )
    with pytest.raises(UserError) as info:
        read_suite_file(path)
    assert str(info.value) == (
        f"{path}: duplicate key 'pretrain' (line 4, column 1; first at line 2): a second "
        "value would silently replace the first"
    )
    path.write_text("name: dup\ndataset: {name: synthetic, size: 8, size: 16}\n")
    with pytest.raises(UserError, match=r"duplicate key 'size' \(line 2, column 37; first at"):
        read_suite_file(path)


@pytest.mark.parametrize(
    ("key", "value", "field"),
    [
        ("pretrain.epochs", "true", "pretrain.epochs"),
        ("pretrain.lr", "false", "pretrain.lr"),
        ("pretrain.betas", "[true, 0.9]", "pretrain.betas[0]"),
        ("dataset.image_size", "true", "dataset.image_size"),
        ("seeds", "[true]", "seeds[0]"),
        ("variants.0.encoder.dim", "true", "variants[0].encoder.dim"),
        ("variants.1.loss.1.weight", "true", "variants[1].loss[1].weight"),
        ("eval.knn.k", "true", "eval.knn.k"),
        ("eval.thresholds.step", "true", "eval.thresholds.step"),
    ],
)
def test_a_boolean_is_not_a_number(tmp_path, registry, key, value, field):
    path = write_suite(tmp_path)
    with pytest.raises(ConfigError) as info:
        load_suite(path, registry, [f"{key}={value}"])
    assert str(info.value).startswith(f"{path}: {field}: must be a number, not ")


def test_numbers_and_real_booleans_still_validate(tmp_path, registry):
    path = write_suite(tmp_path)
    overrides = [
        "pretrain.lr=1",  # an int for a float
        "pretrain.augment.hflip=true",
        "eval.baselines=true",
        "eval.knn.temperature=1",
        "eval.reconstruction.enabled=false",
        "dataset.color=false",
    ]
    suite = load_suite(path, registry, overrides)
    assert suite.config.pretrain.lr == 1.0 and suite.config.pretrain.augment.hflip is True
    assert suite.dataset.params.color is False


def test_a_yaml_date_where_text_is_expected_is_one_message(tmp_path, registry):
    """YAML reads ``2024-01-01`` as a date: the schema names the field (the overrides' deep
    copy used to fail on it with a traceback)."""
    path = tmp_path / "dated.yaml"
    path.write_text(yaml.safe_dump(tiny_suite_data()) + "description: 2024-01-01\n")
    with pytest.raises(ConfigError, match=r"dated\.yaml: description: Input should be a valid str"):
        load_suite(path, registry)


# --------------------------------------------------------------- item 14: loss weights
@pytest.mark.parametrize("weight", ["-0.1", "-1"])
def test_a_negative_loss_weight_is_refused(tmp_path, registry, weight):
    path = write_suite(tmp_path)
    with pytest.raises(ConfigError) as info:
        load_suite(path, registry, [f"variants.vit.loss.1.weight={weight}"])
    assert str(info.value).startswith(f"{path}: variants[1].loss[1].weight: must be")
    assert "positive" in str(info.value)
