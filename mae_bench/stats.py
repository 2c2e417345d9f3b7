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
"""

from __future__ import annotations

import math
from typing import Any

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
