"""Leaderboards: one row per cell (runs.csv), one row per variant over seeds (leaderboard.*)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pandas as pd

from mae_bench.results import atomic_write_text, read_table

ID_COLUMNS = ["variant", "encoder", "masking", "loss"]
# Metrics shown first (and in the Markdown table), in this order; other numeric metrics follow.
METRICS = [
    "psnr_masked", "psnr_full", "hf_error", "lp_acc", "lp_f1_macro", "knn_acc", "ft_acc",
    "ft_f1_macro", "pretrain_s", "imgs_per_s", "params_m",
]  # fmt: skip
# Unprefixed summary columns: from fine-tuning (ft_*) where it ran, else the linear probe.
HEADLINE = ("f1_macro", "auc", "precision_macro", "recall_macro")
LOWER_IS_BETTER = {"hf_error", "final_loss"}
QUALITY = ("psnr", "acc", "f1", "auc", "precision", "recall", "hf_error", "imgs_per_s")
# Display format by metric-name fragment, first match wins.
FORMATS = [
    ("hf_error", "{:.4f}"), ("psnr", "{:.2f}"), ("per_s", "{:.0f}"), ("threshold", "{:.2f}"),
    ("acc", "{:.3f}"), ("f1", "{:.3f}"), ("auc", "{:.3f}"), ("precision", "{:.3f}"),
    ("recall", "{:.3f}"), ("youden", "{:.3f}"), ("params", "{:.3f}"), ("_s", "{:.1f}"),
]  # fmt: skip


def higher_is_better(metric: str) -> bool:
    """Direction of a metric for ranking and for marking the best value."""
    return metric not in LOWER_IS_BETTER


def scratch_name(baseline_variant: str) -> str:
    """The leaderboard name of a baseline cell's fine-tuning (from-scratch) row."""
    return baseline_variant.replace("random-init", "scratch")


def _baseline_rows(row: dict[str, Any]) -> list[dict[str, Any]]:
    """A no-pretraining cell as two rows: ``random-init`` (frozen features, no ft_*) and
    ``scratch`` (the fine-tuning recipe from random init: ft_* only)."""
    finetuned = {k: v for k, v in row.items() if k.startswith("ft_")}
    frozen = {k: v for k, v in row.items() if not k.startswith("ft_")}
    if not finetuned:
        return [frozen]
    ids = {k: v for k, v in row.items() if not isinstance(v, float) or k == "params_m"}
    scratch = {**ids, **finetuned, "variant": scratch_name(row["variant"])}
    return [frozen, scratch]


def runs_table(records: Iterable[dict[str, Any]]) -> pd.DataFrame:
    """One row per finished cell (two for a baseline cell): components, metrics, config hash."""
    rows = []
    for r in records:
        row = {
            "variant": r["variant"],
            "seed": r["seed"],
            **r["components"],
            "pretrain_sees_test": bool(r.get("data", {}).get("pretrain_sees_test", False)),
            **r["metrics"],
            "config_hash": r["config_hash"],
            "cell_id": r["cell_id"],
        }
        rows += _baseline_rows(row) if r.get("baseline") else [row]
    runs = pd.DataFrame(rows)
    if runs.empty:
        return runs
    for key in HEADLINE:  # the fine-tuned classifier where there is one, else the probe
        sources = [f"{p}_{key}" for p in ("ft", "lp") if f"{p}_{key}" in runs]
        if sources:
            runs[key] = runs[sources[0]]
            for other in sources[1:]:
                runs[key] = runs[key].fillna(runs[other])
    head = ["variant", "seed", *ID_COLUMNS[1:], "pretrain_sees_test"]
    tail = ["config_hash", "cell_id"]
    return runs[[*head, *_metric_columns(runs), *tail]]


def _metric_columns(runs: pd.DataFrame) -> list[str]:
    numeric = [
        c
        for c in runs.columns
        if c not in ("seed", "pretrain_sees_test") and pd.api.types.is_numeric_dtype(runs[c])
    ]
    return [m for m in METRICS if m in numeric] + [m for m in numeric if m not in METRICS]


def ci95_halfwidth(std: pd.Series, n: pd.Series) -> pd.Series:
    """Half-width of the 95% Student-t confidence interval of a mean (NaN for one seed)."""
    from scipy.stats import t

    dof = (n - 1).where(n > 1)
    return t.ppf(0.975, dof) * std / n.pow(0.5)


def leaderboard_table(runs: pd.DataFrame, primary: str = "lp_acc") -> pd.DataFrame:
    """Per variant: mean, std (ddof=1) and 95% CI of every metric, ranked by ``primary``.

    ``overlaps_leader`` is True where a variant's interval on the primary metric overlaps the
    leader's (their difference is not established by these seeds), NaN with a single seed.
    """
    if runs.empty:
        return pd.DataFrame(columns=[*ID_COLUMNS, "seeds"])
    metrics = _metric_columns(runs)
    grouped = runs.groupby("variant", sort=False)
    board = grouped[[c for c in (*ID_COLUMNS[1:], "pretrain_sees_test") if c in runs]].first()
    board["seeds"] = grouped["seed"].count()
    means = grouped[metrics].mean()
    stds = grouped[metrics].std(ddof=1)  # spreads after the means: the CSV reads left to right
    cis = stds.apply(lambda column: ci95_halfwidth(column, board["seeds"]))
    parts = [board, means, stds.add_suffix("_std"), cis.add_suffix("_ci95")]
    board = pd.concat(parts, axis=1).reset_index()
    if primary in board:
        board = board.sort_values(
            primary, ascending=not higher_is_better(primary), kind="stable", na_position="last"
        ).reset_index(drop=True)
        board.insert(1, "rank", range(1, len(board) + 1))
        ci = board[f"{primary}_ci95"]
        gap = (board[primary] - board[primary].iloc[0]).abs()
        overlaps = (gap <= ci + ci.iloc[0]).astype(object).where(ci.notna() & pd.notna(ci.iloc[0]))
        overlaps.iloc[0] = True
        board["overlaps_leader"] = overlaps
    return board.reset_index(drop=True)


def _format(metric: str, mean: float, std: float) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "—"
    fmt = next((f for key, f in FORMATS if key in metric), "{:.4g}")
    text = fmt.format(mean)
    if std is not None and not (isinstance(std, float) and math.isnan(std)):
        text += " ± " + fmt.format(std)
    return text


def leaderboard_markdown(board: pd.DataFrame, title: str = "") -> str:
    """The leaderboard as Markdown: ``mean ± std`` cells, the best value of each quality
    metric in bold, and ``≈`` beside variants whose interval overlaps the leader's."""
    shown = [m for m in METRICS if m in board.columns]
    table = board[[c for c in ("rank", *ID_COLUMNS, "seeds") if c in board.columns]].copy()
    if "overlaps_leader" in board:
        table["variant"] = [
            f"{name} ≈" if overlap is True and rank > 1 else name
            for name, overlap, rank in zip(
                table["variant"], board["overlaps_leader"], board["rank"], strict=True
            )
        ]
    leaked = board.get("pretrain_sees_test", pd.Series(False, index=board.index)).astype(bool)
    table["variant"] = [
        f"{name} †" if leak else name
        for name, leak in zip(table["variant"], leaked, strict=True)
    ]
    for metric in shown:
        cells = [
            _format(metric, mean, std)
            for mean, std in zip(board[metric], board[f"{metric}_std"], strict=True)
        ]
        if any(q in metric for q in QUALITY):
            values = board[metric]
            best = values.max() if higher_is_better(metric) else values.min()
            cells = [
                f"**{c}**" if v == best and len(board) > 1 else c
                for c, v in zip(cells, values, strict=True)
            ]
        table[metric] = cells
    body = table.to_markdown(index=False, disable_numparse=True)
    heading = f"## {title}\n\n" if title else ""
    note = (
        "\nmean ± std over seeds; **bold**: best; ≈: 95% interval on the ranking metric "
        "overlaps the leader's.\n"
    )
    if leaked.any():
        note += "†: pretrained on the test images too (`pretrain_sees_test`): optimistic.\n"
    return f"{heading}{body}\n{note}"


def thresholds_markdown(tables: dict[str, pd.DataFrame]) -> str:
    """A Markdown section with each cell's threshold table (binary tasks)."""
    parts = ["## Threshold analysis\n"]
    for name, table in tables.items():
        shown = table.drop(columns=["tp", "fp", "tn", "fn"]).round(3)
        parts.append(f"### {name} (positive: {table['class'].iloc[0]})\n")
        parts.append(shown.drop(columns="class").to_markdown(index=False) + "\n")
    return "\n".join(parts)


def write_leaderboard(
    root: Path, records: list[dict[str, Any]], title: str, primary: str = "lp_acc"
) -> pd.DataFrame:
    """Write runs.csv, leaderboard.csv/.md and thresholds/ under ``root``; return the board."""
    runs = runs_table(records)
    board = leaderboard_table(runs, primary)
    tables = {}
    for record in records:
        table = read_table(root / "cells" / record["cell_id"] / "thresholds.csv")
        if table is not None:
            name = f"{record['variant']}-seed{record['seed']}"
            tables[name] = table
            atomic_write_text(root / "thresholds" / f"{name}.csv", table.to_csv(index=False))
    markdown = leaderboard_markdown(board, title)
    binary = {k: t for k, t in tables.items() if t["class"].nunique() == 1}
    if binary:
        markdown += "\n" + thresholds_markdown(binary)
    atomic_write_text(root / "runs.csv", runs.to_csv(index=False))
    atomic_write_text(root / "leaderboard.csv", board.to_csv(index=False))
    atomic_write_text(root / "leaderboard.md", markdown)
    return board
