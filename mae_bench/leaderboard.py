"""Leaderboards: one row per cell (runs.csv), one row per variant over seeds (leaderboard.*)."""

from __future__ import annotations

import contextlib
import csv
import io
import math
import numbers
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from filelock import FileLock

from mae_bench.errors import MaeBenchWarning
from mae_bench.files import WriteError, atomic_write, drop_escaping_symlink
from mae_bench.metrics import (
    CORE_METRICS,
    DEFAULT_PRIMARY_METRIC,
    THRESHOLDS_TABLE,
    TIMING_METRICS,
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
from mae_bench.stats import (
    SequentialRule,
    compare,
    seeds_needed,
    sequential_compare,
    t_halfwidth,
)

ID_COLUMNS = ["variant", "encoder", "masking", "loss"]
SWEEP_FAMILY = "sweep_family"  # a sweep point's column: the swept variant's name in the suite
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
    (evaluators in suite order), then the runner's own metrics, then the unprefixed summary
    columns (:func:`summary_columns`), each described as a copy of its one source."""
    records = list(records)
    info: Info = {}
    for r in records:
        for _, evaluation in evaluations(r):
            for name, described in evaluation["info"].items():
                info.setdefault(name, described)
    for name, metric in CORE_METRICS.items():
        info.setdefault(name, metric.as_dict())
    for key, source in summary_columns(records).items():
        described = info[source]
        info.setdefault(
            key,
            {
                **described,
                "description": f"{described.get('description', source)}: a copy of `{source}` "
                "(every row from this one evaluator; empty where it did not run)",
                "headline": False,
                "summary": None,
                "flag": None,
                "summary_of": source,
            },
        )
    return info


def plural(count: int, noun: str) -> str:
    """``count`` and ``noun``, its plural from 2 on or at 0 (``1 seed``, ``3 seeds``)."""
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


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


def summary_columns(records: list[dict[str, Any]]) -> dict[str, str]:
    """Each unprefixed summary column (``f1_macro``, ``auc``, ...) and the one metric that
    fills it for every row: that of the highest-priority evaluator (lowest
    ``summary_priority``: fine-tuning where it ran, else the linear probe) that reported it
    for any cell. Rows without that evaluator stay empty: a column never mixes evaluators."""
    ranked: dict[str, set[tuple[int, str]]] = {}
    for r in records:
        for _, evaluation in evaluations(r):
            for name, described in evaluation["info"].items():
                key = described.get("summary")
                if key and not missing(evaluation["metrics"].get(name)):
                    ranked.setdefault(key, set()).add((evaluation["summary_priority"], name))
    return {key: min(pairs)[1] for key, pairs in ranked.items()}


def sweep_paths(records: Iterable[dict[str, Any]]) -> list[str]:
    """Every path a sweep point among ``records`` sweeps, in the order first met."""
    paths: dict[str, None] = {}
    for r in records:
        paths.update(dict.fromkeys((r.get("sweep") or {}).get("values", {})))
    return list(paths)


def sweep_columns(frame: pd.DataFrame) -> list[str]:
    """The swept-path columns of a runs or leaderboard table (``frame.attrs["sweep_paths"]``;
    for a table read back from CSV, its columns with a ``.``: no metric has one)."""
    paths = frame.attrs.get("sweep_paths")
    if paths is None:
        paths = [c for c in frame.columns if "." in str(c)]
    return [c for c in paths if c in frame.columns]


def _sweep_cells(record: dict[str, Any], paths: list[str]) -> dict[str, Any]:
    """A cell's ``sweep_family`` and the value of each swept path (None where it has none)."""
    sweep = record.get("sweep") or {}
    values = sweep.get("values", {})
    return {SWEEP_FAMILY: sweep.get("family"), **{p: values.get(p) for p in paths}}


def _run_of(record: dict[str, Any]) -> str:
    """The run that timed a cell (``provenance.run_id``); a cell stored without one counts
    as a run of its own (its timings are not known to be comparable with any other's)."""
    return record.get("provenance", {}).get("run_id") or f"unknown ({record['cell_id']})"


def runs_table(records: Iterable[dict[str, Any]]) -> pd.DataFrame:
    """One row per finished cell (two for a baseline cell): components, metrics, the run
    that timed it, config hash."""
    records = list(records)
    paths = sweep_paths(records)
    rows = []
    for r in records:
        row = {
            "variant": r["variant"],
            "seed": r["seed"],
            **r["components"],
            **(_sweep_cells(r, paths) if paths else {}),
            "pretrain_sees_test": bool(r.get("data", {}).get("pretrain_sees_test", False)),
            **{k: (float("nan") if v is None else v) for k, v in r["metrics"].items()},
            "run_id": _run_of(r),
            "config_hash": r["config_hash"],
            "cell_id": r["cell_id"],
        }
        rows += _baseline_rows(row, _trained_metrics(r)) if r.get("baseline") else [row]
    runs = pd.DataFrame(rows)
    if runs.empty:
        return runs
    swept = [SWEEP_FAMILY, *paths] if paths else []
    for column in swept:  # as written: an int stays an int beside a variant without it
        runs[column] = pd.Series([row.get(column) for row in rows], dtype=object)
    runs.attrs["sweep_paths"] = paths
    for key, source in summary_columns(records).items():
        runs[key] = runs[source] if source in runs else float("nan")
    head = ["variant", "seed", *ID_COLUMNS[1:], *swept, "pretrain_sees_test"]
    tail = ["run_id", "config_hash", "cell_id"]
    return runs[[*head, *_metric_columns(runs, metric_info(records)), *tail]]


def _metric_columns(runs: pd.DataFrame, info: Info | None = None) -> list[str]:
    not_metrics = {"seed", "pretrain_sees_test", SWEEP_FAMILY, *sweep_columns(runs)}
    numeric = [
        c for c in runs.columns if c not in not_metrics and pd.api.types.is_numeric_dtype(runs[c])
    ]
    known = [m for m in (info or {}) if m in numeric]
    return known + [m for m in numeric if m not in known]


def _tie_key(value: float) -> float:
    """A mean as ranks compare it: to 12 significant digits, so that equal values summed in
    another seed order (a last-bit difference) tie."""
    return value if missing(value) else float(f"{value:.12g}")


def _timed_in(runs: pd.DataFrame) -> pd.Series:
    """Per variant, the runs (``run_id``) that measured its timings, comma-separated; NaN
    for a variant without timings."""
    timings = [m for m in TIMING_METRICS if m in runs]
    if "run_id" not in runs or not timings:
        return pd.Series(dtype=object)
    timed = runs[runs[timings].notna().any(axis=1)]
    return timed.groupby("variant", sort=False)["run_id"].agg(
        lambda ids: ", ".join(sorted(set(ids)))
    )


def leaderboard_table(
    runs: pd.DataFrame,
    primary: str = DEFAULT_PRIMARY_METRIC,
    info: Info | None = None,
    reference: str | None = None,
    rule: SequentialRule | None = None,
) -> pd.DataFrame:
    """Per variant: mean, std (ddof=1), 95% CI and number of seeds with a value
    (``<metric>_seeds``: a NaN seed is not a seed of that metric) of every metric, ranked by
    ``primary``; ``seeds`` counts the variant's finished cells, ``timed_in`` the runs that
    measured its timings.

    Equal means share a rank (1, 1, 3); a variant without ``primary`` has none.
    ``overlaps_leader`` is True where a variant's interval on the primary metric overlaps the
    leader's, NaN with a single seed. With a ``reference`` variant and a compared
    ``primary``, the paired comparison of each variant with it on the primary metric
    (:mod:`mae_bench.stats`): ``pairs``, ``delta``, ``delta_ci95_low``/``high``,
    ``prob_improve``, ``p_value`` (Holm-corrected) and ``verdict``. With adaptive seeds'
    ``rule``, the verdict is that rule's (:class:`~mae_bench.stats.SequentialRule`) and
    ``stopped`` says why each variant has the seeds it has.
    """
    if runs.empty:
        return pd.DataFrame(columns=[*ID_COLUMNS, "seeds"])
    metrics = _metric_columns(runs, info)
    swept = sweep_columns(runs)
    grouped = runs.groupby("variant", sort=False)
    ids = (*ID_COLUMNS[1:], *([SWEEP_FAMILY, *swept] if swept else []), "pretrain_sees_test")
    board = grouped[[c for c in ids if c in runs]].first()
    board["seeds"] = grouped["seed"].count()
    means = grouped[metrics].mean()
    stds = grouped[metrics].std(ddof=1)  # spreads after the means: the CSV reads left to right
    counts = grouped[metrics].count()
    cis = pd.DataFrame({m: t_halfwidth(stds[m], counts[m]) for m in metrics}, index=stds.index)
    timed = _timed_in(runs).rename("timed_in")
    parts = [board, means, stds.add_suffix("_std"), cis.add_suffix("_ci95")]
    parts += [counts.add_suffix("_seeds"), timed.reindex(board.index)]
    board = pd.concat(parts, axis=1).reset_index()
    if primary in board:
        ascending = not higher_is_better(primary, info)
        board = board.sort_values(
            primary, ascending=ascending, kind="stable", na_position="last"
        ).reset_index(drop=True)
        ranks = board[primary].map(_tie_key).rank(method="min", ascending=ascending)
        board.insert(1, "rank", ranks.astype("Int64"))
        ci = board[f"{primary}_ci95"]
        gap = (board[primary] - board[primary].iloc[0]).abs()
        overlaps = (gap <= ci + ci.iloc[0]).astype(object).where(ci.notna() & pd.notna(ci.iloc[0]))
        overlaps.iloc[0] = True
        board["overlaps_leader"] = overlaps
        compared = (info or {}).get(primary, {}).get("compare", True)
        if reference is not None and compared:
            board = _with_comparison(board, runs, primary, reference, info, rule)
    board = board.reset_index(drop=True)
    board.attrs["sweep_paths"] = swept
    return board


def _with_comparison(
    board: pd.DataFrame,
    runs: pd.DataFrame,
    primary: str,
    reference: str,
    info: Info | None,
    rule: SequentialRule | None = None,
) -> pd.DataFrame:
    direction = {primary: higher_is_better(primary, info)}
    found = compare(runs, [primary], reference, direction).set_index("variant")
    columns = [
        "pairs", "delta", "delta_ci95_low", "delta_ci95_high", "prob_improve", "p_holm", "verdict"
    ]  # fmt: skip
    if rule is not None:
        looks = sequential_compare(runs, primary, reference, direction[primary], rule)
        looks = looks.set_index("variant")
        found["verdict"] = looks["verdict"].reindex(found.index)
        found["stopped"] = looks["reason"].reindex(found.index)
        columns.append("stopped")
    joined = board.join(found[columns].rename(columns={"p_holm": "p_value"}), on="variant")
    joined.loc[joined["variant"] == reference, "verdict"] = "reference"
    joined["verdict"] = joined["verdict"].fillna("not compared")
    if rule is not None:
        joined.loc[joined["variant"] == reference, "stopped"] = (
            "the reference: as many seeds as the longest variant"
        )
    return joined


def metric_fmt(info: Info | None, metric: str | None, default: str = DEFAULT_FMT) -> str:
    """The display format ``metric``'s evaluator declares (``default`` where it has none)."""
    return (info or {}).get(metric or "", {}).get("fmt", default)


def format_metric(fmt: str, mean: Any, std: Any = None) -> str:
    """A metric's value, or ``mean ± std``, in its display format ``fmt`` (e.g. ``{:.3f}``):
    "—" when the mean is missing (None or NaN), the mean alone when the std is."""
    if missing(mean):
        return "—"
    text = fmt.format(mean)
    if not missing(std):
        text += " ± " + fmt.format(std)
    return text


def missing(value: Any) -> bool:
    """None, NaN or pandas' NA: no value."""
    return value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value))


SPEED_MARK = "§"  # beside timing columns measured in more than one run or host


LEAK_MARK = "†"
LEAK_NOTE = "pretrained on the test images too (`pretrain_sees_test`): optimistic"


@dataclass(frozen=True)
class Mark:
    """A caveat the leaderboards (Markdown and the page) put beside variant names: its
    symbol, what it means (Markdown: code in backticks), and for each board row whether it
    applies."""

    symbol: str
    note: str
    rows: tuple[bool, ...]

    @property
    def text(self) -> str:
        """The note as plain text."""
        return self.note.replace("`", "")

    def variants(self, board: pd.DataFrame) -> list[str]:
        """The board's variants it applies to."""
        return [str(v) for v, hit in zip(board["variant"], self.rows, strict=True) if hit]


def board_marks(board: pd.DataFrame, info: Info) -> list[Mark]:
    """The caveats on a board's variants, numbered as both leaderboards show them: ``†``
    pretrained on the test images, then ``‡``, ``‡‡``, ... for each flag metric
    (``Metric.flag``) below 1 on some variant (fine-tuning not converged, never learned)."""
    marks = []
    if "pretrain_sees_test" in board:
        leaked = tuple(not pd.isna(v) and bool(v) for v in board["pretrain_sees_test"])
        if any(leaked):
            marks.append(Mark(LEAK_MARK, LEAK_NOTE, leaked))
    for metric, described in info.items():
        if described.get("flag") and metric in board:
            below = tuple(bool(v < 1) for v in board[metric])
            if any(below):
                symbol = "‡" * (sum(m.symbol.startswith("‡") for m in marks) + 1)
                marks.append(Mark(symbol, f"{described['flag']} (`{metric}` < 1)", below))
    return marks


def leaderboard_markdown(
    board: pd.DataFrame, title: str = "", info: Info | None = None, primary: str | None = None
) -> str:
    """The leaderboard as Markdown: the headline metrics (as their evaluators declare them)
    as ``mean ± std`` (with ``(k/n)`` where only k of a variant's n seeds have a value), the
    best value of each compared metric in bold, ``≈`` beside variants whose interval overlaps
    the leader's, and ``§`` on timing columns measured in different runs or on different
    hosts."""
    info = info or {}
    shown = [m for m, d in info.items() if d.get("headline") and m in board.columns]
    swept = sweep_columns(board)
    table = board[[c for c in ("rank", *ID_COLUMNS, *swept, "seeds") if c in board.columns]].copy()
    for column in swept:
        table[column] = sweep_texts(table[column])
    if "rank" in board:
        table["rank"] = ["" if pd.isna(rank) else str(rank) for rank in board["rank"]]
    if "overlaps_leader" in board:
        table["variant"] = [
            f"{name} ≈" if overlap is True and not pd.isna(rank) and rank > 1 else name
            for name, overlap, rank in zip(
                table["variant"], board["overlaps_leader"], board["rank"], strict=True
            )
        ]
    marks = board_marks(board, info)
    for mark in marks:
        table["variant"] = [
            f"{name} {mark.symbol}" if hit else name
            for name, hit in zip(table["variant"], mark.rows, strict=True)
        ]
    runs = _timing_runs(board)
    partial = False  # a shown value over fewer seeds than its variant has
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
        if f"{metric}_seeds" in board and "seeds" in board:
            counts, seeds = board[f"{metric}_seeds"], board["seeds"]
            fewer = (counts > 0) & (counts < seeds)
            cells = [
                f"{c} ({k}/{n})" if few else c
                for c, k, n, few in zip(cells, counts, seeds, fewer, strict=True)
            ]
            partial |= bool(fewer.any())
        header = f"{metric} {SPEED_MARK}" if metric in TIMING_METRICS and len(runs) > 1 else metric
        table[header] = cells
    if "verdict" in board:
        fmt = metric_fmt(info, primary, "{:.3f}")
        table["vs reference"] = [
            _delta_cell(row, fmt.replace("{:", "{:+")) for _, row in board.iterrows()
        ]
    if "stopped" in board:
        table["stopped"] = ["" if missing(v) else str(v) for v in board["stopped"]]
    body = table.to_markdown(index=False, disable_numparse=True)
    heading = f"## {title}\n\n" if title else ""
    note = (
        "\nmean ± std over seeds; **bold**: best; ≈: 95% interval on the ranking metric "
        "overlaps the leader's.\n"
    )
    if partial:
        note += (
            "(k/n): only k of the variant's n seeds have a value for this metric (the others "
            "are missing or NaN); its mean, std and interval are over those k.\n"
        )
    note += "".join(f"{mark.symbol}: {mark.note}.\n" for mark in marks)
    if len(runs) > 1 and any(m in TIMING_METRICS for m in shown):
        note += (
            f"{SPEED_MARK}: timings measured in {len(runs)} different runs or hosts (`timed_in` "
            "in leaderboard.csv): not comparable for speed; time the variants in one run on "
            "one host to compare them.\n"
        )
    if "verdict" in board:
        note += _comparison_note(board)
    return f"{heading}{body}\n{note}"


def numeric_values(values: pd.Series) -> bool:
    """Whether every value of a swept path is a number (a bool or a string is not)."""
    present = values.dropna()
    return len(present) > 0 and all(
        isinstance(v, numbers.Real) and not isinstance(v, bool | np.bool_) for v in present
    )


def sweep_texts(values: pd.Series) -> pd.Series:
    """A swept path's values as written (``0.5``, not ``0.500000``; a string as it is; ""
    where missing); a column of whole numbers stored as floats (a CSV's integers beside
    NaN) as integers."""
    present = values.dropna()
    whole = numeric_values(values) and all(float(v).is_integer() for v in present)

    def text(value: Any) -> str:
        if missing(value):
            return ""
        if whole:
            return str(int(value))
        if isinstance(value, numbers.Real) and not isinstance(value, bool | np.bool_):
            return str(value.item() if isinstance(value, np.generic) else value)
        return str(value)

    return values.map(text)


def _timing_runs(board: pd.DataFrame) -> set[str]:
    """Every run that measured a timing on the board (from its ``timed_in`` column)."""
    if "timed_in" not in board:
        return set()
    return {run for ids in board["timed_in"].dropna() for run in str(ids).split(", ")}


def _delta_cell(row: pd.Series, fmt: str) -> str:
    if row["verdict"] in ("reference", "not compared"):
        return row["verdict"]
    low, high = row["delta_ci95_low"], row["delta_ci95_high"]
    interval = "" if pd.isna(low) else f" [{fmt.format(low)}, {fmt.format(high)}]"
    return f"{fmt.format(row['delta'])}{interval} {row['verdict']}"


def _comparison_note(board: pd.DataFrame) -> str:
    """How the verdicts were reached, and whether the paired seeds could reach one at all."""
    reference = board.loc[board["verdict"] == "reference", "variant"]
    compared = board[~board["verdict"].isin(["reference", "not compared"])]
    named = f"`{reference.iloc[0] if len(reference) else '?'}`"
    if "stopped" in board:  # adaptive seeds: the sequential rule's verdicts
        return (
            f"vs reference: mean paired difference to {named} over seeds [95% Student-t "
            "interval]. Seeds until the answer is clear: each variant ran seeds until its "
            "paired t-test against the reference crossed a group-sequential (O'Brien-Fleming) "
            "threshold (`better`/`worse`) or it reached the maximum (`inconclusive`); with a "
            "look after every seed, each variant's chance of a false `better`/`worse` stays at "
            "or below 5%. `stopped` says why each has the seeds it has.\n"
        )
    text = (
        f"vs reference: mean paired difference to {named}"
        " over seeds [95% Student-t interval]; `better`/`worse` only when the interval excludes "
        "0 and the Wilcoxon signed-rank p, Holm-corrected over the variants, is below 0.05.\n"
    )
    if len(compared) and "pairs" in compared:
        pairs = compared["pairs"].astype(int)
        fewest, most = int(pairs.min()), int(pairs.max())
        needed = seeds_needed(len(compared))
        test = (
            f"the exact Wilcoxon test needs at least {plural(needed, 'paired seed')} for "
            f"{plural(len(compared), 'comparison')} at 0.05 (Holm)"
        )
        if fewest == most:
            counted = plural(fewest, "paired seed")
        else:
            names = ", ".join(compared.loc[pairs == fewest, "variant"].astype(str))
            counted = f"{fewest} to {most} paired seeds (fewest: {names})"
        if most < needed:
            text += (
                f"With {counted} no verdict can be reached: {test}; the intervals and win "
                "rates above are descriptive.\n"
            )
        elif fewest < needed:
            short = ", ".join(compared.loc[pairs < needed, "variant"].astype(str))
            text += (
                f"With {counted}, {short} cannot reach a verdict: {test}; their intervals "
                "and win rates are descriptive.\n"
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


def compared_metrics(info: Info) -> list[str]:
    """The metrics that enter comparisons: results (``compare``), not timings, sizes,
    settings or the summary columns' copies of another column."""
    return [m for m, d in info.items() if d.get("compare", True) and not d.get("summary_of")]


def default_reference(records: list[dict[str, Any]]) -> str | None:
    """The first pretrained (non-baseline) variant: what the others are compared with."""
    return next((r["variant"] for r in records if not r.get("baseline")), None)


def write_leaderboard(
    root: Path,
    records: list[dict[str, Any]],
    title: str,
    primary: str = DEFAULT_PRIMARY_METRIC,
    reference: str | None = None,
    rule: SequentialRule | None = None,
) -> tuple[pd.DataFrame, str]:
    """Write runs.csv, leaderboard.csv/.md, comparisons.csv (every variant against the
    ``reference``, default :func:`default_reference`, on every metric) and thresholds/ under
    ``root``; return the board and its Markdown (without threshold tables and glossary)."""
    runs = runs_table(records)
    info = metric_info(records)
    reference = reference or default_reference(records)
    board = leaderboard_table(runs, primary, info, reference, rule)
    if reference is not None and not runs.empty:
        metrics = [m for m in compared_metrics(info) if m in runs]
        directions = {m: higher_is_better(m, info) for m in metrics}
        comparisons = compare(runs, metrics, reference, directions)
        if rule is not None and "verdict" in board:  # the primary's verdict is the rule's
            verdicts = board.set_index("variant")["verdict"]
            on_primary = comparisons["metric"] == primary
            comparisons.loc[on_primary, "verdict"] = comparisons.loc[on_primary, "variant"].map(
                verdicts
            )
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
    rule: SequentialRule | None = None,
) -> tuple[pd.DataFrame, str, int]:
    """Write the leaderboard from every finished one of ``cells`` (``(cell_id, eval_ids)``)
    under a lock: of processes sharing the folder, the one that ends last writes one that
    holds every cell. Returns the table, its Markdown and the number of finished cells."""
    with leaderboard_lock(root):
        records = list(CellStore(root).finished(cells, repair=False).values())
        table, markdown = write_leaderboard(root, records, title, primary, reference, rule)
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
