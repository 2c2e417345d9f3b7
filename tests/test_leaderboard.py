"""Leaderboards (mae_bench/leaderboard.py): aggregation over seeds, ranking, the markdown
table's marks (best, overlap, comparisons, flags) and the glossary."""

import math

import pandas as pd
import pytest

from mae_bench.leaderboard import leaderboard_markdown, leaderboard_table
from tests.conftest import seed_runs


def _runs(values: dict[str, list[float]]) -> pd.DataFrame:
    rows = []
    for variant, accs in values.items():
        for seed, acc in enumerate(accs):
            rows.append(
                {
                    "variant": variant,
                    "seed": seed,
                    "encoder": "e",
                    "masking": "m",
                    "loss": "l",
                    "lp_acc": acc,
                    "hf_error": 1 - acc,
                }
            )
    return pd.DataFrame(rows)


INFO = {
    "lp_acc": {"higher_is_better": True, "fmt": "{:.3f}", "headline": True},
    "hf_error": {"higher_is_better": False, "fmt": "{:.4f}", "headline": True},
}


def test_aggregation_mean_std_ci_and_ranking():
    board = leaderboard_table(
        _runs({"a": [0.5, 0.6, 0.7], "b": [0.8, 0.81, 0.82], "c": [0.6, 0.7, 0.8]}), info=INFO
    )
    assert board["variant"].tolist() == ["b", "c", "a"] and board["rank"].tolist() == [1, 2, 3]
    a = board.set_index("variant").loc["a"]
    assert a["lp_acc"] == pytest.approx(0.6) and a["lp_acc_std"] == pytest.approx(0.1)
    assert a["lp_acc_ci95"] == pytest.approx(4.302653 * 0.1 / math.sqrt(3), rel=1e-5)
    overlaps = board.set_index("variant")["overlaps_leader"]
    assert overlaps["b"] is True and overlaps["c"] is True  # 0.7 ± 0.248 reaches 0.8
    assert overlaps["a"] is True or overlaps["a"] is False
    lower = leaderboard_table(
        _runs({"a": [0.5, 0.6, 0.7], "b": [0.8, 0.81, 0.82]}), "hf_error", INFO
    )
    assert lower["variant"].tolist() == ["b", "a"]  # lower hf_error ranks first
    single = leaderboard_table(_runs({"a": [0.5], "b": [0.9]}))
    assert math.isnan(single["lp_acc_ci95"].iloc[0]) and pd.isna(single["overlaps_leader"][1])


def test_markdown_bolds_best_and_marks_overlap():
    board = leaderboard_table(
        _runs({"a": [0.5, 0.6, 0.7], "b": [0.8, 0.81, 0.82], "c": [0.6, 0.7, 0.8]}), info=INFO
    )
    md = leaderboard_markdown(board, "t", INFO)
    assert "**0.810 ± 0.010**" in md and "| c ≈" in md and "| b " in md
    assert "**0.1900 ± 0.0100**" in md  # hf_error: lower is best


def test_leaderboard_shows_the_comparison_and_says_when_seeds_are_too_few():
    info = {"acc": {"higher_is_better": True, "fmt": "{:.3f}", "headline": True}}
    runs = seed_runs({"ref": [0.5, 0.6, 0.7], "b": [0.6, 0.7, 0.8]})
    board = leaderboard_table(runs, "acc", info, reference="ref")
    row = board.set_index("variant").loc["b"]
    assert row["delta"] == pytest.approx(0.1) and row["verdict"] == "inconclusive"
    assert row["prob_improve"] == 1.0 and row["p_value"] == pytest.approx(0.25)
    assert board.set_index("variant").loc["ref", "verdict"] == "reference"
    text = leaderboard_markdown(board, "t", info, "acc")
    assert "+0.100 [+0.100, +0.100] inconclusive" in text
    assert "With 3 paired seeds no verdict can be reached" in text
    assert "the exact Wilcoxon test needs at least 6 paired seeds for 1 comparison" in text


def test_a_flagged_metric_below_one_marks_the_variant():
    info = {
        "acc": {"higher_is_better": True, "fmt": "{:.3f}", "headline": True},
        "converged": {"compare": False, "flag": "still improving at the end"},
    }
    runs = seed_runs({"a": [0.5, 0.6], "b": [0.6, 0.7]})
    runs["converged"] = [1.0, 1.0, 0.0, 1.0]
    text = leaderboard_markdown(leaderboard_table(runs, "acc", info), "t", info, "acc")
    assert "| b ‡" in text and "| a ‡" not in text
    assert "‡: still improving at the end (`converged` < 1)." in text
