"""Leaderboards: one row per cell (runs.csv), one row per variant over seeds (leaderboard.*)."""

from __future__ import annotations

import contextlib
import csv
import io
import math
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pandas as pd
from filelock import FileLock

from mae_bench.errors import MaeBenchWarning
from mae_bench.files import WriteError, atomic_write, drop_escaping_symlink
from mae_bench.metrics import (
    CORE_METRICS,
    DEFAULT_PRIMARY_METRIC,
    THRESHOLDS_TABLE,
    binary_thresholds,
)
from mae_bench.results import (
    COMPARISONS_FILE,
    LEADERBOARD_CSV,
    LEADERBOARD_LOCK,
    LEADERBOARD_MD,
    RUNS_FILE,
    THRESHOLDS_DIR,
    CellStore,
    evaluations,
)
from mae_bench.stats import compare, seeds_needed

ID_COLUMNS = ["variant", "encoder", "masking", "loss"]
Info = dict[str, dict[str, Any]]  # metric -> Metric.as_dict(), as stored with each result
DEFAULT_FMT = "{:.4g}"  # the display format of a metric whose evaluator declares none


def read_table(path: Path) -> pd.DataFrame | None:
    """A stored CSV table; None if there is none, or (with a warning naming the file) if it
    is empty, truncated (its last line incomplete, or a row short of fields) or garbled."""
    if not path.is_file():
        return None
    try:
        text = path.read_bytes().decode("utf-8")
        problem = table_damage(text)
        if problem:
            raise ValueError(problem)
        table = pd.read_csv(io.StringIO(text))
    except (OSError, ValueError, pd.errors.ParserError) as exc:  # EmptyDataError is a ValueError
        warnings.warn(f"damaged table {path} ({exc}): skipped", MaeBenchWarning, stacklevel=2)
        return None
    return table


def table_damage(text: str) -> str | None:
    """What is wrong with a stored CSV table's text, or None: every table is written whole
    (``DataFrame.to_csv``), so a last line without its newline or a row whose fields do not
    match the header's is a truncated or garbled file, not a table with missing values."""
    if text and not text.endswith("\n"):
        return "truncated: its last line is incomplete"
    rows = csv.reader(io.StringIO(text))
    header = next(rows, None)
    for row in rows:
        if header is not None and row and len(row) != len(header):
            return f"line {rows.line_num} has {len(row)} fields, the header {len(header)}"
    return None


def metric_info(records: Iterable[dict[str, Any]]) -> Info:
    """How to show each metric, from the evaluators' declarations stored in the records
    (evaluators in suite order), then the runner's own metrics."""
    info: Info = {}
    for r in records:
        for _, evaluation in evaluations(r):
            for name, described in evaluation["info"].items():
                info.setdefault(name, described)
    for name, metric in CORE_METRICS.items():
        info.setdefault(name, metric.as_dict())
    return info


def higher_is_better(metric: str, info: Info | None = None) -> bool:
    """Direction of a metric for ranking and for marking the best value."""
    return bool((info or {}).get(metric, {}).get("higher_is_better", True))


def scratch_name(baseline_variant: str) -> str:
    """The leaderboard name of a baseline cell's fine-tuning (from-scratch) row."""
    return baseline_variant.replace("random-init", "scratch")


def row_name(record: dict[str, Any], evaluation: dict[str, Any]) -> str:
    """The leaderboard row a cell's evaluation shows in: a no-pretraining cell's evaluation
    that trains the encoder is its ``scratch`` row, any other its variant's."""
    if record.get("baseline") and evaluation.get("trains_encoder"):
        return scratch_name(record["variant"])
    return record["variant"]


def _trained_metrics(record: dict[str, Any]) -> set[str]:
    """Metrics of the evaluators that train a copy of the encoder (fine-tuning)."""
    return {
        name
        for _, evaluation in evaluations(record)
        if evaluation.get("trains_encoder")
        for name in evaluation["metrics"]
    }


def _baseline_rows(row: dict[str, Any], trained: set[str]) -> list[dict[str, Any]]:
    """A no-pretraining cell as two rows: ``random-init`` (frozen features: the evaluators
    that do not train the encoder) and ``scratch`` (those that do, from random init)."""
    frozen = {k: v for k, v in row.items() if k not in trained}
    if not trained:
        return [frozen]
    ids = {k: v for k, v in row.items() if not isinstance(v, float) or k == "params_m"}
    scratch = {**ids, **{k: row[k] for k in trained}, "variant": scratch_name(row["variant"])}
    return [frozen, scratch]


def _summary_sources(records: list[dict[str, Any]]) -> dict[str, list[str]]:
    """Unprefixed summary columns (``f1_macro``, ``auc``, ...) and the metrics that can fill
    them, by evaluator priority (fine-tuning first where it ran, then the linear probe)."""
    ranked: dict[str, list[tuple[int, str]]] = {}
    for r in records:
        for _, evaluation in evaluations(r):
            for name, described in evaluation["info"].items():
                key = described.get("summary")
                if key and (evaluation["summary_priority"], name) not in ranked.get(key, []):
                    ranked.setdefault(key, []).append((evaluation["summary_priority"], name))
    return {key: [name for _, name in sorted(pairs)] for key, pairs in ranked.items()}


def runs_table(records: Iterable[dict[str, Any]]) -> pd.DataFrame:
    """One row per finished cell (two for a baseline cell): components, metrics, config hash."""
    records = list(records)
    rows = []
    for r in records:
        row = {
            "variant": r["variant"],
            "seed": r["seed"],
            **r["components"],
            "pretrain_sees_test": bool(r.get("data", {}).get("pretrain_sees_test", False)),
            **{k: (float("nan") if v is None else v) for k, v in r["metrics"].items()},
            "config_hash": r["config_hash"],
            "cell_id": r["cell_id"],
        }
        rows += _baseline_rows(row, _trained_metrics(r)) if r.get("baseline") else [row]
    runs = pd.DataFrame(rows)
    if runs.empty:
        return runs
    for key, sources in _summary_sources(records).items():
        present = [m for m in sources if m in runs]
        if present:
            runs[key] = runs[present[0]]
            for other in present[1:]:
                runs[key] = runs[key].fillna(runs[other])
    head = ["variant", "seed", *ID_COLUMNS[1:], "pretrain_sees_test"]
    tail = ["config_hash", "cell_id"]
    return runs[[*head, *_metric_columns(runs, metric_info(records)), *tail]]


def _metric_columns(runs: pd.DataFrame, info: Info | None = None) -> list[str]:
    numeric = [
        c
        for c in runs.columns
        if c not in ("seed", "pretrain_sees_test") and pd.api.types.is_numeric_dtype(runs[c])
    ]
    known = [m for m in (info or {}) if m in numeric]
    return known + [m for m in numeric if m not in known]


def ci95_halfwidth(std: pd.Series, n: pd.Series) -> pd.Series:
    """Half-width of the 95% Student-t confidence interval of a mean (NaN for one seed)."""
    from scipy.stats import t

    dof = (n - 1).where(n > 1)
    return t.ppf(0.975, dof) * std / n.pow(0.5)


def leaderboard_table(
    runs: pd.DataFrame,
    primary: str = DEFAULT_PRIMARY_METRIC,
    info: Info | None = None,
    reference: str | None = None,
) -> pd.DataFrame:
    """Per variant: mean, std (ddof=1) and 95% CI of every metric, ranked by ``primary``.

    ``overlaps_leader`` is True where a variant's interval on the primary metric overlaps the
    leader's, NaN with a single seed. With a ``reference`` variant, the paired comparison of
    each variant with it on the primary metric (:mod:`mae_bench.stats`): ``delta``,
    ``delta_ci95_low``/``high``, ``prob_improve``, ``p_value`` (Holm-corrected) and
    ``verdict``.
    """
    if runs.empty:
        return pd.DataFrame(columns=[*ID_COLUMNS, "seeds"])
    metrics = _metric_columns(runs, info)
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
            primary,
            ascending=not higher_is_better(primary, info),
            kind="stable",
            na_position="last",
        ).reset_index(drop=True)
        board.insert(1, "rank", range(1, len(board) + 1))
        ci = board[f"{primary}_ci95"]
        gap = (board[primary] - board[primary].iloc[0]).abs()
        overlaps = (gap <= ci + ci.iloc[0]).astype(object).where(ci.notna() & pd.notna(ci.iloc[0]))
        overlaps.iloc[0] = True
        board["overlaps_leader"] = overlaps
        if reference is not None:
            board = _with_comparison(board, runs, primary, reference, info)
    return board.reset_index(drop=True)


def _with_comparison(
    board: pd.DataFrame, runs: pd.DataFrame, primary: str, reference: str, info: Info | None
) -> pd.DataFrame:
    direction = {primary: higher_is_better(primary, info)}
    found = compare(runs, [primary], reference, direction).set_index("variant")
    columns = ["delta", "delta_ci95_low", "delta_ci95_high", "prob_improve", "p_holm", "verdict"]
    joined = board.join(found[columns].rename(columns={"p_holm": "p_value"}), on="variant")
    joined.loc[joined["variant"] == reference, "verdict"] = "reference"
    joined["verdict"] = joined["verdict"].fillna("not compared")
    return joined


def metric_fmt(info: Info | None, metric: str | None, default: str = DEFAULT_FMT) -> str:
    """The display format ``metric``'s evaluator declares (``default`` where it has none)."""
    return (info or {}).get(metric or "", {}).get("fmt", default)


def format_metric(fmt: str, mean: Any, std: Any = None) -> str:
    """A metric's value, or ``mean ± std``, in its display format ``fmt`` (e.g. ``{:.3f}``):
    "—" when the mean is missing (None or NaN), the mean alone when the std is."""
    if _missing(mean):
        return "—"
    text = fmt.format(mean)
    if not _missing(std):
        text += " ± " + fmt.format(std)
    return text


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def leaderboard_markdown(
    board: pd.DataFrame, title: str = "", info: Info | None = None, primary: str | None = None
) -> str:
    """The leaderboard as Markdown: the headline metrics (as their evaluators declare them)
    as ``mean ± std``, the best value of each compared metric in bold, and ``≈`` beside
    variants whose interval overlaps the leader's."""
    info = info or {}
    shown = [m for m, d in info.items() if d.get("headline") and m in board.columns]
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
        f"{name} †" if leak else name for name, leak in zip(table["variant"], leaked, strict=True)
    ]
    flags = []  # 0/1 metrics whose evaluator asks to mark the variants below 1
    for metric, described in info.items():
        if described.get("flag") and metric in board:
            below = board[metric] < 1
            if below.any():
                mark = "‡" * (len(flags) + 1)
                flags.append(f"{mark}: {described['flag']} (`{metric}` < 1).")
                table["variant"] = [
                    f"{name} {mark}" if hit else name
                    for name, hit in zip(table["variant"], below, strict=True)
                ]
    for metric in shown:
        fmt = metric_fmt(info, metric)
        cells = [
            format_metric(fmt, mean, std)
            for mean, std in zip(board[metric], board[f"{metric}_std"], strict=True)
        ]
        if info[metric].get("compare", True):
            values = board[metric]
            best = values.max() if higher_is_better(metric, info) else values.min()
            cells = [
                f"**{c}**" if v == best and len(board) > 1 else c
                for c, v in zip(cells, values, strict=True)
            ]
        table[metric] = cells
    if "verdict" in board:
        fmt = metric_fmt(info, primary, "{:.3f}")
        table["vs reference"] = [
            _delta_cell(row, fmt.replace("{:", "{:+")) for _, row in board.iterrows()
        ]
    body = table.to_markdown(index=False, disable_numparse=True)
    heading = f"## {title}\n\n" if title else ""
    note = (
        "\nmean ± std over seeds; **bold**: best; ≈: 95% interval on the ranking metric "
        "overlaps the leader's.\n"
    )
    if leaked.any():
        note += "†: pretrained on the test images too (`pretrain_sees_test`): optimistic.\n"
    note += "".join(f"{flag}\n" for flag in flags)
    if "verdict" in board:
        note += _comparison_note(board)
    return f"{heading}{body}\n{note}"


def _delta_cell(row: pd.Series, fmt: str) -> str:
    if row["verdict"] in ("reference", "not compared"):
        return row["verdict"]
    low, high = row["delta_ci95_low"], row["delta_ci95_high"]
    interval = "" if pd.isna(low) else f" [{fmt.format(low)}, {fmt.format(high)}]"
    return f"{fmt.format(row['delta'])}{interval} {row['verdict']}"


def _comparison_note(board: pd.DataFrame) -> str:
    """How the verdicts were reached, and whether these seeds could reach one at all."""
    reference = board.loc[board["verdict"] == "reference", "variant"]
    compared = board[~board["verdict"].isin(["reference", "not compared"])]
    text = (
        f"vs reference: mean paired difference to `{reference.iloc[0] if len(reference) else '?'}`"
        " over seeds [95% Student-t interval]; `better`/`worse` only when the interval excludes "
        "0 and the Wilcoxon signed-rank p, Holm-corrected over the variants, is below 0.05.\n"
    )
    if len(compared):
        pairs = int(board["seeds"].max())
        needed = seeds_needed(len(compared))
        if pairs < needed:
            text += (
                f"With {pairs} paired seeds no verdict can be reached: the exact Wilcoxon test "
                f"needs at least {needed} seeds for {len(compared)} comparisons at 0.05 (Holm); "
                "the intervals and win rates above are descriptive.\n"
            )
    return text


def threshold_display(table: pd.DataFrame) -> pd.DataFrame:
    """A threshold table as leaderboard.md and report.html show it: the scores per threshold
    (rounded to 3 decimals), without the confusion counts."""
    return table.drop(columns=["tp", "fp", "tn", "fn"]).round(3)


def thresholds_markdown(tables: dict[str, pd.DataFrame]) -> str:
    """A Markdown section with each cell's threshold table (binary tasks)."""
    parts = ["## Threshold analysis\n"]
    for name, table in tables.items():
        shown = threshold_display(table)
        parts.append(f"### {name} (positive: {table['class'].iloc[0]})\n")
        parts.append(shown.drop(columns="class").to_markdown(index=False) + "\n")
    return "\n".join(parts)


def default_reference(records: list[dict[str, Any]]) -> str | None:
    """The first pretrained (non-baseline) variant: what the others are compared with."""
    return next((r["variant"] for r in records if not r.get("baseline")), None)


def write_leaderboard(
    root: Path,
    records: list[dict[str, Any]],
    title: str,
    primary: str = DEFAULT_PRIMARY_METRIC,
    reference: str | None = None,
) -> tuple[pd.DataFrame, str]:
    """Write runs.csv, leaderboard.csv/.md, comparisons.csv (every variant against the
    ``reference``, default :func:`default_reference`, on every metric) and thresholds/ under
    ``root``; return the board and its Markdown (without threshold tables and glossary)."""
    runs = runs_table(records)
    info = metric_info(records)
    reference = reference or default_reference(records)
    board = leaderboard_table(runs, primary, info, reference)
    if reference is not None and not runs.empty:
        metrics = [m for m in info if m in runs]
        directions = {m: higher_is_better(m, info) for m in metrics}
        comparisons = compare(runs, metrics, reference, directions)
        atomic_write(root / COMPARISONS_FILE, comparisons.to_csv(index=False))
    tables = {}
    store = CellStore(root)
    for record in records:
        path = store.table_path(record, THRESHOLDS_TABLE)
        table = read_table(path) if path else None
        if table is not None:
            name = f"{record['variant']}-seed{record['seed']}"
            tables[name] = table
            atomic_write(root / THRESHOLDS_DIR / f"{name}.csv", table.to_csv(index=False))
    shown = leaderboard_markdown(board, title, info, primary)
    markdown = shown
    binary = {k: t for k, t in tables.items() if binary_thresholds(t)}
    if binary:
        markdown += "\n" + thresholds_markdown(binary)
    markdown += "\n" + glossary_markdown(info, board)
    atomic_write(root / RUNS_FILE, runs.to_csv(index=False))
    atomic_write(root / LEADERBOARD_CSV, board.to_csv(index=False))
    atomic_write(root / LEADERBOARD_MD, markdown)
    return board, shown


def glossary_markdown(info: Info, board: pd.DataFrame) -> str:
    """What each metric column means, as its evaluator describes it."""
    lines = ["## Metrics\n", "| metric | meaning | better |", "|---|---|---|"]
    for name, described in info.items():
        if name in board.columns:
            better = "higher" if described.get("higher_is_better", True) else "lower"
            lines.append(f"| `{name}` | {described.get('description', '')} | {better} |")
    return "\n".join(lines) + "\n"


def rebuild_leaderboard(
    root: Path,
    cells: list[tuple[str, list[str]]],
    title: str,
    primary: str,
    reference: str | None,
) -> tuple[pd.DataFrame, str, int]:
    """Write the leaderboard from every finished one of ``cells`` (``(cell_id, eval_ids)``)
    under a lock: of processes sharing the folder, the one that ends last writes one that
    holds every cell. Returns the table, its Markdown and the number of finished cells."""
    with leaderboard_lock(root):
        records = list(CellStore(root).finished(cells, repair=False).values())
        table, markdown = write_leaderboard(root, records, title, primary, reference)
    return table, markdown, len(records)


@contextlib.contextmanager
def leaderboard_lock(root: Path) -> Iterator[None]:
    """Hold the results folder's leaderboard lock. A symlink in its place (which the lock
    would refuse, or lead outside the folder) is replaced with a warning; a lock that cannot
    be made (a read-only folder) is a :class:`~mae_bench.files.WriteError` naming it."""
    path = root / LEADERBOARD_LOCK
    drop_escaping_symlink(root, path, any_symlink=True)
    lock = FileLock(path)
    try:
        lock.acquire()
    except OSError as exc:
        raise WriteError.of(path, exc) from exc
    try:
        yield
    finally:
        lock.release()
