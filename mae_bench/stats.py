"""Comparisons with few seeds: each variant against a reference, paired by seed.

Seeds are paired (same seed: same label subset, same evaluation masks, same data order), so
the question "does this variant beat the reference?" is asked of the per-seed differences:
their mean, a 95% Student-t interval (scipy.stats.t quantiles: exact for normal differences
at any number of pairs, where a percentile bootstrap of 3 differences is just their range
and covers the truth about 74% of the time), the probability of improvement (share of seed
pairs it wins, ties half), and an exact Wilcoxon signed-rank p-value (scipy.stats.wilcoxon)
with Holm's correction over the variants compared. The verdict is ``better`` / ``worse``
only when the interval excludes 0 *and* the corrected p < 0.05; otherwise ``inconclusive``.
With few seeds the Wilcoxon test cannot reach 0.05 at all (3 seeds: p >= 0.25);
:func:`seeds_needed` says how many it would take.

Adaptive seeds (``seeds: {min, max, until: conclusive}``) use :class:`SequentialRule`
instead: a group-sequential paired t-test looked at after every seed, with O'Brien-Fleming
boundaries that keep the two-sided error rate of each variant at 0.05 over all the looks;
:func:`sequential_compare` gives every variant's verdict, whether it needs another seed and why.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import pandas as pd

ALPHA = 0.05
COLUMNS = [
    "variant", "metric", "reference", "pairs", "delta", "delta_ci95_low", "delta_ci95_high",
    "prob_improve", "p_value", "p_holm", "verdict",
]  # fmt: skip


def seeds_needed(comparisons: int, alpha: float = ALPHA) -> int:
    """Fewest seed pairs with which an exact two-sided Wilcoxon test can reach ``alpha``
    after Holm's correction over ``comparisons`` variants: its smallest p is 2 / 2**n."""
    return max(1, math.floor(math.log2(2 * max(1, comparisons) / alpha)) + 1)


def holm(p_values: list[float]) -> list[float]:
    """Holm's step-down adjusted p-values (NaN stays NaN and does not count)."""
    valid = [(p, i) for i, p in enumerate(p_values) if not math.isnan(p)]
    adjusted = [float("nan")] * len(p_values)
    running = 0.0
    for rank, (p, i) in enumerate(sorted(valid)):
        running = max(running, min(1.0, (len(valid) - rank) * p))
        adjusted[i] = running
    return adjusted


def t_halfwidth(std: Any, n: Any, confidence: float = 1 - ALPHA) -> Any:
    """Half-width of the Student-t interval of a mean of ``n`` values of sample standard
    deviation ``std`` (numbers, arrays or pandas Series alike; NaN for fewer than 2)."""
    from scipy.stats import t  # slow to import: only where it computes

    n = np.asarray(n, dtype=float)
    dof = np.where(n > 1, n - 1, np.nan)
    quantile = t.ppf(0.5 + confidence / 2, dof)
    return (quantile if quantile.ndim else float(quantile)) * std / np.sqrt(n)


def mean_interval(values: np.ndarray, confidence: float = 1 - ALPHA) -> tuple[float, float]:
    """Student-t interval of the mean of ``values`` (NaN bounds with fewer than 2 values; the
    mean itself when they are all equal)."""
    values = np.asarray(values, dtype=float)
    if len(values) < 2:
        return float("nan"), float("nan")
    mean = float(np.mean(values))
    half = float(t_halfwidth(float(np.std(values, ddof=1)), len(values), confidence))
    return mean - half, mean + half


def paired(deltas: np.ndarray, higher_is_better: bool) -> dict[str, float]:
    """Mean difference, its 95% Student-t interval, the probability of improvement and the
    Wilcoxon p-value of per-seed differences ``variant - reference``."""
    from scipy.stats import wilcoxon  # slow to import: only where it computes

    n = len(deltas)
    out = {"pairs": n, "delta": float(np.mean(deltas)) if n else float("nan")}
    low, high = mean_interval(deltas)
    p_value = float("nan")
    if n >= 2:
        p_value = 1.0 if np.all(deltas == 0) else float(wilcoxon(deltas).pvalue)
    wins = deltas > 0 if higher_is_better else deltas < 0
    out.update(
        delta_ci95_low=low,
        delta_ci95_high=high,
        prob_improve=float(np.mean(wins + 0.5 * (deltas == 0))) if n else float("nan"),
        p_value=p_value,
    )
    return out


def compare(
    runs: pd.DataFrame,
    metrics: list[str],
    reference: str,
    higher_is_better: dict[str, bool],
) -> pd.DataFrame:
    """Every variant against ``reference`` on every metric in ``metrics``, paired by seed."""
    rows = []
    if reference not in set(runs["variant"]):
        return pd.DataFrame(columns=COLUMNS)
    by_variant = {name: group.set_index("seed") for name, group in runs.groupby("variant")}
    base = by_variant[reference]
    for metric in metrics:
        if metric not in runs:
            continue
        better = higher_is_better.get(metric, True)
        batch = []
        for name, group in by_variant.items():
            if name == reference:
                continue
            both = pd.concat([group[metric], base[metric]], axis=1, join="inner").dropna()
            deltas = (both.iloc[:, 0] - both.iloc[:, 1]).to_numpy(dtype=float)
            if len(deltas) == 0:
                continue
            batch.append({"variant": name, "metric": metric, "reference": reference,
                          **paired(deltas, better)})  # fmt: skip
        for row, adjusted in zip(batch, holm([r["p_value"] for r in batch]), strict=True):
            row["p_holm"] = adjusted
            row["verdict"] = verdict(row, better)
        rows += batch
    return pd.DataFrame(rows, columns=COLUMNS)


def verdict(row: dict[str, float], higher_is_better: bool) -> str:
    """``better`` / ``worse`` when the interval excludes 0 and Holm's p < 0.05."""
    low, high, p = row["delta_ci95_low"], row["delta_ci95_high"], row["p_holm"]
    if math.isnan(p) or not (p < ALPHA) or math.isnan(low):
        return "inconclusive"
    if low > 0 or high < 0:
        up = low > 0
        return "better" if up == higher_is_better else "worse"
    return "inconclusive"


# --- Adaptive seeds: a group-sequential paired t-test ---------------------------------------

SHAPES = ("obrien-fleming", "pocock")
SEQUENTIAL_COLUMNS = [
    "variant", "metric", "reference", "seeds", "delta", "t", "threshold", "verdict", "more",
    "reason",
]  # fmt: skip
_CALIBRATION_SEED = 19  # issue 19: any fixed seed; the boundaries depend on it only through
_CALIBRATION_PATHS = 200_000  # Monte-Carlo error, which the 2-standard-error margin absorbs


class Boundary(NamedTuple):
    """The crossing threshold at the look made with ``seeds`` differences: ``|t| >= t``, or
    equivalently a nominal two-sided p-value of the one-sample t-test ``<= p``."""

    seeds: int
    t: float
    p: float


@dataclass(frozen=True)
class SequentialDecision:
    """What :meth:`SequentialRule.step` says after a look: the ``verdict`` (``better`` /
    ``worse`` / ``inconclusive``), whether to run one ``more`` seed, a short ``reason``, the
    number of ``seeds`` with a result, the ``t`` statistic of their mean difference and the
    ``threshold`` on ``|t|`` at this look (both NaN when no look was made)."""

    verdict: str
    more: bool
    reason: str
    seeds: int
    t: float
    threshold: float


@dataclass(frozen=True)
class SequentialRule:
    """Seeds until the answer is clear: a group-sequential paired t-test of one variant
    against the reference, with a look after every seed from ``min_seeds`` to ``max_seeds``.

    At the look with ``n`` per-seed differences ``variant - reference`` the one-sample
    t statistic ``mean / (sd / sqrt(n))`` is compared with :meth:`boundaries`: the variant is
    ``better`` or ``worse`` (by the sign and ``higher_is_better``) as soon as ``|t|`` reaches
    the look's threshold, and stops; otherwise it gets one more seed, up to ``max_seeds``,
    where an uncrossed look is ``inconclusive``. Looking after every seed without a
    correction would be wrong: the fixed-n 95% test repeated at 3..10 seeds declares a
    difference that is not there in 16.7% of variants, not 5%.

    Guarantee: for each compared variant separately (not for the family of variants: pass
    ``alpha / k`` for that), with normally distributed per-seed differences of mean 0 and any
    variance, the probability that any look crosses, in either direction, is at most
    ``alpha`` (two-sided, 0.05 by default). The t statistic is then pivotal, so the
    thresholds are calibrated once per ``(min_seeds, max_seeds, alpha, shape)`` by a
    fixed-seed Monte-Carlo of 200,000 standard-normal paths (deterministic, cached, about
    0.4 s for 3..10 seeds), aiming at ``alpha`` less two Monte-Carlo standard errors
    (0.049 for 0.05) so that its error cannot push the rate above ``alpha``. Skipping looks
    (several seeds added at once, a seed without a result) only lowers the error rate; a look
    beyond ``max_seeds`` is refused.

    Shape: Wang-Tsiatis boundaries ``z_n = c * (n / max_seeds) ** (D - 1/2)`` on the normal
    scale, turned into the nominal p-value ``2 * Phi(-z_n)`` and then into a t threshold with
    ``n - 1`` degrees of freedom; ``c`` is calibrated. ``obrien-fleming`` (``D = 0``, the
    default) keeps the last look nearly as lenient as a fixed test: for 3..10 seeds the
    nominal p-values run from 0.0001 at 3 seeds to 0.032 at 10 (``|t|`` from 105 to 2.53,
    against 2.26 for a fixed 10-seed test). ``pocock`` (``D = 1/2``) uses the same nominal p
    at every look (0.012; ``|t|`` from 9.1 to 3.15). Measured for 3..10 seeds with 2,000,000
    simulated variants per row (normal differences; d = true mean / sd of the per-seed
    differences; power: the share found ``better`` in the true direction by the last look;
    seeds: the mean number of seeds a variant used):

    =================  ==========  =========  ==========  ===========  ============
    rule               false rate  power d=1  seeds d=1   power d=1.5  seeds d=1.5
    =================  ==========  =========  ==========  ===========  ============
    obrien-fleming     0.049       0.75       8.4         0.98         7.1
    pocock             0.049       0.61       8.0         0.93         6.3
    fixed 10 seeds     0.050       0.80       10          0.99         10
    uncorrected looks  0.167       0.86       6.2         0.99         4.6
    =================  ==========  =========  ==========  ===========  ============

    O'Brien-Fleming is chosen: with at most 10 seeds, most of the power is at the last look,
    where Pocock's stricter threshold loses 14 points of power to save 0.4 of a seed; looks
    with 2 or 3 degrees of freedom can only stop overwhelming differences anyway. With
    heavier-tailed differences (Student t with 5 degrees of freedom) and no true difference
    the rate measured 0.041: the test stays conservative there.
    """

    min_seeds: int = 3
    max_seeds: int = 10
    alpha: float = ALPHA
    shape: str = "obrien-fleming"

    def __post_init__(self) -> None:
        if not 2 <= self.min_seeds <= self.max_seeds:
            raise ValueError(
                f"seeds: need 2 <= min <= max, got min {self.min_seeds}, max {self.max_seeds}"
            )
        if not 0 < self.alpha < 1:
            raise ValueError(f"alpha must be in (0, 1), got {self.alpha}")
        if self.shape not in SHAPES:
            raise ValueError(f"shape must be one of {', '.join(SHAPES)}, got {self.shape!r}")

    def boundaries(self) -> tuple[Boundary, ...]:
        """One :class:`Boundary` per look, ``min_seeds`` to ``max_seeds`` seeds (cached)."""
        return _boundaries(self.min_seeds, self.max_seeds, float(self.alpha), self.shape)

    def step(self, deltas: np.ndarray, higher_is_better: bool) -> SequentialDecision:
        """The decision after the seeds run so far: ``deltas`` holds one difference
        ``variant - reference`` per seed (NaN for a seed without a result, which counts as
        no data), at most ``max_seeds`` of them."""
        deltas = np.asarray(deltas, dtype=float).ravel()
        if len(deltas) > self.max_seeds:
            raise ValueError(f"{len(deltas)} seeds: the rule stops at {self.max_seeds}")
        valid = deltas[np.isfinite(deltas)]
        n = len(valid)
        room = len(deltas) < self.max_seeds
        at_max = "" if room else f" at the maximum of {self.max_seeds} seeds"
        if n < self.min_seeds:
            reason = f"fewer than min seeds ({n} of {self.min_seeds} with a result){at_max}"
            return SequentialDecision("inconclusive", room, reason, n, math.nan, math.nan)
        threshold = self.boundaries()[n - self.min_seeds].t
        mean = float(np.mean(valid))
        sd = 0.0 if np.all(valid == valid[0]) else float(np.std(valid, ddof=1))  # no rounding
        if sd > 0:
            t = mean / (sd / math.sqrt(n))
        else:  # all equal: infinitely sure of a nonzero mean, no evidence at all for 0
            t = math.copysign(math.inf, mean) if mean != 0 else math.nan
        if abs(t) >= threshold:
            verdict = "better" if (t > 0) == higher_is_better else "worse"
            why = "all differences equal" if sd == 0 else f"t {t:.3g}, beyond ±{threshold:.3g}"
            return SequentialDecision(verdict, False, f"conclusive at {n} seeds ({why})", n, t,
                                      threshold)  # fmt: skip
        why = "all differences 0" if math.isnan(t) else f"t {t:.3g}, within ±{threshold:.3g}"
        if n < len(deltas):
            why = f"{n} with a result, {why}"
        reason = f"inconclusive at the maximum of {self.max_seeds} seeds ({why})"
        if room:
            reason = f"inconclusive at {len(deltas)} seeds ({why}): one more seed"
        return SequentialDecision("inconclusive", room, reason, n, t, threshold)


def sequential_compare(
    runs: pd.DataFrame,
    metric: str,
    reference: str,
    higher_is_better: bool,
    rule: SequentialRule,
) -> pd.DataFrame:
    """:meth:`SequentialRule.step` for every variant against ``reference`` on ``metric``
    (paired by seed, NaN metric values counting as seeds without a result): one row per
    variant with the :data:`SEQUENTIAL_COLUMNS` (``more``: the variant needs another seed)."""
    if reference not in set(runs["variant"]) or metric not in runs:
        return pd.DataFrame(columns=SEQUENTIAL_COLUMNS)
    by_variant = {name: group.set_index("seed") for name, group in runs.groupby("variant")}
    base = by_variant[reference][metric]
    rows = []
    for name, group in by_variant.items():
        if name == reference:
            continue
        both = pd.concat([group[metric], base], axis=1, join="inner").sort_index()
        deltas = (both.iloc[:, 0] - both.iloc[:, 1]).to_numpy(dtype=float)
        decision = rule.step(deltas, higher_is_better)
        rows.append({
            "variant": name, "metric": metric, "reference": reference,
            "seeds": len(deltas),
            "delta": float(np.nanmean(deltas)) if decision.seeds else math.nan,
            "t": decision.t, "threshold": decision.threshold, "verdict": decision.verdict,
            "more": decision.more, "reason": decision.reason,
        })  # fmt: skip
    return pd.DataFrame(rows, columns=SEQUENTIAL_COLUMNS)


def _path_t_statistics(x: np.ndarray) -> np.ndarray:
    """One-sample t statistics of the first ``1..m`` values of each row of ``x`` (``m``
    columns; the first column, one value, is NaN): the looks of a sequential test."""
    x = np.asarray(x, dtype=float)
    n = np.arange(1, x.shape[-1] + 1, dtype=float)
    total = np.cumsum(x, axis=-1)
    mean = total / n
    with np.errstate(divide="ignore", invalid="ignore"):
        var = (np.cumsum(x * x, axis=-1) - total * mean) / (n - 1)
        return mean / np.sqrt(np.maximum(var, 0.0) / n)


@functools.cache
def _boundaries(min_seeds: int, max_seeds: int, alpha: float, shape: str) -> tuple[Boundary, ...]:
    from scipy import special  # slow to import: only where it computes

    looks = np.arange(min_seeds, max_seeds + 1)
    dof = looks - 1.0
    if min_seeds == max_seeds:  # one look: the fixed-n t-test, exactly
        return (Boundary(max_seeds, float(-special.stdtrit(dof[0], alpha / 2)), alpha),)
    exponent = 0.0 if shape == "obrien-fleming" else 0.5  # Wang-Tsiatis D
    weight = (looks / max_seeds) ** (0.5 - exponent)  # z_n * weight >= c at a crossing
    rng = np.random.default_rng(_CALIBRATION_SEED)
    rows = max(1, 1_000_000 // max_seeds)
    largest = []
    for start in range(0, _CALIBRATION_PATHS, rows):
        size = min(rows, _CALIBRATION_PATHS - start)
        t = _path_t_statistics(rng.standard_normal((size, max_seeds)))[:, min_seeds - 1 :]
        p = 2 * special.stdtr(dof, -np.abs(t))  # nominal two-sided p-value at each look
        largest.append(np.max(-special.ndtri(p / 2) * weight, axis=1))
    margin = 2 * math.sqrt(alpha * (1 - alpha) / _CALIBRATION_PATHS)
    c = float(np.quantile(np.concatenate(largest), 1 - max(alpha - margin, alpha / 2)))
    p_look = 2 * special.ndtr(-c / weight)
    t_look = -special.stdtrit(dof, p_look / 2)
    return tuple(
        Boundary(int(n), float(t), float(p)) for n, t, p in zip(looks, t_look, p_look, strict=True)
    )
