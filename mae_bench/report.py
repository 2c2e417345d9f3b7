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
from html import escape
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
import yaml

from mae_bench.files import atomic_write
from mae_bench.leaderboard import (
    ID_COLUMNS,
    Info,
    format_metric,
    higher_is_better,
    metric_fmt,
    metric_info,
    read_table,
    threshold_display,
    write_leaderboard,
)
from mae_bench.metrics import DEFAULT_PRIMARY_METRIC, THRESHOLDS_TABLE, binary_thresholds
from mae_bench.plots import EvaluatorPlot, draw_plots, evaluator_plots, variant_curves
from mae_bench.results import (
    FAILED_DIR,
    REPORT_FILE,
    SUITE_FILE,
    CellStore,
    read_suite_record,
    recorded_cells,
)
from mae_bench.suite import resolve_suite

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


def summary_paragraph(board: pd.DataFrame, primary: str, info: Info) -> str:
    """What the results say, in one paragraph: the leader, the verdicts against the
    reference, and how the best pretrained variant compares with training from scratch."""
    if board.empty or primary not in board:
        return "No finished cells yet."
    leader = board.iloc[0]
    parts = [
        f"{escape(str(leader['variant']))} leads on {escape(primary)} "
        f"({format_metric(metric_fmt(info, primary), leader[primary])})."
    ]
    if "verdict" in board:
        reference = board.loc[board["verdict"] == "reference", "variant"]
        counted = board["verdict"].value_counts()
        if len(reference):
            tally = ", ".join(
                f"{counted.get(v, 0)} {v}" for v in ("better", "worse", "inconclusive")
            )
            parts.append(f"Against the reference {escape(str(reference.iloc[0]))}: {tally}.")
    scratch = board[board["variant"].astype(str).str.startswith("scratch")]
    pretrained = board[
        ~board["variant"].astype(str).str.startswith(("scratch", "random-init"))
        & board[primary].notna()
    ]
    if len(scratch) and len(pretrained) and scratch[primary].notna().any():
        best, base = pretrained.iloc[0], scratch[primary].max()
        gap = best[primary] - base
        direction = "above" if (gap > 0) == higher_is_better(primary, info) else "below"
        parts.append(
            f"The best pretrained variant ({escape(str(best['variant']))}) is "
            f"{format_metric(metric_fmt(info, primary), abs(gap))} {direction} the best "
            "from-scratch run."
        )
    return " ".join(parts)


def _leaderboard_html(board: pd.DataFrame, primary: str, info: Info) -> str:
    metrics = [m for m in info if m in board.columns]
    if primary in metrics:  # the ranking metric first, right beside the variant
        metrics = [primary] + [m for m in metrics if m != primary]
    headline = {m for m in metrics if info[m].get("headline")} | {primary}
    ids = [c for c in ("rank", *ID_COLUMNS, "seeds") if c in board.columns]
    extra = [c for c in ("verdict", "delta", "prob_improve", "p_value") if c in board.columns]
    head = "".join(f'<th class="id" data-sort>{escape(c)}</th>' for c in ids)
    for i, m in enumerate(metrics):
        cls = "" if m in headline else ' class="all-only"'
        title = escape(info[m].get("description", ""))
        head += f'<th{cls} title="{title}" data-sort>{escape(m)}</th>'
        if i == 0:  # the comparison with the reference, beside the ranking metric
            head += "".join(f"<th data-sort>{escape(c)}</th>" for c in extra)
    best = {}
    for m in metrics:
        if info[m].get("compare", True) and board[m].notna().any():
            best[m] = board[m].max() if higher_is_better(m, info) else board[m].min()
    rows = []
    for _, row in board.iterrows():
        cells = "".join(
            f'<td class="id" data-v="{escape(str(row[c]))}">{escape(str(row[c]))}</td>'
            for c in ids
        )
        for i, m in enumerate(metrics):
            value = row[m]
            text = format_metric(metric_fmt(info, m), value, row.get(f"{m}_std"))
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


def _comparison_cells(row: pd.Series, extra: list[str], info: Info, primary: str) -> str:
    cells = ""
    for c in extra:
        value = row[c]
        shown = value if isinstance(value, str) else format_metric(metric_fmt(info, primary), value)
        cls = f' class="verdict-{escape(str(value))}"' if c == "verdict" else ""
        v = "" if not isinstance(value, str) and pd.isna(value) else escape(str(value))
        cells += f'<td{cls} data-v="{v}">{escape(str(shown))}</td>'
    return cells


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
            f"<summary>{escape(name)} ({len(cells)} seeds)</summary>{''.join(parts)}</details>"
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
    html = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>{escape(suite_record["name"])}: mae-bench results</title>
<style>{STYLE}</style><script>{SCRIPT}</script></head>
<body>
<h1>{escape(suite_record["name"])}</h1>
<p>{escape(str(resolved.get("description", "")))}</p>
<p class="note">{" · ".join(f"{escape(k)}: {escape(str(v))}" for k, v in facts.items())}</p>
<h2>Summary</h2><p id="summary">{summary_paragraph(board, primary, info)}</p>
<h2>Leaderboard</h2>
<p class="note">mean ± std over seeds, ranked by {escape(primary)}; bold: best; click a column
header to sort. <button id="toggle">show all columns</button></p>
{_leaderboard_html(board, primary, info)}
<h2>Variants</h2>{_variant_sections(records, store, info, order, table_plots or [])}
<h2>Plots</h2>{"".join(_image(p) for p in plots if p.suffix == ".png" and p.is_file())}
<h2>Failed cells</h2>{f"<ul>{''.join(failures)}</ul>" if failures else "<p>none</p>"}
<h2>Suite (resolved)</h2><pre>{escape(yaml.safe_dump(resolved, sort_keys=False))}</pre>
<h2>Metrics</h2><table>{"".join(
        f'<tr><td class="id">{escape(m)}</td><td class="id">{escape(d.get("description", ""))}'
        f"</td></tr>" for m, d in info.items())}</table>
<script type="application/json" id="data">{escape(json.dumps(
        board.to_dict(orient="records"), default=str))}</script>
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
    board, _ = write_leaderboard(root, records, record["name"], primary, reference)
    if not records:
        return [], render_page(root, record, records, board, [])
    suite = resolve_suite(record["resolved"], registry, source=str(root / SUITE_FILE))
    table_plots = evaluator_plots(suite)
    plots = draw_plots(root, records, board, primary, suite, table_plots)
    return plots, render_page(root, record, records, board, plots, table_plots)
