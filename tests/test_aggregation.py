"""How the leaderboard aggregates over seeds and evaluators (mae_bench/leaderboard.py): seeds
counted per metric, one evaluator per summary column, shared ranks, paired-seed counts,
timings kept out of the comparisons and marked when measured in different runs."""

from __future__ import annotations

from typing import Any

import pandas as pd
import pytest
from mae_bench_plugins.probes import HELD_OUT_THRESHOLD_METRICS

from mae_bench.leaderboard import (
    leaderboard_markdown,
    leaderboard_table,
    metric_info,
    runs_table,
    write_leaderboard,
)
from mae_bench.metrics import CORE_METRICS, classification_metric_info
from mae_bench.results import COMPARISONS_FILE, CellStore, read_suite_record, recorded_cells
from tests.conftest import seed_runs

ACC = {"acc": {"higher_is_better": True, "fmt": "{:.3f}", "headline": True}}


# ------------------------------------------------------------------ seeds per metric
def test_a_nan_seed_is_not_a_seed_of_that_metric():
    """0.80, 0.90 and a NaN: two seeds have a value, so the interval is the Student-t one of
    two values (0.635), not of three (0.176), and the table says 2 of 3."""
    runs = seed_runs({"a": [0.80, 0.90, float("nan")], "b": [0.70, 0.75, 0.80]})
    board = leaderboard_table(runs, "acc", ACC).set_index("variant")
    assert board.loc["a", "seeds"] == 3 and board.loc["a", "acc_seeds"] == 2
    assert board.loc["a", "acc"] == pytest.approx(0.85)
    assert board.loc["a", "acc_ci95"] == pytest.approx(0.635, abs=5e-4)
    assert board.loc["b", "acc_seeds"] == 3
    text = leaderboard_markdown(board.reset_index(), "t", ACC, "acc")
    assert "**0.850 ± 0.071** (2/3)" in text and "0.750 ± 0.050 (" not in text
    assert "(k/n): only k of the variant's n seeds have a value" in text


# ------------------------------------------------------------------ summary columns
def _record(variant: str, seed: int, baseline: bool, lp: float, ft: float) -> dict[str, Any]:
    """A finished cell evaluated by a linear probe and fine-tuning (as stored)."""
    evaluations = {}
    for name, prefix, value, priority, trains in (
        ("linear_probe", "lp_", lp, 10, False),
        ("finetune", "ft_", ft, 0, True),
    ):
        info = classification_metric_info(prefix, name, ("acc", "f1_macro"))
        metrics = {f"{prefix}{k}": value for k in ("acc", "f1_macro", "auc")}
        metrics |= {f"{prefix}precision_macro": value, f"{prefix}recall_macro": value}
        evaluations[name] = {
            "evaluator": name,
            "eval_id": f"{name}-{variant}-{seed}",
            "metrics": metrics,
            "info": {k: info[k].as_dict() for k in metrics},
            "metric_order": list(metrics),
            "tables": [],
            "trains_encoder": trains,
            "summary_priority": priority,
        }
    return {
        "variant": variant,
        "seed": seed,
        "baseline": baseline,
        "components": {"encoder": "vit", "masking": "random", "loss": "mse"},
        "metrics": {
            **{k: v for e in evaluations.values() for k, v in e["metrics"].items()},
            **({} if baseline else {"pretrain_s": 10.0 + seed, "imgs_per_s": 100.0 + seed}),
        },
        "evaluations": evaluations,
        "evaluation_order": list(evaluations),
        "config_hash": f"{variant}{seed}",
        "cell_id": f"{variant}-seed{seed}",
        "provenance": {"host": "h", "run_id": "h-1-run"},
    }


def test_every_summary_column_comes_from_one_evaluator():
    """A random-init row has no fine-tuning (that is its scratch row): its `f1_macro` stays
    empty rather than holding the linear probe's value beside fine-tuning values."""
    records = [
        _record("vit", 0, False, lp=0.6, ft=0.8),
        _record("random-init-vit", 0, True, lp=0.4, ft=0.3),
    ]
    runs = runs_table(records).set_index("variant")
    for key in ("f1_macro", "auc", "precision_macro", "recall_macro"):
        assert runs.loc["vit", key] == runs.loc["vit", f"ft_{key}"] == 0.8
        assert runs.loc["scratch-vit", key] == 0.3
        assert pd.isna(runs.loc["random-init-vit", key]), key
    info = metric_info(records)
    assert "`ft_f1_macro`" in info["f1_macro"]["description"]
    assert info["f1_macro"]["bounds"] == [0, 1]
    probe_only = _record("vit", 0, False, lp=0.6, ft=0.8)  # a suite without fine-tuning:
    del probe_only["evaluations"]["finetune"]  # the linear probe fills the column
    probe_only["evaluation_order"] = ["linear_probe"]
    probe_only["metrics"] = {k: v for k, v in probe_only["metrics"].items() if "ft_" not in k}
    assert runs_table([probe_only]).loc[0, "f1_macro"] == 0.6


# ------------------------------------------------------------------ ranking
def test_tied_means_share_a_rank_and_rows_without_the_metric_get_none():
    runs = seed_runs({"a": [0.7, 0.8], "b": [0.8, 0.7], "c": [0.5, 0.6], "d": [None, None]})
    board = leaderboard_table(runs, "acc", ACC)
    assert board["variant"].tolist() == ["a", "b", "c", "d"]
    assert board["rank"].tolist()[:3] == [1, 1, 3] and pd.isna(board["rank"].iloc[3])
    assert pd.isna(board["overlaps_leader"].iloc[3])
    text = leaderboard_markdown(board, "t", ACC, "acc")
    assert "| 1      | b " in text  # tied with the leader: no ≈, same rank
    line = next(row for row in text.splitlines() if "| d " in row)
    assert line.startswith("|        | d ")  # no rank at all
    assert board.to_csv(index=False).splitlines()[-1].startswith("d,,")  # blank, not NaN


def test_the_note_counts_paired_seeds_not_seeds():
    """The reference lacks seed 2: two pairs per variant, though each has three seeds."""
    runs = seed_runs({"ref": [0.5, 0.6, float("nan")], "b": [0.6, 0.7, 0.8]})
    board = leaderboard_table(runs, "acc", ACC, reference="ref")
    assert board.set_index("variant").loc["b", "pairs"] == 2
    text = leaderboard_markdown(board, "t", ACC, "acc")
    assert "With 2 paired seeds no verdict can be reached" in text
    assert "needs at least 6 paired seeds for 1 comparison at 0.05" in text
    uneven = seed_runs({"ref": [0.5, 0.6, 0.7], "b": [0.6, float("nan"), 0.8], "c": [0.6] * 3})
    text = leaderboard_markdown(leaderboard_table(uneven, "acc", ACC, reference="ref"), "", ACC)
    assert "With 2 to 3 paired seeds (fewest: b)" in text and "2 comparisons" in text
    one = seed_runs({"ref": [0.5], "b": [0.6]})
    text = leaderboard_markdown(leaderboard_table(one, "acc", ACC, reference="ref"), "", ACC)
    assert "With 1 paired seed no verdict" in text


def test_plurals():
    from mae_bench.leaderboard import plural

    assert [plural(n, "seed") for n in (0, 1, 2)] == ["0 seeds", "1 seed", "2 seeds"]
    assert plural(1, "comparison") == "1 comparison"


# ------------------------------------------------------------------ bounds
def test_metrics_declare_their_range():
    for metric in classification_metric_info("lp_", "the probe").values():
        assert metric.bounds == (0, 1)
    assert HELD_OUT_THRESHOLD_METRICS["best_f1"].bounds == (0, 1)
    assert HELD_OUT_THRESHOLD_METRICS["youden_j"].bounds == (-1, 1)  # on test, may be < 0
    assert CORE_METRICS["pretrain_s"].bounds == (0, None)
    assert CORE_METRICS["final_loss"].bounds == (None, None)  # a loss may be negative


# ------------------------------------------------------------------ timings and echoes
def test_timings_and_thresholds_are_not_compared():
    for name in ("pretrain_s", "imgs_per_s", "peak_mem_mb"):
        assert CORE_METRICS[name].compare is False, name
    for name in ("best_f1_threshold", "youden_threshold"):
        assert HELD_OUT_THRESHOLD_METRICS[name].compare is False, name
    info = metric_info([])
    board = pd.DataFrame(
        {"variant": ["a", "b"], "seeds": [1, 1], "imgs_per_s": [980.0, 21.0],
         "imgs_per_s_std": [float("nan")] * 2}
    )  # fmt: skip
    assert "**980" not in leaderboard_markdown(board, "t", info)
    timing = {"acc": {**ACC["acc"], "compare": False}}  # e.g. ranked by a timing
    runs = seed_runs({"ref": [0.5, 0.6, 0.7], "b": [0.6, 0.7, 0.8]})
    assert "verdict" not in leaderboard_table(runs, "acc", timing, reference="ref")


def test_comparisons_leave_out_what_is_not_compared(tiny_run_copy):
    root = tiny_run_copy.root
    records = list(
        CellStore(root).finished(recorded_cells(read_suite_record(root)), repair=False).values()
    )
    write_leaderboard(root, records, "tiny", "lp_acc")
    compared = set(pd.read_csv(root / COMPARISONS_FILE)["metric"])
    assert "lp_acc" in compared and "psnr_masked" in compared
    assert not compared & {"pretrain_s", "imgs_per_s", "peak_mem_mb", "params_m", "final_loss"}
    assert not compared & {"f1_macro", "auc"}  # copies of a source column, compared once
    board = pd.read_csv(root / "leaderboard.csv")
    assert board["timed_in"].nunique() == 1  # one run, one host: no mark
    assert "not comparable for speed" not in (root / "leaderboard.md").read_text()


def test_timings_from_different_runs_are_marked_not_comparable_for_speed():
    records = [_record("vit", s, False, lp=0.6, ft=0.8) for s in (0, 1)]
    records += [_record("mlp", s, False, lp=0.5, ft=0.7) for s in (0, 1)]
    records[3]["provenance"] = {"host": "other", "run_id": "other-7-later"}
    info = metric_info(records)
    info["pretrain_s"]["headline"] = info["imgs_per_s"]["headline"] = True
    board = leaderboard_table(runs_table(records), "ft_acc", info)
    assert board.set_index("variant").loc["mlp", "timed_in"] == "h-1-run, other-7-later"
    text = leaderboard_markdown(board, "t", info, "ft_acc")
    header = text.splitlines()[2]
    assert "pretrain_s §" in header and "imgs_per_s §" in header and "ft_acc §" not in header
    assert "§: timings measured in 2 different runs or hosts" in text
    assert "not comparable for speed" in text
    same = leaderboard_table(runs_table(records[:2]), "ft_acc", info)
    assert "§" not in leaderboard_markdown(same, "t", info, "ft_acc")
    unknown = [_record("vit", s, False, lp=0.6, ft=0.8) for s in (0, 1)]
    for record in unknown:  # results written before runs were recorded: not known to match
        record["provenance"] = {}
    board = leaderboard_table(runs_table(unknown), "ft_acc", info)
    assert "§" in leaderboard_markdown(board, "t", info, "ft_acc")
