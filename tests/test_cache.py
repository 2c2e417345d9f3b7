"""Pretraining and evaluation are cached apart: changing an evaluator re-runs only it."""

import json
import shutil

import pytest
import yaml

from mae_bench.plan import suite_cells
from mae_bench.suite import resolve_suite
from tests.conftest import cell_record, invoke, tiny_suite_data


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("cache")
    suite = base / "tiny.yaml"
    suite.write_text(yaml.safe_dump(tiny_suite_data()))
    result = invoke("run", str(suite), "--out", str(base / "out"))
    assert result.exit_code == 0, result.output
    return suite, base / "out" / "tiny"


@pytest.fixture
def run(first_run, tmp_path):
    suite, root = first_run
    shutil.copytree(root.parent, tmp_path / "out")
    return suite, tmp_path / "out" / "tiny"


def _snapshot(root):
    return {
        str(p.relative_to(root)): p.stat().st_mtime_ns
        for p in (root / "cells").rglob("*.json")
    }


def test_changing_knn_k_reruns_only_knn(run):
    suite, root = run
    before = _snapshot(root)
    result = invoke("run", str(suite), "--out", str(root.parent), "--set", "eval.knn.k=3")
    assert result.exit_code == 0, result.output
    assert "2 cells reuse their stored pretraining and only run: knn" in result.stderr
    after = _snapshot(root)
    assert all(after[path] == mtime for path, mtime in before.items())  # nothing rewritten
    added = sorted(set(after) - set(before))
    assert len(added) == 2 and all("/evals/knn-" in path for path in added)
    for cell in (root / "cells").iterdir():
        knn = [json.loads(p.read_text()) for p in cell.glob("evals/knn-*/result.json")]
        assert sorted(k["config"]["evaluator"]["k"] for k in knn) == [3, 20]
    # and back: both k-NN settings are cached now
    again = invoke("run", str(suite), "--out", str(root.parent))
    assert "2 of 2 cells already finished" in again.stderr and "loading dataset" not in again.stderr


def test_adding_an_evaluator_runs_only_it_from_the_stored_weights(run):
    suite, root = run
    (cell,) = (root / "cells").glob("vit-seed0-*")
    stored = cell_record(cell)
    result = invoke(
        "run", str(suite), "--out", str(root.parent),
        "--set", "eval.finetune={enabled: true, epochs: 1}",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "only run: finetune" in result.stderr and "(pretraining reused)" in result.stderr
    now = cell_record(cell)
    assert now["metrics"]["lp_acc"] == stored["metrics"]["lp_acc"] and "ft_acc" in now["metrics"]


def test_a_deleted_evaluation_is_recomputed_identically_from_stored_weights(run):
    suite, root = run
    (cell,) = (root / "cells").glob("vit-seed0-*")
    (knn,) = cell.glob("evals/knn-*")
    first = json.loads((knn / "result.json").read_text())["metrics"]
    shutil.rmtree(knn)
    result = invoke("run", str(suite), "--out", str(root.parent))
    assert result.exit_code == 0 and "only run: knn" in result.stderr
    assert json.loads((knn / "result.json").read_text())["metrics"] == first


def test_plugin_versions_are_part_of_the_keys_and_the_provenance(registry, run):
    _, root = run
    data = tiny_suite_data()
    cells = suite_cells(resolve_suite(data, registry))
    vit = registry.components["encoder"]["vit"].plugin
    probe = registry.components["evaluator"]["linear_probe"].plugin
    assert cells[1].config["plugins"] == {"mae-bench": vit.version}
    original = vit.version
    builtins = [p for p in registry.plugins if p.distribution == vit.distribution]
    try:
        for plugin in builtins:  # the distribution providing `vit` was upgraded
            plugin.version = original + ".post1"
        upgraded = suite_cells(resolve_suite(data, registry))
    finally:
        for plugin in builtins:
            plugin.version = original
    assert upgraded[1].cell_id != cells[1].cell_id
    assert all(e.config["plugins"] == {probe.distribution: probe.version}
               for e in cells[1].evaluations)  # fmt: skip
    record = cell_record(next((root / "cells").glob("vit-*")))
    assert record["provenance"]["plugins"] == {"mae-bench": original}


def test_results_of_an_older_layout_get_one_clear_message(run):
    suite, root = run
    record = json.loads((root / "suite.json").read_text())
    for cell in record["cells"]:
        del cell["evaluations"]
    (root / "suite.json").write_text(json.dumps(record))
    for command in (["leaderboard", str(root)], ["run", str(suite), "--out", str(root.parent)]):
        result = invoke(*command)
        assert result.exit_code == 2 and "results of an older mae-bench" in result.stderr
    replaced = invoke("run", str(suite), "--out", str(root.parent), "--replace")
    assert replaced.exit_code == 0, replaced.output
    assert len(list(root.parent.glob("tiny.replaced-*"))) == 1
