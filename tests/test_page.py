"""What the results page (mae_bench/report.py) claims: every caveat the Markdown leaderboard
shows (†, ‡, never learned, too few seeds), how each comparison figure was produced, each
evaluator's sanity facts and warnings, and embedded data a browser's ``JSON.parse`` reads."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd

from mae_bench.report import embedded_json, summary_paragraph
from tests.conftest import invoke, make_component

SANITY = {
    "n_train": 128,
    "n_test": 64,
    "chance": 0.25,
    "resolution": 1 / 64,
    "warnings": ["lp_acc: 64 test images cannot separate variants closer than 0.05"],
}


def _finetune_info(registry) -> dict[str, dict]:
    metrics = make_component(registry, "evaluator", "finetune").metrics()
    return {name: metric.as_dict() for name, metric in metrics.items()}


def _board(**columns) -> pd.DataFrame:
    base = {
        "variant": ["vit", "mlp", "scratch-vit", "scratch-mlp"],
        "seeds": [2, 2, 2, 1],
        "ft_acc": [0.80, 0.78, 0.769, 0.25],
        "ft_converged": [1.0, 1.0, 0.5, 1.0],
        "ft_learned": [1.0, 1.0, 1.0, 0.0],
        "pretrain_sees_test": [False, True, False, False],
        "verdict": ["reference", "inconclusive", "inconclusive", "inconclusive"],
    }
    board = pd.DataFrame({**base, **columns})
    board.insert(1, "rank", range(1, len(board) + 1))
    return board


def test_the_summary_carries_every_caveat_that_applies(registry):
    info = _finetune_info(registry)
    text = summary_paragraph(_board(), "ft_acc", info, planned_seeds=2)
    # the gap sentence names the best from-scratch run with its mark
    assert re.search(r"above the best from-scratch run \(scratch-vit ‡\)", text), text
    # each mark's meaning and the variants it applies to
    assert "‡: fine-tuning still improving" in text and "not converged" in text
    assert "‡‡: fine-tuning never beat the majority class" in text and "scratch-mlp" in text
    assert "†: pretrained on the test images too" in text and "mlp" in text
    # too few seeds for a verdict, and fewer seeds than planned
    assert "no verdict can be reached" in text and "at least" in text
    assert "scratch-mlp has 1 of the 2 planned seeds" in text and "vit has" not in text
    partial = summary_paragraph(_board(ft_acc_seeds=[2, 1, 2, 1]), "ft_acc", info, planned_seeds=2)
    assert "mlp's ft_acc is over 1 of its 2 seeds" in partial  # a NaN seed
    assert "scratch-mlp's" not in partial  # its one seed has a value
    # nothing to say when nothing applies
    clean = _board(
        ft_converged=[1.0] * 4, ft_learned=[1.0] * 4, pretrain_sees_test=[False] * 4,
        seeds=[9] * 4,
    )  # fmt: skip
    quiet = summary_paragraph(clean, "ft_acc", info, planned_seeds=9)
    assert "‡" not in quiet and "†" not in quiet and "no verdict" not in quiet
    assert "planned seeds" not in quiet


def test_embedded_json_is_valid_and_cannot_end_the_script_element():
    data = [{"variant": "</script><script>alert(1)</script>", "x": float("nan"), "y": 1.5,
             "s": "a\u2028b\u2029c", "ok": True}]  # fmt: skip
    text = embedded_json(data)
    assert "<" not in text and "\u2028" not in text and "\u2029" not in text
    assert "NaN" not in text and "&quot;" not in text

    def refuse(constant):
        raise ValueError(constant)

    parsed = json.loads(text, parse_constant=refuse)
    assert parsed == [{**data[0], "x": None}]


def _edit(path: Path, change) -> None:
    record = json.loads(path.read_text())
    change(record)
    path.write_text(json.dumps(record, indent=2, sort_keys=True))


def _marked_run(run, registry):
    """The shared tiny run with: mlp's fine-tuning not converged (its linear probe's result
    carrying the flag metric), its seed 1's lp_f1_macro NaN and these sanity facts and warning;
    vit pretrained on the test images, its reconstruction stored before sanity facts were."""
    info = _finetune_info(registry)
    for name, cell in run.cells().items():
        (probe,) = cell.glob("evals/linear_probe-*/result.json")
        (recon,) = cell.glob("evals/reconstruction-*/result.json")
        if name.startswith("mlp"):

            def flagged(record):
                record["metrics"]["ft_converged"] = 0.0
                record["info"]["ft_converged"] = info["ft_converged"]
                record["metric_order"].append("ft_converged")
                record["sanity"] = SANITY

            _edit(probe, flagged)
            if name == "mlp-seed1":  # a NaN seed: mlp's lp_f1_macro is over 1 of 2
                _edit(probe, lambda r: r["metrics"].update(lp_f1_macro=None))
        else:
            _edit(cell / "pretrain.json", lambda r: r["data"].update(pretrain_sees_test=True))
            _edit(recon, lambda r: r.pop("sanity", None))


def _text(cell: str) -> str:
    return re.sub(r"<[^>]+>", "", cell).strip()


def _columns(board: str) -> dict[str, dict[str, str]]:
    """The leaderboard's cells as text, by variant and column header."""
    headers = [_text(h) for h in re.findall(r"<th[^>]*>(.*?)</th>", board, re.S)]
    out = {}
    for row in re.findall(r"<tr>(.*?)</tr>", board.split("<tbody>")[1], re.S):
        cells = [_text(c) for c in re.findall(r"<td[^>]*>(.*?)</td>", row, re.S)]
        named = dict(zip(headers, cells, strict=True))
        out[re.search(r'data-v="([^"]+)"', row.split('class="id variant"')[1]).group(1)] = named
    return out


def _tag(html: str, tag: str, attribute: str, value: str) -> str:
    """The element ``<tag ... attribute="value" ...>...</tag>`` (not nested in its kind)."""
    match = re.search(rf'<{tag}[^>]*{attribute}="{value}"[^>]*>(.*?)</{tag}>', html, re.S)
    assert match, f"no <{tag} {attribute}={value!r}>"
    return match.group(0)


def test_the_page_shows_marks_comparisons_sanity_and_valid_data(tiny_run_copy, registry):
    run = tiny_run_copy
    _marked_run(run, registry)
    result = invoke("report", str(run.root))
    assert result.exit_code == 0, result.output
    html = (run.root / "report.html").read_text()

    # the marks sit in the variant cell (always shown), their meaning below the table
    board = html.split('<table id="leaderboard">')[1].split("</table>")[0]
    cells = dict(re.findall(r'<td class="id variant" data-v="([^"]+)">(.*?)</td>', board))
    assert "‡" in cells["mlp"] and "†" not in cells["mlp"]
    assert "†" in cells["vit"] and "‡" not in cells["vit"]
    assert _columns(board)["mlp"]["lp_f1_macro"].endswith(" (1/2)")  # as the Markdown shows it
    notes = _tag(html, "p", "id", "marks")
    assert "(k/n): only k of the variant&#x27;s n seeds have a value" in notes
    assert "‡: fine-tuning still improving" in notes and "(ft_converged &lt; 1)" in notes
    assert "†: pretrained on the test images too" in notes and "all-only" not in notes
    summary = _tag(html, "p", "id", "summary")
    assert "‡" in summary and "†" in summary and "no verdict can be reached" in summary
    told = re.search(r"(\d+) sanity warnings? about the evaluations", summary)
    assert told, summary

    # each comparison column says in a tooltip and in the glossary how it was produced
    for column, words in {
        "verdict": ("Student-t", "Wilcoxon", "Holm"),
        "delta": ("Student-t", "paired"),
        "prob_improve": ("seed pairs",),
        "p_value": ("Wilcoxon", "Holm"),
    }.items():
        header = re.search(rf'<th title="([^"]*)"[^>]*>{column}</th>', board)
        assert header and all(w in header.group(1) for w in words), column
        glossary = re.search(rf'<tr><td class="id">{column}</td><td[^>]*>([^<]*)</td>', html)
        assert glossary and all(w in glossary.group(1) for w in words), column
    # the delta cell shows its interval, as the Markdown does
    assert re.search(r"[-+]\d\.\d+ \[[-+]\d\.\d+, [-+]\d\.\d+\]", board)

    # sanity: one line per evaluator, its warnings prominent; older results tolerated
    checks = _tag(html, "section", "id", "checks")
    probe = _tag(checks, "tr", "data-evaluator", "linear_probe")
    assert "n_test" in probe and "64" in probe and "chance" in probe and "0.25" in probe
    assert "resolution" in probe and "0.01562" in probe
    warnings = _tag(checks, "ul", "class", "warnings")
    assert SANITY["warnings"][0] in warnings and "mlp seed 0, mlp seed 1" in warnings
    assert warnings.count("<li>") == int(told.group(1))  # the summary counts them all
    recon = _tag(checks, "tr", "data-evaluator", "reconstruction")
    assert "no sanity facts stored for vit seed 0, vit seed 1" in recon  # stored before them

    # the embedded data is JSON a browser parses: no bare NaN, nothing HTML-escaped
    data = re.search(r'<script type="application/json" id="data">(.*?)</script>', html, re.S)
    rows = json.loads(data.group(1), parse_constant=lambda c: pytest_fail(c))
    assert sorted(r["variant"] for r in rows) == ["mlp", "vit"]
    # the widest table scrolls with the variant column fixed
    assert re.search(r"\.variant\{[^}]*position:sticky;left:0", html)


def pytest_fail(constant: str):
    raise AssertionError(f"bare {constant} in the embedded data")
