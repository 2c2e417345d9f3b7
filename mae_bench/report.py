"""``mae-bench report``: the tables, every plot and ``report.html``, one self-contained
results page per suite, regenerated from stored results (no retraining).

Everything on the page is inline (plots as PNG data URIs, a few lines of script and style),
so the file opens offline from ``file://`` and can be mailed. Every text that comes from a
suite or a result is HTML-escaped: a description holding ``<script>`` shows as text.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import math
from dataclasses import dataclass
from html import escape
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
import yaml

from mae_bench.files import atomic_write
from mae_bench.leaderboard import (
    ID_COLUMNS,
    SPEED_MARK,
    Info,
    Mark,
    board_marks,
    format_metric,
    higher_is_better,
    metric_fmt,
    metric_info,
    missing,
    plural,
    read_table,
    sweep_columns,
    sweep_texts,
    threshold_display,
    write_leaderboard,
)
from mae_bench.metrics import (
    DEFAULT_PRIMARY_METRIC,
    THRESHOLDS_TABLE,
    TIMING_METRICS,
    binary_thresholds,
)
from mae_bench.plots import (
    EvaluatorPlot,
    draw_plots,
    evaluator_plots,
    variant_curves,
)
from mae_bench.results import (
    FAILED_DIR,
    REPORT_FILE,
    SUITE_FILE,
    CellStore,
    evaluations,
    read_suite_record,
    recorded_cells,
    strict_json,
)
from mae_bench.stats import ALPHA, seeds_needed
from mae_bench.suite import adaptive_rule, resolve_suite

if TYPE_CHECKING:
    from mae_bench.plugins import Registry


STYLE = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1200px;color:#222}
table{border-collapse:collapse;font-size:13px;margin:.5em 0}
th,td{border:1px solid #ccc;padding:3px 6px;text-align:right;white-space:nowrap}
.scroll{overflow-x:auto}
th{background:#f3f3f3;cursor:pointer;white-space:nowrap}
td.id,th.id{text-align:left}
.all-only{display:none} body.all .all-only{display:table-cell}
.best{font-weight:bold} .verdict-better{color:#070} .verdict-worse{color:#a00}
img{max-width:100%;border:1px solid #eee;margin:.3em 0}
details{margin:.4em 0} summary{cursor:pointer;font-weight:600}
pre{background:#f7f7f7;padding:.6em;overflow:auto;font-size:12px}
.note{color:#555;font-size:13px}
#leaderboard .variant{position:sticky;left:0;background:#fff;z-index:1}
#leaderboard th.variant{background:#f3f3f3}
.mark{color:#a40;font-weight:bold;cursor:help}
.glossary td{white-space:normal;text-align:left}
.warnings{background:#fff4e5;border:1px solid #e0a040;padding:.5em 1em .5em 2em}
.warnings li{margin:.2em 0}
#checks td{text-align:left;white-space:normal}
"""

SCRIPT = """
function sortTable(th){const table=th.closest('table');const body=table.tBodies[0];
const i=[...th.parentNode.children].indexOf(th);const asc=th.dataset.asc!=='1';
th.dataset.asc=asc?'1':'0';const key=r=>{const c=r.children[i];const v=c.dataset.v;
return v===undefined||v===''?null:(isNaN(+v)?v:+v)};
[...body.rows].sort((a,b)=>{const x=key(a),y=key(b);if(x===null)return 1;if(y===null)return -1;
return (x<y?-1:x>y?1:0)*(asc?1:-1)}).forEach(r=>body.appendChild(r))}
document.addEventListener('DOMContentLoaded',()=>{
document.querySelectorAll('th[data-sort]').forEach(th=>th.addEventListener('click',()=>sortTable(th)));
const t=document.getElementById('toggle');if(t)t.addEventListener('click',()=>{
document.body.classList.toggle('all');t.textContent=document.body.classList.contains('all')?
'show headline columns':'show all columns'})});
"""


def _image(path: Path) -> str:
    return _png(path.read_bytes(), path.stem)


def _png(data: bytes, alt: str) -> str:
    encoded = base64.b64encode(data).decode()
    return f'<img alt="{escape(alt)}" src="data:image/png;base64,{encoded}">'


OVERLAP_MARK = "≈"
OVERLAP_NOTE = "its 95% interval on the ranking metric overlaps the leader's"

COMPARISON_HELP = {
    "verdict": (
        "better / worse only when the 95% Student-t interval of the paired per-seed "
        "differences excludes 0 and the exact Wilcoxon signed-rank p, Holm-corrected over the "
        f"variants compared, is below {ALPHA:g}; inconclusive otherwise"
    ),
    "delta": (
        "mean of the paired per-seed differences to the reference (variant − reference, same "
        "seed) on {primary}, with their 95% Student-t interval [low, high]"
    ),
    "prob_improve": (
        "share of the seed pairs on which the variant beats the reference on {primary} (ties "
        "count half): descriptive, no test"
    ),
    "p_value": (
        "exact Wilcoxon signed-rank test of the paired per-seed differences on {primary}, "
        "Holm-corrected over the variants compared"
    ),
}
"""How each comparison column was produced (its tooltip and glossary entry)."""

SWEEP_HELP = (
    "a setting the suite sweeps: this sweep point's value (empty for a variant that does not "
    "sweep it)"
)
"""What a swept path's column holds (its tooltip and glossary entry)."""

SANITY_ORDER = ("n_train", "n_val", "n_test", "num_classes", "chance", "resolution")
"""Sanity facts shown first, in this order (then any other an evaluator stores)."""


def _row_marks(marks: list[Mark], index: int) -> list[Mark]:
    return [m for m in marks if m.rows[index]]


def _named(board: pd.DataFrame, marks: list[Mark], index: int, html: bool = False) -> str:
    """A board row's variant name with its marks (``scratch-vit ‡``), escaped."""
    name = escape(str(board["variant"].iloc[index]))
    mine = _row_marks(marks, index)
    if not mine:
        return name
    if html:
        spans = "".join(
            f'<span class="mark" title="{escape(m.text)}">{escape(m.symbol)}</span>' for m in mine
        )
        return f"{name} {spans}"
    return f"{name} {' '.join(m.symbol for m in mine)}"


def summary_paragraph(
    board: pd.DataFrame,
    primary: str,
    info: Info,
    planned_seeds: int | None = None,
    sanity_warnings: int = 0,
) -> str:
    """What the results say, in one paragraph of HTML: the leader, the verdicts against the
    reference, how the best pretrained variant compares with training from scratch, and
    every caveat that applies to them (the leaderboard's marks, too few seeds for a verdict,
    fewer seeds than ``planned_seeds``, the evaluators' ``sanity_warnings``)."""
    if board.empty or primary not in board:
        return "No finished cells yet."
    marks = board_marks(board, info)
    fmt = metric_fmt(info, primary)
    row_of = {str(v): i for i, v in enumerate(board["variant"])}
    parts = [
        f"{_named(board, marks, 0)} leads on {escape(primary)} "
        f"({format_metric(fmt, board[primary].iloc[0])})."
    ]
    if "verdict" in board:
        reference = board.loc[board["verdict"] == "reference", "variant"]
        counted = board["verdict"].value_counts()
        if len(reference):
            tally = ", ".join(
                f"{counted.get(v, 0)} {v}" for v in ("better", "worse", "inconclusive")
            )
            name = _named(board, marks, row_of[str(reference.iloc[0])])
            parts.append(f"Against the reference {name}: {tally}.")
            parts += _verdict_reach(board)
    scratch = board[board["variant"].astype(str).str.startswith("scratch") & board[primary].notna()]
    pretrained = board[
        ~board["variant"].astype(str).str.startswith(("scratch", "random-init"))
        & board[primary].notna()
    ]
    if len(scratch) and len(pretrained):
        up = higher_is_better(primary, info)
        best = pretrained[primary].idxmax() if up else pretrained[primary].idxmin()
        base = scratch[primary].idxmax() if up else scratch[primary].idxmin()
        gap = board[primary].loc[best] - board[primary].loc[base]
        direction = "above" if (gap > 0) == up else "below"
        where = {i: n for n, i in enumerate(board.index)}
        parts.append(
            f"The best pretrained variant ({_named(board, marks, where[best])}) is "
            f"{format_metric(fmt, abs(gap))} {direction} the best from-scratch run "
            f"({_named(board, marks, where[base])})."
        )
    for mark in marks:
        variants = ", ".join(escape(v) for v in mark.variants(board))
        parts.append(f"{escape(mark.symbol)}: {escape(mark.text)}: {variants}.")
    short = []  # fewer seeds than planned, or than the variant has, behind its figures
    for index, name in enumerate(board["variant"].astype(str)):
        cells = board["seeds"].iloc[index] if "seeds" in board else None
        if planned_seeds and not missing(cells) and int(cells) < planned_seeds:
            short.append(f"{escape(name)} has {int(cells)} of the {planned_seeds} planned seeds")
        if _partial(board, primary).iloc[index]:
            have = int(board[f"{primary}_seeds"].iloc[index])
            short.append(
                f"{escape(name)}'s {escape(primary)} is over {have} of its {int(cells)} seeds "
                "(the others have none)"
            )
    if short:
        parts.append("; ".join(short) + ".")
    if sanity_warnings:
        parts.append(
            f"{plural(sanity_warnings, 'sanity warning')} about the evaluations: see "
            '<a href="#checks">Checks</a>.'
        )
    return " ".join(parts)


def _verdict_reach(board: pd.DataFrame) -> list[str]:
    """A sentence when the paired seeds are too few for any verdict (the exact Wilcoxon
    test's smallest p cannot reach 0.05 after Holm's correction)."""
    compared = board[~board["verdict"].isin(["reference", "not compared"])]
    if compared.empty:
        return []
    pairs = compared["pairs"] if "pairs" in compared else compared.get("seeds")
    if pairs is None or pairs.dropna().empty:
        return []
    most, needed = int(pairs.max()), seeds_needed(len(compared))
    if most >= needed:
        return []
    return [
        f"With {plural(most, 'paired seed')} no verdict can be reached: the exact Wilcoxon "
        f"test needs at least {plural(needed, 'paired seed')} for "
        f"{plural(len(compared), 'comparison')} at {ALPHA:g} (Holm), so the tally says nothing "
        "yet."
    ]


def _leaderboard_html(board: pd.DataFrame, primary: str, info: Info) -> str:
    metrics = [m for m in info if m in board.columns]
    if primary in metrics:  # the ranking metric first, right beside the variant
        metrics = [primary] + [m for m in metrics if m != primary]
    headline = {m for m in metrics if info[m].get("headline")} | {primary}
    sweeps = sweep_columns(board)  # each sweep point's values, beside its name
    swept = {c: sweep_texts(board[c]) for c in sweeps}
    ids = [c for c in ("rank", *ID_COLUMNS) if c in board.columns] + sweeps
    ids += ["seeds"] if "seeds" in board.columns else []
    extra = [c for c in ("verdict", "delta", "prob_improve", "p_value") if c in board.columns]
    marks = board_marks(board, info)
    overlaps = _overlap_rows(board)
    speed = len(_timing_runs(board)) > 1
    partial = {m: _partial(board, m) for m in metrics}
    head = "".join(
        f'<th class="sweep" title="{escape(SWEEP_HELP)}" data-sort>{escape(c)}</th>'
        if c in swept
        else f'<th class="id{" variant" if c == "variant" else ""}" data-sort>{escape(c)}</th>'
        for c in ids
    )
    for i, m in enumerate(metrics):
        cls = "" if m in headline else ' class="all-only"'
        title = escape(info[m].get("description", ""))
        label = escape(m)
        if speed and m in TIMING_METRICS:
            title += escape(f" ({SPEED_MARK}: {_speed_note(board)})")
            label += f' <span class="mark">{SPEED_MARK}</span>'
        head += f'<th{cls} title="{title}" data-sort>{label}</th>'
        if i == 0:  # the comparison with the reference, beside the ranking metric
            head += "".join(
                f'<th title="{escape(comparison_help(c, primary))}" data-sort>{escape(c)}</th>'
                for c in extra
            )
    best = {}
    for m in metrics:
        if info[m].get("compare", True) and board[m].notna().any():
            best[m] = board[m].max() if higher_is_better(m, info) else board[m].min()
    rows = []
    for index, (_, row) in enumerate(board.iterrows()):
        cells = ""
        for c in ids:
            value = "" if missing(row[c]) else str(row[c])
            if c == "variant":
                shown = _named(board, marks, index, html=True)
                if overlaps[index]:
                    shown += (
                        f' <span class="mark" title="{escape(OVERLAP_NOTE)}">{OVERLAP_MARK}</span>'
                    )
                cells += f'<td class="id variant" data-v="{escape(value)}">{shown}</td>'
            elif c in swept:
                text = escape(swept[c].iloc[index])
                cells += f'<td class="sweep" data-v="{text}">{text}</td>'
            else:
                cells += f'<td class="id" data-v="{escape(value)}">{escape(value)}</td>'
        for i, m in enumerate(metrics):
            value = row[m]
            text = format_metric(metric_fmt(info, m), value, row.get(f"{m}_std"))
            if partial[m].iloc[index]:
                text += f" ({int(row[f'{m}_seeds'])}/{int(row['seeds'])})"
            classes = ["all-only"] if m not in headline else []
            if m in best and value == best[m] and len(board) > 1:
                classes.append("best")
            cls = f' class="{" ".join(classes)}"' if classes else ""
            v = "" if pd.isna(value) else value
            cells += f'<td{cls} data-v="{v}">{escape(text)}</td>'
            if i == 0:
                cells += _comparison_cells(row, extra, info, primary)
        rows.append(f"<tr>{cells}</tr>")
    return (
        f'<div class="scroll"><table id="leaderboard"><thead><tr>{head}</tr></thead>'
        f"<tbody>{''.join(rows)}</tbody></table></div>"
    )


def comparison_help(column: str, primary: str) -> str:
    """How a comparison column (``verdict``, ``delta``, ...) was produced, in words."""
    return COMPARISON_HELP[column].format(primary=primary)


def _overlap_rows(board: pd.DataFrame) -> list[bool]:
    """Per row, whether the Markdown marks it ``≈`` (overlaps the leader, not the leader)."""
    if "overlaps_leader" not in board or "rank" not in board:
        return [False] * len(board)
    return [
        overlap is True and not missing(rank) and rank > 1
        for overlap, rank in zip(board["overlaps_leader"], board["rank"], strict=True)
    ]


def _timing_runs(board: pd.DataFrame) -> set[str]:
    """Every run that measured a timing on the board (its ``timed_in`` column)."""
    if "timed_in" not in board:
        return set()
    return {run for ids in board["timed_in"].dropna() for run in str(ids).split(", ")}


def _partial(board: pd.DataFrame, metric: str) -> pd.Series:
    """Per row, whether only some of its seeds have a value of ``metric`` (``(k/n)``)."""
    if f"{metric}_seeds" not in board or "seeds" not in board:
        return pd.Series(False, index=board.index)
    have = board[f"{metric}_seeds"]
    return (have > 0) & (have < board["seeds"])


def _speed_note(board: pd.DataFrame) -> str:
    return (
        f"timings measured in {len(_timing_runs(board))} different runs or hosts: not "
        "comparable for speed"
    )


def _marks_note(board: pd.DataFrame, info: Info) -> str:
    """What each mark beside a variant name means (always shown, as in the Markdown)."""
    lines = [f"{OVERLAP_MARK}: {OVERLAP_NOTE}"] if any(_overlap_rows(board)) else []
    lines += [f"{m.symbol}: {m.text}" for m in board_marks(board, info)]
    if len(_timing_runs(board)) > 1 and any(m in board for m in TIMING_METRICS):
        lines.append(f"{SPEED_MARK}: {_speed_note(board)}")
    if any(_partial(board, m).any() for m in info if m in board):
        lines.append(
            "(k/n): only k of the variant's n seeds have a value for this metric; its mean, "
            "std and interval are over those k"
        )
    return "<br>".join(escape(line) for line in lines)


def _comparison_cells(row: pd.Series, extra: list[str], info: Info, primary: str) -> str:
    cells = ""
    fmt = metric_fmt(info, primary)
    for c in extra:
        value = row[c]
        shown = value if isinstance(value, str) else format_metric(fmt, value)
        if c == "delta" and not missing(value):
            signed = fmt.replace("{:", "{:+")
            shown = signed.format(value)
            low, high = row.get("delta_ci95_low"), row.get("delta_ci95_high")
            if not missing(low) and not missing(high):
                shown += f" [{signed.format(low)}, {signed.format(high)}]"
        cls = f' class="verdict-{escape(str(value))}"' if c == "verdict" else ""
        v = "" if not isinstance(value, str) and pd.isna(value) else escape(str(value))
        cells += f'<td{cls} data-v="{v}">{escape(str(shown))}</td>'
    return cells


# ------------------------------------------------------------------ sanity of the evaluations
@dataclass
class EvaluatorSanity:
    """What one evaluator's stored results say about how far its figures can be trusted,
    over every cell: each fact's distinct values, each warning and the cells it came from,
    and the cells that stored no facts (results written before they were recorded)."""

    facts: dict[str, list[Any]]
    warnings: dict[str, list[str]]
    without: list[str]
    cells: int = 0


def collect_sanity(records: list[dict[str, Any]]) -> dict[str, EvaluatorSanity]:
    """Per evaluator (suite order), its results' ``sanity`` facts and warnings."""
    out: dict[str, EvaluatorSanity] = {}
    for r in sorted(records, key=lambda r: (str(r["variant"]), r["seed"])):
        cell = f"{r['variant']} seed {r['seed']}"
        for name, evaluation in evaluations(r):
            found = out.setdefault(name, EvaluatorSanity({}, {}, []))
            found.cells += 1
            sanity = evaluation.get("sanity")
            if not isinstance(sanity, dict) or not sanity:
                found.without.append(cell)
                continue
            for key, value in sanity.items():
                if key == "warnings":
                    for sentence in value if isinstance(value, list) else [value]:
                        found.warnings.setdefault(str(sentence), []).append(cell)
                elif value not in found.facts.setdefault(key, []):
                    found.facts[key].append(value)
    return out


def _fact_text(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _facts_line(facts: dict[str, list[Any]]) -> str:
    keys = [k for k in SANITY_ORDER if k in facts] + [k for k in facts if k not in SANITY_ORDER]
    parts = []
    for key in keys:
        values = facts[key]
        numbers = all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)
        if numbers and len(values) > 1:
            text = f"{_fact_text(min(values))}–{_fact_text(max(values))}"
        else:
            text = " / ".join(_fact_text(v) for v in values)
        parts.append(f"<b>{escape(key)}</b> {escape(text)}")
    return " · ".join(parts)


def _cells_text(cells: list[str], total: int) -> str:
    return "every cell" if len(cells) == total else ", ".join(cells)


def sanity_section(found: dict[str, EvaluatorSanity]) -> str:
    """The page's Checks: one line per evaluator with its facts (split sizes, chance level,
    resolution of an accuracy, ...), and every warning, with the cells it applies to."""
    rows, warnings = [], []
    for name, sanity in found.items():
        line = _facts_line(sanity.facts) if sanity.facts else ""
        if sanity.without:
            absent = "no sanity facts stored" + (
                ""
                if len(sanity.without) == sanity.cells
                else f" for {escape(_cells_text(sanity.without, sanity.cells))}"
            )
            line = f"{line} ({absent})" if line else absent
        rows.append(
            f'<tr data-evaluator="{escape(name)}"><td class="id"><b>{escape(name)}</b></td>'
            f"<td>{line}</td></tr>"
        )
        for sentence, cells in sanity.warnings.items():
            warnings.append(
                f"<li>⚠ <b>{escape(name)}</b>: {escape(sentence)} "
                f'<span class="note">({escape(_cells_text(cells, sanity.cells))})</span></li>'
            )
    listed = f'<ul class="warnings">{"".join(warnings)}</ul>' if warnings else "<p>no warnings</p>"
    return (
        '<section id="checks"><h2>Checks</h2><p class="note">What each evaluator\'s results '
        "say about how far its figures can be trusted: split sizes, chance level (always "
        "answering the test set's majority class), resolution of an accuracy (1 / test images), "
        f"and warnings.</p>{listed}<table>{''.join(rows)}</table></section>"
    )


def embedded_json(data: Any) -> str:
    """``data`` as JSON to embed in ``<script type="application/json">``: valid JSON
    (NaN and infinities as null) that a browser's ``JSON.parse`` reads, with only what
    could end or confuse the script element escaped (``<`` as ``\\u003c``; U+2028/2029)."""
    text = json.dumps(strict_json(data), default=_json_default, allow_nan=False, ensure_ascii=False)
    return text.replace("<", "\\u003c").replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")


def _json_default(value: Any) -> Any:
    """A numpy or pandas scalar as plain Python (NaN and NA as None), anything else as text."""
    if value is pd.NA or value is pd.NaT:
        return None
    if hasattr(value, "item"):
        plain = value.item()
        return None if isinstance(plain, float) and not math.isfinite(plain) else plain
    return str(value)


def glossary_html(info: Info, board: pd.DataFrame, primary: str) -> str:
    """Every column's meaning: the metrics as their evaluators describe them, and how each
    comparison column was produced."""
    rows = [
        (m, d.get("description", ""), "higher" if d.get("higher_is_better", True) else "lower")
        for m, d in info.items()
    ]
    rows += [
        (c, comparison_help(c, primary), "")
        for c in ("verdict", "delta", "prob_improve", "p_value")
        if c in board.columns
    ]
    rows += [(c, SWEEP_HELP, "") for c in sweep_columns(board)]
    body = "".join(
        f'<tr><td class="id">{escape(m)}</td><td class="id">{escape(text)}</td>'
        f'<td class="id">{better}</td></tr>'
        for m, text, better in rows
    )
    return (
        '<table class="glossary"><tr><th class="id">column</th><th class="id">meaning</th>'
        f'<th class="id">better</th></tr>{body}</table>'
    )


def _variant_sections(
    records: list[dict[str, Any]],
    store: CellStore,
    info: Info,
    order: list[str],
    plots: list[EvaluatorPlot],
) -> str:
    by_variant: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        by_variant.setdefault(r["variant"], []).append(r)
    shown = [m for m in info if info[m].get("headline")]
    out = []
    for name in [v for v in order if v in by_variant] + [v for v in by_variant if v not in order]:
        cells = sorted(by_variant[name], key=lambda r: r["seed"])
        components = cells[0]["components"]
        parts = [
            "<p>"
            + "; ".join(f"{escape(k)}: {escape(str(v))}" for k, v in components.items())
            + "</p>"
        ]
        head = "".join(f"<th>{escape(m)}</th>" for m in shown if m in cells[0]["metrics"])
        rows = ""
        for r in cells:
            values = "".join(
                f"<td>{escape(format_metric(metric_fmt(info, m), r['metrics'].get(m)))}</td>"
                for m in shown
                if m in cells[0]["metrics"]
            )
            rows += f'<tr class="seed"><td class="id">seed {r["seed"]}</td>{values}</tr>'
        parts.append(f'<table><tr><th class="id">seed</th>{head}</tr>{rows}</table>')
        curves = variant_curves(cells, store, plots)
        if curves:
            parts.append(_png(curves, f"{name}: curves"))
        path = store.table_path(cells[0], THRESHOLDS_TABLE)
        thresholds = read_table(path) if path else None
        if thresholds is not None and binary_thresholds(thresholds):
            table = threshold_display(thresholds)
            parts.append(table.to_html(index=False, escape=True, classes="thresholds"))
        out.append(
            f'<details class="variant" data-variant="{escape(name)}">'
            f"<summary>{escape(name)} ({plural(len(cells), 'seed')})</summary>"
            f"{''.join(parts)}</details>"
        )
    return "".join(out)


def render_page(
    root: Path,
    suite_record: dict[str, Any],
    records: list[dict[str, Any]],
    board: pd.DataFrame,
    plots: list[Path],
    table_plots: list[EvaluatorPlot] | None = None,
) -> Path:
    """Write ``root/report.html`` embedding the ``plots`` (PNG files) and return its path;
    ``table_plots`` (the evaluators' plots) also draw their panels of each variant."""
    resolved = suite_record["resolved"]
    info = metric_info(records)
    primary = resolved.get("primary_metric", DEFAULT_PRIMARY_METRIC)
    store = CellStore(root)
    provenance = records[0]["provenance"] if records else {}
    dataset = resolved.get("dataset", {})
    facts = {
        "dataset": f"{dataset.get('name', '?')} at {dataset.get('image_size', '?')}px",
        "pretraining": f"{resolved.get('pretrain', {}).get('epochs', '?')} epochs",
        "seeds": ", ".join(str(s) for s in resolved.get("seeds", [])),
        "device": provenance.get("device", "?"),
        "results from": provenance.get("date", "?"),
        "mae-bench": f"{provenance.get('mae_bench_version', '?')} "
        f"({provenance.get('git_commit', '?')})",
        "page written": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    failures = []
    for log in sorted((root / FAILED_DIR).glob("*.log")):
        first = log.read_text(encoding="utf-8", errors="replace").splitlines()[:1]
        failures.append(f"<li><b>{escape(log.stem)}</b>: {escape(first[0] if first else '')}</li>")
    order = list(board["variant"]) if "variant" in board else []
    sanity = collect_sanity(records)
    warned = sum(len(found.warnings) for found in sanity.values())
    summary = summary_paragraph(board, primary, info, len(resolved.get("seeds", [])), warned)
    html = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>{escape(suite_record["name"])}: mae-bench results</title>
<style>{STYLE}</style><script>{SCRIPT}</script></head>
<body>
<h1>{escape(suite_record["name"])}</h1>
<p>{escape(str(resolved.get("description", "")))}</p>
<p class="note">{" · ".join(f"{escape(k)}: {escape(str(v))}" for k, v in facts.items())}</p>
<h2>Summary</h2><p id="summary">{summary}</p>
<h2>Leaderboard</h2>
<p class="note">mean ± std over seeds, ranked by {escape(primary)}; bold: best; click a column
header to sort; hover a header or a mark for what it means. <button id="toggle">show all
columns</button></p>
{_leaderboard_html(board, primary, info)}
<p class="note" id="marks">{_marks_note(board, info)}</p>
{sanity_section(sanity)}
<h2>Variants</h2>{_variant_sections(records, store, info, order, table_plots or [])}
<h2>Plots</h2>{"".join(_image(p) for p in plots if p.suffix == ".png" and p.is_file())}
<h2>Failed cells</h2>{f"<ul>{''.join(failures)}</ul>" if failures else "<p>none</p>"}
<h2>Suite (resolved)</h2><pre>{escape(yaml.safe_dump(resolved, sort_keys=False))}</pre>
<h2>Glossary</h2>{glossary_html(info, board, primary)}
<script type="application/json" id="data">{embedded_json(board.to_dict(orient="records"))}</script>
</body></html>
"""
    path = root / REPORT_FILE
    atomic_write(path, html)
    return path


def render_report(root: Path, registry: Registry) -> tuple[list[Path], Path]:
    """``mae-bench report``: rewrite the tables, every plot and the self-contained
    ``report.html`` that embeds them; returns the plots and the page."""
    record = read_suite_record(root)
    store = CellStore(root)
    records = list(store.finished(recorded_cells(record), repair=False).values())
    primary = record["resolved"].get("primary_metric", DEFAULT_PRIMARY_METRIC)
    reference = record["resolved"].get("reference")
    rule = adaptive_rule(record["resolved"])
    board, _ = write_leaderboard(root, records, record["name"], primary, reference, rule)
    if not records:
        return [], render_page(root, record, records, board, [])
    suite = resolve_suite(record["resolved"], registry, source=str(root / SUITE_FILE))
    table_plots = evaluator_plots(suite)
    plots = draw_plots(root, records, board, primary, suite, table_plots)
    return plots, render_page(root, record, records, board, plots, table_plots)
