"""Every figure of a suite's results, drawn from stored results (no retraining).

PNG files under ``<out>/<suite>/plots/``: pretraining loss curves, the leaderboard bar chart
with 95% intervals, each headline metric against pretraining compute, reconstruction grids
(same images, same masks for every variant), a t-SNE of frozen features (the best variant vs
a random init), and each enabled evaluator's own figures (``Evaluator.plots()``:
:class:`~mae_bench.contract.TablePlot`, drawn from its tables; the built-ins give ROC curves,
precision/recall/F1 vs the threshold and fine-tuning curves).
Also the small per-variant figure of ``report.html``.
"""

from __future__ import annotations

import io
import re
import warnings
from collections.abc import Hashable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
import torch

from mae_bench.contract import ImageData, Mask, MaskedAutoencoder, TablePlot
from mae_bench.data import ImageFeeder
from mae_bench.errors import MaeBenchWarning, UserError
from mae_bench.evaluate import (
    evaluation_masks,
    evaluation_sample,
    extract_features,
    reconstruct,
)
from mae_bench.files import atomic_write
from mae_bench.layers import patch_mask_to_pixels
from mae_bench.leaderboard import (
    SWEEP_FAMILY,
    metric_info,
    missing,
    numeric_values,
    read_table,
    row_name,
    sweep_columns,
    sweep_texts,
)
from mae_bench.metrics import CORE_METRICS
from mae_bench.plan import baseline_variants
from mae_bench.results import HISTORY_FILE, PLOTS_DIR, CellStore
from mae_bench.suite import Suite
from mae_bench.weights import rebuild_model

EvaluatorPlot = tuple[str, TablePlot]  # (evaluator name, one of its plots)


def lowest_seed_cells(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """One record per variant: the cell with its lowest seed, in record order."""
    first: dict[str, dict[str, Any]] = {}
    for r in records:
        if r["variant"] not in first or r["seed"] < first[r["variant"]]["seed"]:
            first[r["variant"]] = r
    return first


def save_figure(fig: plt.Figure, path: Path) -> Path:
    """Write ``fig`` as a PNG to ``path`` atomically, close it and return the path."""
    atomic_write(path, lambda handle: fig.savefig(handle, format="png", dpi=120,
                                                  bbox_inches="tight"))  # fmt: skip
    plt.close(fig)
    return path


HISTORY_COLUMNS = ("epoch", "loss", "mask_ratio", "lr")  # a history's columns besides its terms


def loss_term_columns(record: dict[str, Any], history: pd.DataFrame) -> dict[str, str]:
    """A cell's history columns of its loss terms, each with the objective it measures: the
    loss's name, and its settings where two variants use that name differently (e.g.
    ``mse(masked_only=True, norm_pix=True)``: another objective than plain ``mse``). Columns
    are named as pretraining names them (a repeated loss gets ``<name>_<index>``)."""
    configured = record.get("config", {}).get("variant", {}).get("loss")
    if not isinstance(configured, list):  # no stored configuration: each column its own
        return {c: c for c in history.columns if c not in HISTORY_COLUMNS}
    columns: dict[str, str] = {}
    for term in configured:
        name = str(term.get("name"))
        column = name if name not in columns else f"{name}_{len(columns)}"
        settings = ", ".join(
            f"{k}={v}" for k, v in sorted(term.items()) if k not in ("name", "weight")
        )
        columns[column] = f"{name}({settings})" if settings else name
    return {c: objective for c, objective in columns.items() if c in history}


def _panel_titles(objectives: list[str]) -> dict[str, str]:
    """Each objective's panel title: the loss's bare name unless two objectives share it."""
    names = [o.split("(", 1)[0] for o in objectives]
    return {o: o if names.count(n) > 1 else n for o, n in zip(objectives, names, strict=True)}


def _panels(count: int, size: tuple[float, float], columns: int = 3) -> tuple[Any, list[Any]]:
    """A figure of ``count`` panels of ``size`` inches, up to ``columns`` a row; the unused
    cells of the last row removed."""
    columns = min(columns, count)
    rows = -(-count // columns)
    fig, grid = plt.subplots(
        rows, columns, figsize=(size[0] * columns, size[1] * rows), squeeze=False
    )
    axes = list(grid.flat)
    for unused in axes[count:]:
        fig.delaxes(unused)
    return fig, axes[:count]


def plot_loss_curves(records: list[dict[str, Any]], store: CellStore, out: Path) -> Path | None:
    """Pretraining loss per epoch: one panel per loss term (unweighted; variants with
    different objectives share only the terms they have in common, never a summed total),
    one line per variant (mean over seeds, band: spread over seeds)."""
    frames = []
    for r in records:
        if r.get("baseline"):
            continue
        path = store.path(r["cell_id"]) / HISTORY_FILE
        history = read_table(path)
        terms = loss_term_columns(r, history) if history is not None else {}
        if history is None or "epoch" not in history or not terms:
            if history is not None or not path.exists():
                warnings.warn(f"{path}: no loss history: skipped", MaeBenchWarning, 2)
            continue
        for column, objective in terms.items():
            frames.append(
                pd.DataFrame(
                    {"epoch": history["epoch"], "value": history[column], "term": objective,
                     "variant": r["variant"], "seed": r["seed"]}
                )
            )  # fmt: skip
    if not frames:
        return None
    data = pd.concat(frames, ignore_index=True)
    objectives = list(dict.fromkeys(data["term"]))
    titles = _panel_titles(objectives)
    variants = list(dict.fromkeys(data["variant"]))
    colors = dict(zip(variants, sns.color_palette(n_colors=len(variants)), strict=True))
    fig, axes = _panels(len(objectives), (4.2, 3.4))
    for ax, objective in zip(axes, objectives, strict=False):
        term = data[data["term"] == objective]
        for variant, rows in term.groupby("variant", sort=False):
            by_epoch = rows.groupby("epoch")["value"]
            mean, spread = by_epoch.mean(), by_epoch.std(ddof=1)
            ax.plot(mean.index, mean, label=variant, color=colors[variant], marker=".")
            ax.fill_between(
                mean.index, mean - spread, mean + spread, color=colors[variant], alpha=0.2
            )
        ax.set(title=titles[objective], xlabel="epoch")
        ax.legend(fontsize=7)
    for ax in axes[:: min(3, len(objectives))]:  # the first panel of each row
        ax.set_ylabel("loss term (unweighted)")
    fig.suptitle("Pretraining loss, term by term (each panel one objective)", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, out / "loss_curves.png")


def plot_leaderboard(
    board: pd.DataFrame,
    metric: str,
    out: Path,
    bounds: tuple[float | None, float | None] = (None, None),
) -> Path:
    """Bar chart of ``metric`` per variant with its 95% confidence interval, drawn inside
    the metric's declared range ``bounds`` (an accuracy's interval stops at 1). In rank
    order, except that a suite's sweeps read in order of their values (:func:`sweep_order`)."""
    board = sweep_order(board)
    fig, ax = plt.subplots(figsize=(7, 0.5 + 0.45 * len(board)))
    mean = board[metric]
    half = board.get(f"{metric}_ci95", pd.Series(np.nan, index=board.index)).fillna(0)
    low, high = bounds
    lower = (mean - half).clip(lower=low) if low is not None else mean - half
    upper = (mean + half).clip(upper=high) if high is not None else mean + half
    sns.barplot(x=mean, y=board["variant"], color="tab:blue", ax=ax, orient="h")
    xerr = np.vstack([(mean - lower).to_numpy(), (upper - mean).to_numpy()])
    ax.errorbar(mean, np.arange(len(board)), xerr=xerr, fmt="none", color="black")
    ax.set(title=f"{metric} (mean, 95% CI over seeds)", xlabel=metric, ylabel="")
    return save_figure(fig, out / f"leaderboard_{metric}.png")


COMPUTE_METRIC = "pretrain_tflops"
"""The x axis of :func:`plot_compute`: each variant's pretraining compute."""


def compute_panels(board: pd.DataFrame, info: dict[str, Any], primary: str) -> list[str]:
    """The metrics :func:`plot_compute` draws against compute: the primary metric, then each
    evaluator's headline metric, those with a value for a variant that pretrained."""
    if COMPUTE_METRIC not in board:
        return []
    pretrained = board[board[COMPUTE_METRIC].gt(0)]  # NaN (no pretraining) is not
    candidates = [primary, *(m for m, d in info.items() if d.get("headline"))]
    return [
        m
        for m in dict.fromkeys(candidates)
        if m not in CORE_METRICS and m in pretrained and pretrained[m].notna().any()
    ]


def plot_compute(board: pd.DataFrame, info: dict[str, Any], primary: str, out: Path) -> Path | None:
    """Each headline metric (mean, 95% interval inside its range) against pretraining
    compute (log scale), one labelled point per pretrained variant: a variant that wins
    only by spending more compute stands to the right. None without compute to plot."""
    metrics = compute_panels(board, info, primary)
    if not metrics:
        return None
    rows = board[board[COMPUTE_METRIC].gt(0)]
    colors = dict(zip(rows["variant"], sns.color_palette(n_colors=len(rows)), strict=True))
    fig, axes = _panels(len(metrics), (4.4, 3.6))
    for ax, metric in zip(axes, metrics, strict=False):
        low, high = info.get(metric, {}).get("bounds") or (None, None)
        for _, row in rows[rows[metric].notna()].iterrows():
            x, y = row[COMPUTE_METRIC], row[metric]
            half = row.get(f"{metric}_ci95", np.nan)
            half = 0.0 if pd.isna(half) else half
            lower = max(y - half, low) if low is not None else y - half
            upper = min(y + half, high) if high is not None else y + half
            ax.errorbar(
                [x], [y], yerr=[[y - lower], [upper - y]], fmt="o", capsize=3,
                color=colors[row["variant"]], label=row["variant"],
            )  # fmt: skip
            ax.annotate(
                row["variant"], (x, y), xytext=(4, 4), textcoords="offset points", fontsize=7
            )
        better = "higher" if info.get(metric, {}).get("higher_is_better", True) else "lower"
        ax.set(xscale="log", title=f"{metric} ({better} is better)", xlabel="pretraining TFLOPs")
        ax.set_ylabel(metric)
    fig.suptitle("Headline metrics against pretraining compute (mean, 95% CI)", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, out / "compute.png")


# ---------------------------------------------------------------- parameter sweeps
def _hashable(board: pd.DataFrame, paths: list[str]) -> pd.DataFrame:
    """``board`` with any swept value that cannot be grouped (a list or a mapping) as its
    text, so that it can be sorted and grouped like a category."""
    unhashable = [p for p in paths if any(not isinstance(v, Hashable) for v in board[p])]
    if not unhashable:
        return board
    board = board.copy()
    for path in unhashable:
        board[path] = board[path].map(lambda v: v if isinstance(v, Hashable) else str(v))
    return board


def _sweep_keys(board: pd.DataFrame, paths: list[str]) -> pd.DataFrame:
    """Per board row, a sortable key of each swept path: its value for a numeric path, its
    rank of first appearance on the board otherwise; missing values last."""
    keys = {}
    for path in paths:
        values = board[path]
        if numeric_values(values):
            keys[path] = pd.to_numeric(values, errors="coerce").astype(float).fillna(np.inf)
        else:
            seen = {v: i for i, v in reversed(list(enumerate(values.dropna())))}
            keys[path] = values.map(lambda v, seen=seen: np.inf if missing(v) else seen[v])
    return pd.DataFrame(keys, index=board.index, dtype=float)


def _by_keys(keys: pd.DataFrame) -> pd.Index:
    """The rows of ``keys`` sorted by its columns in turn, ties in their present order."""
    ordered = keys.set_axis([f"k{i}" for i in range(keys.shape[1])], axis=1)
    ordered["row"] = range(len(ordered))
    return ordered.sort_values(list(ordered.columns)).index


def _families(board: pd.DataFrame, paths: list[str]) -> pd.Series:
    """Per row its sweep family: ``sweep_family`` (NaN for a row that is no sweep point);
    without that column, "" for every row with a swept value."""
    if SWEEP_FAMILY in board:
        return board[SWEEP_FAMILY].where(board[SWEEP_FAMILY].map(lambda v: not missing(v)))
    swept = board[paths].notna().any(axis=1)
    return pd.Series("", index=board.index, dtype=object).where(swept)


def sweep_order(board: pd.DataFrame) -> pd.DataFrame:
    """``board`` with each sweep family's points together, in the order of their swept
    values (numeric paths by value, others by first appearance; the suite's paths in turn),
    the families and the other variants in the order of their first row (rank). A board
    without sweeps is returned as it is."""
    paths = sweep_columns(board)
    if not paths or board.empty:
        return board
    original, board = board, _hashable(board, paths)
    family = _families(board, paths)
    group = [
        ("family", f) if not missing(f) else ("variant", v)
        for f, v in zip(family, board["variant"], strict=True)
    ]
    first = {g: i for i, g in reversed(list(enumerate(group)))}
    keys = _sweep_keys(board, paths)
    keys.insert(0, "group", [float(first[g]) for g in group])
    return original.loc[_by_keys(keys)].reset_index(drop=True)


@dataclass
class SweepLine:
    """One line of a sweep figure: a family's points along a path (with the values of the
    family's other swept paths it holds fixed in ``label``)."""

    label: str
    rows: pd.DataFrame


def _determined(rows: pd.DataFrame, path: str, other: str) -> bool:
    """Whether ``other`` takes one value per value of ``path`` in ``rows`` (they move
    together, as a ``zip`` group does)."""
    return bool(rows.groupby(path, sort=False)[other].nunique(dropna=False).le(1).all())


def sweep_lines(board: pd.DataFrame, path: str) -> list[SweepLine]:
    """The lines of ``path``'s sweep figure: one per family that sweeps it (in the order of
    its first row), or, where a family sweeps a product of paths, one per value of its
    other paths (``vit-mae (encoder.decoder_depth=2)``, in the order of those values); each
    line's rows in the order of ``path``'s values."""
    paths = sweep_columns(board)
    board = _hashable(board, paths)
    family = _families(board, paths)
    keys = _sweep_keys(board, paths)
    points = board[board[path].notna() & family.notna()]
    lines = []
    for name, rows in points.groupby(family[points.index], sort=False):
        others = [
            p
            for p in paths
            if p != path and rows[p].notna().any() and not _determined(rows, path, p)
        ]
        texts = {p: sweep_texts(board[p]) for p in others}
        ordered = rows.loc[_by_keys(keys.loc[rows.index, [*others, path]])]
        for _, group in ordered.groupby(others or (lambda _: 0), sort=False, dropna=False):
            fixed = ", ".join(f"{p}={texts[p][group.index[0]]}" for p in others)
            lines.append(SweepLine(f"{name} ({fixed})" if others else str(name), group))
    return lines


def sweep_panels(board: pd.DataFrame, info: dict[str, Any], primary: str) -> list[str]:
    """The metrics a sweep figure draws: the primary, then each headline metric (info order)
    but the runner's timings and sizes (noise of the machine, not of the setting; the
    pretraining compute stays), those with a value on the board."""
    candidates = [
        primary,
        *(
            m
            for m, d in info.items()
            if d.get("headline") and (m not in CORE_METRICS or m == COMPUTE_METRIC)
        ),
    ]
    return [m for m in dict.fromkeys(candidates) if m in board and board[m].notna().any()]


def _interval(
    mean: pd.Series, half: pd.Series, bounds: tuple[float | None, float | None]
) -> tuple[pd.Series, pd.Series]:
    """``mean`` ± ``half``, inside ``bounds`` (NaN where ``half`` is)."""
    low, high = bounds
    lower, upper = mean - half, mean + half
    return (
        lower.clip(lower=low) if low is not None else lower,
        upper.clip(upper=high) if high is not None else upper,
    )


def _numeric_axis(ax: Any, values: list[float]) -> None:
    """A swept numeric path's x axis: ticks at its values (when few), written as in the
    suite; log scale where they span two decades or more."""
    if values[0] > 0 and values[-1] / values[0] >= 100:
        ax.set_xscale("log")
    if len(values) <= 12:
        ax.set_xticks(values, list(sweep_texts(pd.Series(values))))
        ax.minorticks_off()


def sweep_figure(
    board: pd.DataFrame, info: dict[str, Any], primary: str, path: str
) -> plt.Figure | None:
    """The figure of one swept ``path``: a panel per headline metric (:func:`sweep_panels`),
    x = the swept value, y = the mean over seeds, one line per :func:`sweep_lines` (legend
    with more than one). A numeric path: by value, markers at the points, the 95% interval
    over seeds as a band (none with one seed); otherwise categories in order of first
    appearance, points with error bars. Intervals inside the metric's ``bounds``. None when
    there is nothing to draw."""
    board = _hashable(board, [path])
    lines = sweep_lines(board, path)
    metrics = [
        m
        for m in sweep_panels(board, info, primary)
        if any(line.rows[m].notna().any() for line in lines)
    ]
    if not metrics:
        return None
    points = pd.concat([line.rows for line in lines])
    numeric = numeric_values(points[path])
    in_board_order = board.loc[board.index.isin(points.index), path]
    categories = [] if numeric else list(dict.fromkeys(in_board_order))
    colors = sns.color_palette(n_colors=len(lines))
    fig, axes = _panels(len(metrics), (4.6, 3.6))
    for ax, metric in zip(axes, metrics, strict=False):
        bounds = tuple(info.get(metric, {}).get("bounds") or (None, None))
        for i, (line, color) in enumerate(zip(lines, colors, strict=True)):
            rows = line.rows[line.rows[metric].notna()]
            if rows.empty:
                continue
            mean = rows[metric].astype(float)
            half = rows.get(f"{metric}_ci95", pd.Series(np.nan, index=rows.index)).astype(float)
            if numeric:
                x = rows[path].astype(float)
                ax.plot(x, mean, marker="o", color=color, label=line.label)
                if half.notna().any():
                    lower, upper = _interval(mean, half, bounds)
                    ax.fill_between(x, lower, upper, color=color, alpha=0.2, linewidth=0)
            else:
                dodge = (i - (len(lines) - 1) / 2) * min(0.1, 0.6 / len(lines))
                x = rows[path].map(categories.index) + dodge
                lower, upper = _interval(mean, half.fillna(0), bounds)
                yerr = np.vstack([(mean - lower).to_numpy(), (upper - mean).to_numpy()])
                yerr = yerr if half.notna().any() else None  # one seed each: no interval
                ax.errorbar(x, mean, yerr=yerr, fmt="o", capsize=3, color=color, label=line.label)
        if numeric:
            _numeric_axis(ax, sorted(set(points[path].astype(float))))
        else:
            ax.set_xticks(range(len(categories)), list(sweep_texts(pd.Series(categories))))
            ax.set_xlim(-0.5, len(categories) - 0.5)
        better = "higher" if info.get(metric, {}).get("higher_is_better", True) else "lower"
        ax.set(title=f"{metric} ({better} is better)", xlabel=path, ylabel=metric)
        if len(ax.get_legend_handles_labels()[1]) > 1:
            ax.legend(fontsize=7)
    fig.suptitle(f"Sweep over {path} (mean, 95% CI over seeds)", fontsize=10)
    fig.tight_layout()
    return fig


def _sweep_file(path: str, taken: set[str]) -> str:
    """A file-safe, unique name for the figure of a swept path (``sweep_masking.ratio``)."""
    stem = "sweep_" + re.sub(r"[^A-Za-z0-9._-]+", "_", path)
    name, n = stem, 2
    while name in taken:
        name, n = f"{stem}_{n}", n + 1
    taken.add(name)
    return name


def plot_sweeps(board: pd.DataFrame, info: dict[str, Any], primary: str, out: Path) -> list[Path]:
    """One figure per swept path of the suite's sweeps (:func:`sweep_figure`), as
    ``out/sweep_<path>.png``; [] without sweeps."""
    written: list[Path] = []
    taken: set[str] = set()
    for path in sweep_columns(board):
        fig = sweep_figure(board, info, primary, path)
        if fig is not None:
            written.append(save_figure(fig, out / f"{_sweep_file(path, taken)}.png"))
    return written


# ---------------------------------------------------------------- evaluators' own plots
def evaluator_plots(suite: Suite) -> list[EvaluatorPlot]:
    """Every enabled evaluator's plots (``Evaluator.plots()``), in suite order; one that
    fails to list them (or to be built) is warned about and left out."""
    found = []
    for resolved in suite.evaluators:
        name = resolved.config["name"]
        try:
            plots = list(resolved.cls(resolved.params).plots())
        except Exception as exc:  # a plugin's bug must not cost the rest of the report
            _plot_failed(name, "plots()", exc)
            continue
        found += [(name, plot) for plot in plots]
    return found


def _plot_failed(evaluator: str, what: str, exc: Exception) -> None:
    """Warn that an evaluator's plot failed (the report goes on without it)."""
    plt.close("all")
    warnings.warn(f"evaluator {evaluator}: {what} failed: {exc!r}", MaeBenchWarning, 3)


def _stores(record: dict[str, Any], evaluator: str, table: str) -> bool:
    """Whether the cell's evaluation by ``evaluator`` stored ``table``."""
    return table in record.get("evaluations", {}).get(evaluator, {}).get("tables", [])


def _cell_tables(
    store: CellStore, record: dict[str, Any], names: tuple[str, ...]
) -> dict[str, pd.DataFrame]:
    """The tables ``names`` a cell stored that read (a damaged one is warned about)."""
    found = {}
    for name in names:
        path = store.table_path(record, name)
        table = read_table(path) if path else None
        if table is not None:
            found[name] = table
    return found


def plot_tables(
    records: list[dict[str, Any]], store: CellStore, evaluator: str, plot: TablePlot
) -> tuple[dict[str, pd.DataFrame], dict[str, dict[str, pd.DataFrame]]]:
    """What ``plot`` of ``evaluator`` draws: per leaderboard row its table (lowest seed whose
    table reads, or every seed stacked with a ``seed`` column), and each of its ``also``
    tables likewise."""
    by_row: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        if _stores(r, evaluator, plot.table):
            by_row.setdefault(row_name(r, r["evaluations"][evaluator]), []).append(r)
    names = (plot.table, *plot.also)
    tables: dict[str, pd.DataFrame] = {}
    also: dict[str, dict[str, pd.DataFrame]] = {name: {} for name in plot.also}
    for row, cells in by_row.items():
        if plot.seeds == "all":
            found = _seed_tables(store, cells, names)
        else:
            found = _lowest_seed_tables(store, cells, plot.table, names)
        if plot.table in found:
            tables[row] = found.pop(plot.table)
            for name, table in found.items():
                also[name][row] = table
    return tables, also


def _lowest_seed_tables(
    store: CellStore, cells: list[dict[str, Any]], table: str, names: tuple[str, ...]
) -> dict[str, pd.DataFrame]:
    """The tables ``names`` of the lowest-seed cell whose ``table`` reads (a damaged one is
    warned about and the next seed's drawn instead); empty if none does."""
    for record in sorted(cells, key=lambda r: r["seed"]):
        found = _cell_tables(store, record, names)
        if table in found:
            return found
    return {}


def _seed_tables(
    store: CellStore, cells: list[dict[str, Any]], names: tuple[str, ...]
) -> dict[str, pd.DataFrame]:
    """The tables ``names`` of every cell that stored them, stacked with a ``seed`` column."""
    read = [(r["seed"], _cell_tables(store, r, names)) for r in cells]
    stacked = {}
    for name in names:
        frames = [table[name].assign(seed=seed) for seed, table in read if name in table]
        if frames:
            stacked[name] = pd.concat(frames, ignore_index=True)
    return stacked


def draw_table_plots(
    records: list[dict[str, Any]], store: CellStore, plots: list[EvaluatorPlot], out: Path
) -> list[Path]:
    """Draw each evaluator plot that has a table to draw, as ``out/<name>.png``. A plot that
    fails is warned about (naming it and its evaluator) and left out."""
    paths = []
    for evaluator, plot in plots:
        tables, also = plot_tables(records, store, evaluator, plot)
        if not tables:
            continue
        try:
            fig = plot.figure(tables, **also)
            if fig is not None:  # matplotlib may raise only while saving
                paths.append(save_figure(fig, out / f"{plot.name}.png"))
        except Exception as exc:  # a plugin's bug must not cost the rest of the report
            _plot_failed(evaluator, f"plot {plot.name!r}", exc)
    return paths


def variant_curves(
    cells: list[dict[str, Any]], store: CellStore, plots: list[EvaluatorPlot]
) -> bytes | None:
    """A small PNG for one variant's section of report.html: its pretraining loss per seed,
    and a panel of each evaluator plot with a ``variant_panel``; None if there is none."""
    histories = [(r["seed"], read_table(store.path(r["cell_id"]) / HISTORY_FILE)) for r in cells]
    losses = [(seed, h) for seed, h in histories if h is not None and "loss" in h]
    panels = []
    for evaluator, plot in plots:
        if plot.variant_panel:
            own = [r for r in cells if _stores(r, evaluator, plot.table)]
            found = _seed_tables(store, own, (plot.table,))
            if found:
                panels.append((evaluator, plot, found[plot.table]))
    count = bool(losses) + len(panels)
    if not count:
        return None
    fig, axes = plt.subplots(1, count, figsize=(4 * count, 2.6), squeeze=False)
    free = list(axes[0])
    if losses:
        ax = free.pop(0)
        for seed, history in losses:
            ax.plot(history["epoch"], history["loss"], label=f"seed {seed}")
        ax.set(title="pretraining loss", xlabel="epoch")
        ax.legend(fontsize=7)
    for evaluator, plot, table in panels:
        ax = free.pop(0)
        try:
            plot.draw_variant(ax, table)
        except Exception as exc:  # a plugin's bug must not cost the rest of the report
            warnings.warn(
                f"evaluator {evaluator}: plot {plot.name!r} (variant panel) failed: {exc!r}",
                MaeBenchWarning,
                2,
            )
            ax.clear()
            ax.set_axis_off()
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=80)
    plt.close(fig)
    return buffer.getvalue()


# ---------------------------------------------------------------- from the stored models
@dataclass
class StoredModels:
    """A suite's dataset and, per variant (lowest seed), its stored model and feeder."""

    suite: Suite
    data: ImageData
    models: dict[str, tuple[MaskedAutoencoder, ImageFeeder, dict[str, Any]]]


def load_stored_models(root: Path, records: list[dict[str, Any]], suite: Suite) -> StoredModels:
    """Rebuild every variant's model (baselines included) from its stored weights; a variant
    whose weights are damaged is warned about and left out."""
    data = suite.build_dataset().load()
    ds = suite.config.dataset
    store = CellStore(root)
    first = lowest_seed_cells(records)
    models = {}
    for variant in [*suite.variants, *baseline_variants(suite)]:
        if variant.name not in first:
            continue
        r = first[variant.name]
        mean, std = tuple(r["data"]["mean"]), tuple(r["data"]["std"])
        feeder = ImageFeeder(ds.image_size, ds.channels, mean, std, torch.device("cpu"))
        try:
            model = rebuild_model(store.path(r["cell_id"]), variant.build_model, record=r)
        except UserError as exc:
            warnings.warn(f"damaged weights: {exc}: {variant.name} skipped", MaeBenchWarning, 2)
            continue
        models[variant.name] = (model, feeder, r)
    return StoredModels(suite, data, models)


@torch.no_grad()
def plot_reconstructions(stored: StoredModels, out: Path, n_images: int = 10) -> Path | None:
    """Original / masked / each variant's reconstruction, the same images for all.

    The images are a fixed-seed stratified sample of the test set (one of every class where
    ``n_images`` allows), masked as the reconstruction evaluator masks them
    (:func:`~mae_bench.evaluate.evaluation_masks`): the same fixed random masks for every
    variant, or with ``eval.reconstruction.masks: variant`` each variant's own (a masked row
    per variant). Predictions are mapped to pixels by the variant's own loss
    (``Loss.to_input_space``: ``norm_pix`` predictions are de-normalised from visible
    patches only)."""
    recon = stored.suite.eval_config.get("reconstruction", {})  # its masks, if it ran
    ratio, seed = recon.get("mask_ratio", 0.75), recon.get("mask_seed", 0)
    own_masks = recon.get("masks") == "variant"
    sample = evaluation_sample(stored.data.test_labels, n_images, seed)
    images = stored.data.test_images[sample]
    variants = {v.name: v for v in stored.suite.variants}
    rows: list[tuple[str, torch.Tensor]] = []
    for name, (model, feeder, record) in stored.models.items():
        target = variants[name].build_target() if name in variants else None
        if record.get("baseline") or (target is not None and not target.predicts_pixels):
            continue  # no pretraining, or predictions that are not pixels (HOG, features)
        x = feeder(images)
        masking = variants[name].build_masking() if own_masks else None
        mask: Mask = evaluation_masks(model, len(x), ratio=ratio, seed=seed, masking=masking)
        pred = reconstruct(model, x, mask, variants[name].decoder_loss(), target)
        pixel_mask = patch_mask_to_pixels(mask.mask, model.patch_size)
        truth = feeder.to_pixels(x)
        if not rows:
            rows.append(("original", truth))
        if own_masks or len(rows) == 1:
            masked = truth * (1 - pixel_mask) + 0.5 * pixel_mask
            rows.append((f"{name}: masked" if own_masks else "masked", masked))
        recon = feeder.to_pixels(pred) * pixel_mask + truth * (1 - pixel_mask)
        rows.append((name, recon))
    if not rows:
        return None
    fig, axes = plt.subplots(
        len(rows), len(images), figsize=(1.2 * len(images), 1.25 * len(rows)), squeeze=False
    )
    for i, (name, batch) in enumerate(rows):
        for j in range(len(images)):
            ax = axes[i][j]
            img = batch[j].permute(1, 2, 0).numpy()
            ax.imshow(img.squeeze(-1) if img.shape[-1] == 1 else img, cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[i][0].set_ylabel(name, rotation=0, ha="right", va="center", fontsize=8)
    masks = "each variant's own masks" if own_masks else "the same masks for every variant"
    fig.suptitle(f"Reconstructions (visible patches from the input; {masks})", fontsize=9)
    return save_figure(fig, out / "reconstructions.png")


def plot_tsne(stored: StoredModels, best: str, out: Path, max_points: int = 2000) -> Path:
    """t-SNE of frozen test-set features, coloured by label: ``best`` vs a random init.

    The random init is the suite's stored ``random-init`` baseline for the same encoder when
    there is one, else the same architecture freshly initialised with the cell's seed.
    """
    from sklearn.manifold import TSNE

    model, feeder, record = stored.models[best]
    variant = next(v for v in stored.suite.variants if v.name == best)
    random_init = next(
        (
            m
            for name, (m, _, r) in stored.models.items()
            if r.get("baseline") and r["config"]["variant"]["encoder"] == variant.encoder.config
        ),
        None,
    )
    if random_init is None:
        torch.manual_seed(record["seed"])
        ds = stored.suite.config.dataset
        random_init = variant.build_model(ds.image_size, ds.channels).eval()
    sample = evaluation_sample(stored.data.test_labels, max_points)
    images = stored.data.test_images[sample]
    labels = stored.data.test_labels[sample].numpy()
    settings = stored.suite.eval_config.values()
    pools = [c["pool"] for c in settings if isinstance(c, dict) and "pool" in c]
    pool = pools[0] if pools else "mean"  # as the first probe reads the features
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.5))
    for ax, (title, m) in zip(axes, ((best, model), ("random init", random_init)), strict=True):
        feats = extract_features(m, images, feeder, pool).numpy()
        perplexity = min(30.0, (len(feats) - 1) / 3)
        xy = TSNE(perplexity=perplexity, init="pca", random_state=0).fit_transform(feats)
        names = np.array(stored.data.class_names)[labels]
        sns.scatterplot(x=xy[:, 0], y=xy[:, 1], hue=names, s=10, ax=ax, legend=ax is axes[1])
        ax.set(title=f"t-SNE of frozen features: {title}", xticks=[], yticks=[])
    if axes[1].get_legend():
        axes[1].legend(fontsize=7, markerscale=1.5, bbox_to_anchor=(1.02, 1), loc="upper left")
    return save_figure(fig, out / "tsne.png")


def draw_plots(
    root: Path,
    records: list[dict[str, Any]],
    board: pd.DataFrame,
    primary: str,
    suite: Suite,
    plots: list[EvaluatorPlot] | None = None,
) -> list[Path]:
    """Every plot of a suite's finished cells, under ``root/plots``; ``plots`` are the
    evaluators' own (default: :func:`evaluator_plots` of ``suite``)."""
    store = CellStore(root)
    out = root / PLOTS_DIR
    losses = plot_loss_curves(records, store, out)
    paths = [losses] if losses else []
    info = metric_info(records)
    if primary in board:
        low, high = info.get(primary, {}).get("bounds") or (None, None)
        paths.append(plot_leaderboard(board, primary, out, (low, high)))
    paths += plot_sweeps(board, info, primary, out)
    compute = plot_compute(board, info, primary, out)
    paths += [compute] if compute else []
    plots = evaluator_plots(suite) if plots is None else plots
    paths += draw_table_plots(records, store, plots, out)
    stored = load_stored_models(root, records, suite)
    grid = plot_reconstructions(stored, out)
    paths += [grid] if grid else []
    pretrained = [
        n
        for n in board["variant"]
        if n in stored.models and not stored.models[n][2].get("baseline")
    ]
    if pretrained:  # the board is ranked: the first pretrained variant is the best
        paths.append(plot_tsne(stored, pretrained[0], out))
    return paths
