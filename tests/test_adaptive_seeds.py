"""Seeds until the answer is clear (``seeds: {min, max, until: conclusive}``): the schema, a
look of :func:`mae_bench.plan.grow_seeds`, and a run through the CLI that adds seeds only
where the verdict is still open. The rule's error rate and power: ``test_sequential.py``."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from mae_bench import plan
from mae_bench.errors import ConfigError
from mae_bench.plugins import load_registry
from mae_bench.suite import resolve_suite
from tests.conftest import invoke, tiny_suite_data, write_suite

MLP = {"name": "mlp", "patch_size": 4, "dim": 32, "hidden": 64}


def adaptive_suite(seeds: dict, names=("mlp", "twin")) -> dict:
    """The tiny suite's MLP under several names (identical results: every difference 0)."""
    data = tiny_suite_data(seeds=seeds, primary_metric="lp_acc", reference=names[0])
    data["variants"] = [{"name": name, "encoder": dict(MLP)} for name in names]
    data["eval"] = {"linear_probe": {"epochs": 3}}
    return data


@pytest.mark.parametrize(
    ("seeds", "field", "message"),
    [
        ({"min": 4, "max": 3}, "seeds", "max (3) must be at least min (4)"),
        ({"min": 1}, "seeds.min", "greater than or equal to 2"),
        ({"until": "forever"}, "seeds.until", "'conclusive'"),
        ({"min": 3, "maxx": 5}, "seeds.maxx", "unknown key"),
    ],
)
def test_a_bad_adaptive_setting_names_its_field(seeds, field, message):
    with pytest.raises(ConfigError) as caught:
        resolve_suite(adaptive_suite(seeds), load_registry())
    assert caught.value.field.startswith(field) and message in str(caught.value)


def test_the_rule_needs_a_compared_primary_metric():
    data = {**adaptive_suite({"min": 3}), "primary_metric": "pretrain_s"}
    with pytest.raises(ConfigError, match=r"seeds\.until: .*'pretrain_s' is not compared"):
        resolve_suite(data, load_registry())


def test_a_look_adds_a_seed_only_where_the_verdict_is_still_open(monkeypatch):
    suite = resolve_suite(
        adaptive_suite({"min": 3, "max": 5}, ("ref", "clear", "open", "blank")), load_registry()
    )
    assert suite.initial_seeds == [0, 1, 2] and suite.reference == "ref"
    cells = plan.suite_cells(suite)
    base = [0.5, 0.6, 0.7]
    values = {
        "ref": base,
        "clear": [x + 0.1 for x in base],  # every difference +0.1: conclusive at once
        "open": [x + d for x, d in zip(base, [0.01, -0.02, 0.015], strict=True)],
        "blank": [float("nan")] * 3,  # no value of the primary metric: not compared, not grown
    }
    runs = pd.DataFrame(
        [{"variant": v, "seed": s, "lp_acc": x} for v, xs in values.items()
         for s, x in enumerate(xs)]
    )  # fmt: skip
    monkeypatch.setattr(plan, "runs_table", lambda records: runs)
    monkeypatch.setattr(plan, "metric_info", lambda records: {})
    look = plan.grow_seeds(suite, cells, [])
    assert look.seeds == {
        "ref": [0, 1, 2, 3], "clear": [0, 1, 2], "open": [0, 1, 2, 3], "blank": [0, 1, 2]
    }  # fmt: skip
    assert "blank" not in look.reasons
    assert look.reasons["clear"] == "conclusive at 3 seeds (all differences equal)"
    assert look.reasons["open"].startswith("inconclusive at 3 seeds")
    # at the maximum nothing grows, whatever the verdict
    at_max = plan.suite_cells(suite, seeds={v: [0, 1, 2, 3, 4] for v in values})
    grown = plan.grow_seeds(suite, at_max, [])
    assert all(len(seeds) == 5 for seeds in grown.seeds.values())


def test_an_adaptive_run_adds_seeds_until_the_maximum_and_a_rerun_replays_it(tmp_path):
    path = write_suite(tmp_path, adaptive_suite({"min": 2, "max": 3}))
    out = tmp_path / "out"
    first = invoke("run", str(path), "--out", str(out), "--device", "cpu")
    assert first.exit_code == 0, first.output
    assert "adaptive seeds: another seed for mlp (3 seeds: the reference), twin (3 seeds: " \
           "still inconclusive)" in " ".join(first.stderr.split())  # fmt: skip
    root = out / "tiny"
    board = pd.read_csv(root / "leaderboard.csv").set_index("variant")
    assert board.loc["twin", "seeds"] == 3 and board.loc["mlp", "seeds"] == 3
    assert board.loc["twin", "verdict"] == "inconclusive"
    assert board.loc["twin", "stopped"] == (
        "inconclusive at the maximum of 3 seeds (all differences 0)"
    )
    assert "the reference" in board.loc["mlp", "stopped"]
    assert "Seeds until the answer is clear" in (root / "leaderboard.md").read_text()
    record = json.loads((root / "suite.json").read_text())
    assert sorted(c["seed"] for c in record["cells"] if c["variant"] == "twin") == [0, 1, 2]
    again = invoke("run", str(path), "--out", str(out), "--device", "cpu")
    assert again.exit_code == 0, again.output
    assert "4 of 4 cells already finished" in again.stderr and "done " not in again.stderr
    added = next(c["cell_id"] for c in record["cells"] if c["seed"] == 2)
    worker = invoke("run-cell", str(root), added)  # a worker finds the seeds a look added
    assert worker.exit_code == 0, worker.output
    assert invoke("leaderboard", str(root)).stdout.count("inconclusive at the maximum") == 1
