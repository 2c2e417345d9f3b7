"""Paired comparisons and the seeds a verdict needs (mae_bench/stats.py), checked against
hand-computed cases."""

import math

import numpy as np
import pytest

from mae_bench.stats import compare, holm, mean_interval, paired, seeds_needed
from tests.conftest import seed_runs


def test_exact_wilcoxon_interval_and_win_rate_by_hand():
    out = paired(np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6]), higher_is_better=True)
    assert out["pairs"] == 6 and out["delta"] == pytest.approx(0.35)
    assert out["p_value"] == pytest.approx(2 / 2**6)  # all six differences positive
    assert out["prob_improve"] == 1.0
    half = 2.5706 * np.std([0.1, 0.2, 0.3, 0.4, 0.5, 0.6], ddof=1) / math.sqrt(6)  # t(0.975, 5)
    assert out["delta_ci95_low"] == pytest.approx(0.35 - half, abs=1e-4)
    assert out["delta_ci95_high"] == pytest.approx(0.35 + half, abs=1e-4)
    mixed = paired(np.array([0.2, -0.1, 0.0]), higher_is_better=True)
    assert mixed["prob_improve"] == pytest.approx((1 + 0 + 0.5) / 3)  # ties count half
    lower = paired(np.array([-0.2, -0.1, -0.3]), higher_is_better=False)  # e.g. an error
    assert lower["prob_improve"] == 1.0 and lower["p_value"] == pytest.approx(0.25)
    assert math.isnan(paired(np.array([0.4]), True)["p_value"])


def test_holm_and_the_seeds_a_verdict_needs():
    assert holm([0.03125, 0.5]) == pytest.approx([0.0625, 0.5])
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert math.isnan(holm([float("nan"), 0.02])[0]) and holm([float("nan"), 0.02])[1] == 0.02
    # exact two-sided Wilcoxon: smallest p is 2 / 2**n, which Holm multiplies by m
    assert [seeds_needed(m) for m in (1, 2, 6)] == [6, 7, 8]
    assert 2 / 2**6 < 0.05 <= 2 / 2**5


def test_verdicts_need_both_the_interval_and_the_corrected_test():
    ref = [0.50, 0.52, 0.51, 0.49, 0.50, 0.53, 0.48, 0.51]  # 8 seeds: 3 comparisons can pass
    up = [0.1, 0.12, 0.09, 0.11, 0.1, 0.13, 0.1, 0.12]
    jitter = [0.02, -0.03, 0.01, -0.01, 0.03, -0.02, 0.01, -0.02]
    runs = seed_runs({
        "ref": ref,
        "clearly": [x + d for x, d in zip(ref, up, strict=True)],
        "worse": [x - 0.05 - 0.01 * i for i, x in enumerate(ref)],
        "noise": [x + d for x, d in zip(ref, jitter, strict=True)],
    })  # fmt: skip
    table = compare(runs, ["acc"], "ref", {"acc": True}).set_index("variant")
    assert table.loc["clearly", "verdict"] == "better" and table.loc["worse", "verdict"] == "worse"
    assert table.loc["noise", "verdict"] == "inconclusive"
    assert table.loc["clearly", "p_holm"] == pytest.approx(3 * 2 / 2**8)  # Holm over 3
    three = compare(seed_runs({"ref": ref[:3], "clearly": [x + 0.1 for x in ref[:3]]}), ["acc"],
                    "ref", {"acc": True})  # fmt: skip
    assert three["verdict"].tolist() == ["inconclusive"]  # 3 seeds: p >= 0.25, never < 0.05


@pytest.mark.parametrize("n", [3, 5, 10])
def test_the_paired_interval_covers_the_truth_95_percent_of_the_time(n):
    """Normal differences of true mean 0: the "95%" interval must hold 0 in 93-97% of
    simulated studies (a percentile bootstrap of 3 differences held it 74% of the time)."""
    rng = np.random.default_rng(n)
    trials = 2000
    covered = 0
    for _ in range(trials):
        low, high = mean_interval(rng.normal(0.0, 0.02, n))
        covered += low <= 0.0 <= high
    assert 0.93 <= covered / trials <= 0.97


def test_no_interval_from_one_value_and_a_point_from_equal_values():
    assert all(math.isnan(b) for b in mean_interval(np.array([0.3])))
    assert mean_interval(np.array([0.2, 0.2, 0.2])) == pytest.approx((0.2, 0.2))
