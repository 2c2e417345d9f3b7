"""Seeds until the answer is clear (mae_bench/stats.py, SequentialRule): the group-sequential
paired t-test keeps its error rate over repeated looks, finds a one-sd difference, stops early,
and says why it stopped. Simulations are vectorised over variants (numpy) and use random
seeds other than the calibration's."""

import math

import numpy as np
import pytest
from scipy import stats as scipy_stats

from mae_bench.stats import (
    SequentialRule,
    _boundaries,
    _path_t_statistics,
    sequential_compare,
)
from tests.conftest import seed_runs

RULE = SequentialRule(min_seeds=3, max_seeds=10)
VARIANTS = 20_000  # per simulation: Monte-Carlo standard error 0.0015 at a rate of 0.05


def simulate(rule: SequentialRule, deltas: np.ndarray, thresholds=None):
    """The rule applied to each row of ``deltas`` (one simulated variant's per-seed
    differences, ``max_seeds`` of them): (verdict sign +1 / -1 / 0, seeds used) per row."""
    if thresholds is None:
        thresholds = np.array([b.t for b in rule.boundaries()])
    t = _path_t_statistics(deltas)[:, rule.min_seeds - 1 :]
    cross = np.abs(t) >= thresholds
    crossed = cross.any(axis=1)
    look = np.where(crossed, cross.argmax(axis=1), t.shape[1] - 1)
    sign = np.where(crossed, np.sign(np.take_along_axis(t, look[:, None], axis=1)[:, 0]), 0)
    return sign, rule.min_seeds + look


def naive_thresholds(rule: SequentialRule) -> np.ndarray:
    """The fixed-n 95% t-test at every look, without a correction for looking again."""
    looks = np.arange(rule.min_seeds, rule.max_seeds + 1)
    return scipy_stats.t.ppf(1 - rule.alpha / 2, looks - 1)


def test_no_true_difference_keeps_the_error_rate_and_uncorrected_looks_do_not():
    """Mean-0 normal differences of very different spreads: at most 5% of variants end
    ``better`` or ``worse`` (measured 0.0497 pooled), while the fixed-n test at every look
    declares about 17%."""
    rng = np.random.default_rng(2024)
    margin = 3 * math.sqrt(0.05 * 0.95 / VARIANTS)
    pooled, naive = [], []
    for sigma in (0.002, 1.0, 40.0):
        deltas = rng.normal(0.0, sigma, (VARIANTS, RULE.max_seeds))
        sign, _ = simulate(RULE, deltas)
        rate = float(np.mean(sign != 0))
        assert 0.03 < rate < 0.05 + margin, (sigma, rate)
        assert abs(np.mean(sign > 0) - np.mean(sign < 0)) < 0.01  # two-sided, symmetric
        pooled.append(rate)
        naive.append(float(np.mean(simulate(RULE, deltas, naive_thresholds(RULE))[0] != 0)))
    assert np.mean(pooled) < 0.05 + margin / math.sqrt(3)
    assert min(naive) > 0.13  # measured 0.167: why the correction is needed
    heavy = rng.standard_t(5, (VARIANTS, RULE.max_seeds))  # robustness: reported, not asserted
    print(f"false rate: normal {pooled}, naive {naive}, "
          f"t(5) {np.mean(simulate(RULE, heavy)[0] != 0):.4f}")  # fmt: skip


def test_a_difference_of_one_sd_is_found_early_enough_and_the_shape_pays_for_itself():
    """Mean 1, sd 1: found ``better`` within 10 seeds in about 75% of variants (a fixed
    10-seed t-test: 80%), with 8.4 seeds on average; Pocock's flat boundary finds 61%."""
    rng = np.random.default_rng(7)
    deltas = rng.normal(1.0, 1.0, (VARIANTS, RULE.max_seeds))
    sign, seeds = simulate(RULE, deltas)
    power = float(np.mean(sign > 0))
    fixed = scipy_stats.nct.sf(scipy_stats.t.ppf(0.975, 9), 9, math.sqrt(10))  # 0.803
    assert 0.73 < power < fixed + 0.01
    assert np.mean(sign < 0) < 0.001  # never the wrong way round
    assert float(np.mean(seeds)) < 8.7  # early stopping saves seeds (measured 8.4)
    assert np.mean(seeds[sign == 0]) == RULE.max_seeds
    pocock, _ = simulate(SequentialRule(3, 10, shape="pocock"), deltas)
    assert power - float(np.mean(pocock > 0)) > 0.08  # why O'Brien-Fleming is the default
    print(f"power {power:.4f} (fixed 10: {fixed:.4f}), mean seeds {np.mean(seeds):.3f}")


def test_step_takes_the_same_decisions_as_the_simulation_seed_by_seed():
    rng = np.random.default_rng(11)
    deltas = rng.normal(0.8, 1.0, (200, RULE.max_seeds))
    deltas[:50] *= -1.0  # some worse as well
    signs, seeds = simulate(RULE, deltas)
    direct = scipy_stats.ttest_1samp(deltas[:5, :6], 0.0, axis=1).statistic
    assert _path_t_statistics(deltas[:5])[:, 5] == pytest.approx(direct)
    for row, sign, used in zip(deltas, signs, seeds, strict=True):
        n = RULE.min_seeds
        decision = RULE.step(row[:n], higher_is_better=True)
        while decision.more:
            n += 1
            decision = RULE.step(row[:n], higher_is_better=True)
        assert n == used
        assert decision.verdict == {1: "better", -1: "worse", 0: "inconclusive"}[int(sign)]


def test_decisions_and_their_reasons():
    clear = RULE.step(np.array([1.0, 1.2, 0.9, 1.1]), higher_is_better=True)
    assert (clear.verdict, clear.more, clear.seeds) == ("better", False, 4)
    assert clear.reason.startswith("conclusive at 4 seeds")
    assert clear.t == pytest.approx(scipy_stats.ttest_1samp([1.0, 1.2, 0.9, 1.1], 0).statistic)
    assert clear.threshold == RULE.boundaries()[1].t
    early = RULE.step(np.array([0.3, -0.1, 0.2]), higher_is_better=True)
    assert (early.verdict, early.more) == ("inconclusive", True)
    assert early.reason.startswith("inconclusive at 3 seeds") and "one more seed" in early.reason
    last = RULE.step(np.array([0.3, -0.1, 0.2, 0.1, -0.2, 0.0, 0.1, 0.2, -0.1, 0.1]), True)
    assert (last.verdict, last.more) == ("inconclusive", False)
    assert last.reason.startswith("inconclusive at the maximum of 10 seeds")
    few = RULE.step(np.array([5.0, 5.1]), higher_is_better=True)
    assert (few.verdict, few.more, few.seeds) == ("inconclusive", True, 2)
    assert few.reason.startswith("fewer than min seeds") and math.isnan(few.threshold)
    with pytest.raises(ValueError, match="stops at 10"):
        RULE.step(np.zeros(11), higher_is_better=True)


def test_direction_follows_the_metric():
    down = np.array([-0.05, -0.04, -0.06, -0.05, -0.05, -0.04, -0.06])  # e.g. an error rate
    assert RULE.step(down, higher_is_better=False).verdict == "better"
    assert RULE.step(down, higher_is_better=True).verdict == "worse"
    assert RULE.step(-down, higher_is_better=False).verdict == "worse"


def test_degenerate_differences():
    equal = RULE.step(np.array([0.1, 0.1, 0.1]), higher_is_better=True)  # sd 0: t infinite
    assert (equal.verdict, equal.more, equal.t) == ("better", False, math.inf)
    assert equal.reason == "conclusive at 3 seeds (all differences equal)"
    assert RULE.step(np.array([-2.0] * 3), higher_is_better=True).verdict == "worse"
    zero = RULE.step(np.zeros(5), higher_is_better=True)  # no evidence either way
    assert (zero.verdict, zero.more) == ("inconclusive", True)
    assert "all differences 0" in zero.reason
    assert RULE.step(np.zeros(10), higher_is_better=True).more is False
    nothing = RULE.step(np.full(4, np.nan), higher_is_better=True)  # NaN: no data
    assert (nothing.verdict, nothing.more, nothing.seeds) == ("inconclusive", True, 0)
    assert nothing.reason.startswith("fewer than min seeds (0 of 3")
    gaps = RULE.step(np.array([0.1, np.nan, 0.1, 0.1]), higher_is_better=True)
    assert (gaps.verdict, gaps.seeds) == ("better", 3)  # the seed without a result is skipped
    spent = RULE.step(np.array([0.1, 0.1] + [np.nan] * 8), higher_is_better=True)
    assert (spent.verdict, spent.more) == ("inconclusive", False)  # never beyond max
    assert "at the maximum of 10 seeds" in spent.reason


def test_boundaries_are_deterministic_and_shaped_as_documented():
    first = RULE.boundaries()
    _boundaries.cache_clear()
    again = SequentialRule(3, 10).boundaries()
    assert again == first and [b.seeds for b in first] == list(range(3, 11))
    t, p = np.array([b.t for b in first]), np.array([b.p for b in first])
    assert np.all(np.diff(t) < 0) and np.all(np.diff(p) > 0)  # O'Brien-Fleming: strict early
    assert p[-1] == pytest.approx(0.032, abs=0.002) and t[0] > 50  # 3 seeds: overwhelming only
    assert 0.05 / 8 < p[-1] < 0.05  # between Bonferroni over 8 looks and no correction
    assert t == pytest.approx(scipy_stats.t.ppf(1 - p / 2, np.arange(2, 10)))
    flat = SequentialRule(3, 10, shape="pocock").boundaries()
    assert len({round(b.p, 12) for b in flat}) == 1 and flat[0].p == pytest.approx(0.0118, 0.03)
    assert np.all(np.diff([b.t for b in flat]) < 0)
    (single,) = SequentialRule(5, 5).boundaries()  # one look: the fixed-n t-test exactly
    assert single == (5, pytest.approx(scipy_stats.t.ppf(0.975, 4)), 0.05)
    assert SequentialRule(3, 10, alpha=0.01).boundaries()[-1].p < p[-1]


def test_rules_refuse_what_they_cannot_calibrate():
    for bad in ({"min_seeds": 1}, {"min_seeds": 5, "max_seeds": 4}, {"alpha": 0.0},
                {"shape": "linear"}):  # fmt: skip
        with pytest.raises(ValueError):
            SequentialRule(**bad)


def test_every_variant_against_the_reference_with_its_reason():
    ref = [0.50, 0.52, 0.51, 0.49, 0.50]
    runs = seed_runs({
        "ref": ref,
        "clearly": [x + 0.1 + 0.001 * i for i, x in enumerate(ref)],
        "noise": [x + d for x, d in zip(ref, [0.02, -0.03, 0.01, -0.01, 0.0], strict=True)],
        "failed": [x if i < 4 else math.nan for i, x in enumerate(ref)],
    })  # fmt: skip
    table = sequential_compare(runs, "acc", "ref", True, RULE).set_index("variant")
    assert table.loc["clearly", "verdict"] == "better" and not table.loc["clearly", "more"]
    assert table.loc["clearly", "reason"].startswith("conclusive at 5 seeds")
    assert table.loc["clearly", "delta"] == pytest.approx(0.102)
    assert table.loc["noise", "verdict"] == "inconclusive" and table.loc["noise", "more"]
    assert table.loc["failed", "seeds"] == 5 and "4 with a result" in table.loc["failed", "reason"]
    assert sequential_compare(runs, "acc", "missing", True, RULE).empty
