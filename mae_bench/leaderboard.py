"""Leaderboards: one row per cell (runs.csv), one row per variant over seeds (leaderboard.*)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pandas as pd

from mae_bench.results import atomic_write_text

ID_COLUMNS = ["variant", "encoder", "masking", "loss"]
# Metrics shown first, in this order; any other numeric metric follows.
METRICS = ["psnr_masked", "lp_acc", "pretrain_s", "imgs_per_s", "params_m"]
PRIMARY_METRIC = "lp_acc"
FORMATS = {"psnr": "{:.2f}", "acc": "{:.3f}", "per_s": "{:.0f}", "_s": "{:.1f}", "params": "{:.3f}"}


def runs_table(records: Iterable[dict[str, Any]]) -> pd.DataFrame:
    """One row per finished cell: identity, components, every metric, config hash."""
    rows = []
    for r in records:
        rows.append(
            {
                "variant": r["variant"],
                "seed": r["seed"],
                **r["components"],
                **r["metrics"],
                "config_hash": r["config_hash"],
                "cell_id": r["cell_id"],
            }
        )
    runs = pd.DataFrame(rows)
    if runs.empty:
        return runs
    head = ["variant", "seed", *ID_COLUMNS[1:]]
    tail = ["config_hash", "cell_id"]
    return runs[[*head, *_metric_columns(runs), *tail]]


def _metric_columns(runs: pd.DataFrame) -> list[str]:
    numeric = [
        c for c in runs.columns if c not in ("seed",) and pd.api.types.is_numeric_dtype(runs[c])
    ]
    return [m for m in METRICS if m in numeric] + [m for m in numeric if m not in METRICS]


def leaderboard_table(runs: pd.DataFrame) -> pd.DataFrame:
    """Mean and std (``<metric>_std``, ddof=1) of every metric per variant, best first."""
    if runs.empty:
        return pd.DataFrame(columns=[*ID_COLUMNS, "seeds"])
    metrics = _metric_columns(runs)
    grouped = runs.groupby("variant", sort=False)
    board = grouped[ID_COLUMNS[1:]].first()
    board["seeds"] = grouped["seed"].count()
    for metric in metrics:
        board[metric] = grouped[metric].mean()
    for metric in metrics:  # spreads after the means, so the CSV reads left to right
        board[f"{metric}_std"] = grouped[metric].std(ddof=1)
    board = board.reset_index()
    if PRIMARY_METRIC in board:
        board = board.sort_values(PRIMARY_METRIC, ascending=False, kind="stable")
    return board.reset_index(drop=True)


def _format(metric: str, mean: float, std: float) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "—"
    fmt = next(
        (f for key, f in FORMATS.items() if metric.endswith(key) or metric.startswith(key)),
        "{:.4g}",
    )
    text = fmt.format(mean)
    if std is not None and not (isinstance(std, float) and math.isnan(std)):
        text += " ± " + fmt.format(std)
    return text


def leaderboard_markdown(board: pd.DataFrame, title: str = "") -> str:
    """The leaderboard as a Markdown table of ``mean ± std`` cells."""
    metrics = [
        c for c in board.columns if c not in (*ID_COLUMNS, "seeds") and not c.endswith("_std")
    ]
    shown = [m for m in metrics if m in METRICS] or metrics
    table = board[[*ID_COLUMNS, "seeds"]].copy()
    for metric in shown:
        table[metric] = [
            _format(metric, mean, std)
            for mean, std in zip(
                board[metric], board.get(f"{metric}_std", [None] * len(board)), strict=True
            )
        ]
    body = table.to_markdown(index=False, disable_numparse=True)
    heading = f"## {title}\n\n" if title else ""
    return f"{heading}{body}\n"


def write_leaderboard(root: Path, records: list[dict[str, Any]], title: str) -> pd.DataFrame:
    """Write runs.csv, leaderboard.csv and leaderboard.md under ``root``; return the board."""
    runs = runs_table(records)
    board = leaderboard_table(runs)
    atomic_write_text(root / "runs.csv", runs.to_csv(index=False))
    atomic_write_text(root / "leaderboard.csv", board.to_csv(index=False))
    atomic_write_text(root / "leaderboard.md", leaderboard_markdown(board, title))
    return board
