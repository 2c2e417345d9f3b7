"""The self-contained results page: offline, escaped, one row per variant, seeds per variant."""

import re
from html.parser import HTMLParser

import yaml

from tests.conftest import invoke, tiny_suite_data

HOSTILE = '<script>alert(1)</script><img src=x onerror="alert(2)">'


class _Collect(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))


def test_report_writes_a_self_contained_escaped_page(tmp_path):
    data = tiny_suite_data(description=HOSTILE, seeds=[0, 1])
    suite = tmp_path / "s.yaml"
    suite.write_text(yaml.safe_dump(data))
    out = tmp_path / "out"
    assert invoke("run", str(suite), "--out", str(out)).exit_code == 0
    root = out / "tiny"
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
    assert "vit-seed9-x" in html and "lp_acc" in html and "Summary" in html
