"""The results page (mae_bench/report.py): self-contained, escaped, one row per variant and
the seeds per variant, and working in a real browser."""

import json
import re
import shutil
from html.parser import HTMLParser

import pytest

from tests.conftest import invoke

HOSTILE = '<script>alert(1)</script><img src=x onerror="alert(2)">'


class _Collect(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))


def test_report_writes_a_self_contained_escaped_page(tiny_run_copy):
    # the shared tiny run (seeds 0 and 1) re-run with a hostile description: every cell is
    # finished, the run records the suite as given
    run = tiny_run_copy
    result = invoke("run", str(run.suite), "--out", str(run.out), "--set", f"description={HOSTILE}")
    assert result.exit_code == 0 and "4 of 4 cells already finished" in result.stderr
    root = run.root
    (root / "failed").mkdir()
    (root / "failed" / "vit-seed9-x.log").write_text(f"ValueError: {HOSTILE}\n\ntraceback")
    result = invoke("report", str(root))
    assert result.exit_code == 0, result.output
    page = root / "report.html"
    html = page.read_text()
    assert str(page) in result.stdout and page.stat().st_size < 10 * 2**20
    # hostile text from the suite and from a failure shows as text, runs nothing
    assert "<script>alert" not in html and "onerror=" not in html.replace("onerror=&quot;", "")
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    parser = _Collect()
    parser.feed(html)
    scripts = [a for t, a in parser.tags if t == "script"]
    assert all("src" not in a for a in scripts)  # inline only
    images = [a["src"] for t, a in parser.tags if t == "img"]
    assert images and all(src.startswith("data:image/png;base64,") for src in images)
    assert not re.search(r'(src|href)="(https?:)?//', html)  # nothing fetched at view time
    # the leaderboard: one row per variant, sortable headers, a toggle for all columns
    body = html.split('<table id="leaderboard">')[1].split("</table>")[0]
    assert body.count("<tr>") == 1 + 2 and "data-sort" in body and 'id="toggle"' in html
    # per variant: its components and one row per seed
    sections = re.findall(r'<details class="variant" data-variant="([^"]+)">(.*?)</details>', html,
                          re.S)  # fmt: skip
    assert sorted(name for name, _ in sections) == ["mlp", "vit"]
    assert all(section.count('<tr class="seed">') == 2 for _, section in sections)
    assert all('<img alt="' in section for _, section in sections)  # its curves
    assert "vit-seed9-x" in html and "lp_acc" in html and "Summary" in html


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip


@pytest.mark.skipif(
    CHROMIUM is None, reason="needs Chromium (Debian package `chromium`; .ci/run installs it)"
)
def test_the_page_works_in_a_real_browser(tiny_run_copy, tmp_path):
    playwright = pytest.importorskip("playwright.sync_api", reason="needs playwright")
    run = tiny_run_copy  # seeds 0 and 1; adding the baselines runs their cells alone
    result = invoke("run", str(run.suite), "--out", str(run.out), "--set", "eval.baselines=true")
    assert result.exit_code == 0, result.output
    for cell in run.root.glob("cells/vit-seed*/pretrain.json"):  # as if it had seen the test set
        record = json.loads(cell.read_text())
        record["data"]["pretrain_sees_test"] = True
        cell.write_text(json.dumps(record))
    assert invoke("report", str(run.root)).exit_code == 0
    page_file = run.root / "report.html"
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        errors = []
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(page_file.as_uri())
        page.wait_for_load_state("load")
        assert errors == []
        # the embedded data is JSON the browser parses, one row per variant
        data = page.evaluate("JSON.parse(document.getElementById('data').textContent)")
        assert sorted(row["variant"] for row in data) == [
            "mlp", "random-init-mlp", "random-init-vit", "vit"
        ]  # fmt: skip
        widths = page.eval_on_selector_all("img", "imgs => imgs.map(i => i.naturalWidth)")
        assert widths and all(w > 0 for w in widths)  # every image decoded

        def names():
            return page.eval_on_selector_all(
                "#leaderboard tbody td.variant", "cells => cells.map(c => c.dataset.v)"
            )

        assert sorted(names()) == ["mlp", "random-init-mlp", "random-init-vit", "vit"]
        # clicking a header re-sorts the rows (ascending, then descending)
        header = page.locator("#leaderboard th", has_text="variant")
        header.click()
        assert names() == sorted(names())
        header.click()
        assert names() == sorted(names(), reverse=True)
        # the caveats show without "all columns": the † beside vit and what it means
        leak = page.locator('#leaderboard td.variant[data-v="vit"] .mark', has_text="†")
        assert leak.is_visible() and page.locator("#marks", has_text="†: pretrained").is_visible()
        # the toggle shows every column; expanding a variant shows its seeds
        hidden = page.locator("th.all-only").first
        assert not hidden.is_visible()
        page.locator("#toggle").click()
        assert hidden.is_visible()
        # the widest table scrolls inside its box, the variant column stays in view
        assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
        box = page.locator("#leaderboard").locator("xpath=..")
        assert box.evaluate("b => b.scrollWidth > b.clientWidth")  # all columns: wider
        box.evaluate("b => { b.scrollLeft = b.scrollWidth }")
        left = box.evaluate("b => b.getBoundingClientRect().left")
        cell = page.locator('#leaderboard td.variant[data-v="vit"]')
        assert abs(cell.evaluate("c => c.getBoundingClientRect().left") - left) < 2
        seeds = page.locator('details[data-variant="vit"] tr.seed')
        assert not seeds.first.is_visible()
        page.locator('details[data-variant="vit"] summary').click()
        assert seeds.count() == 2 and seeds.first.is_visible()
        page.screenshot(path=str(tmp_path / "report.png"), full_page=False)
        browser.close()
    assert (tmp_path / "report.png").stat().st_size > 10_000
