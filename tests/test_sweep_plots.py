"""Parameter sweeps in the report (issue 19): one figure per swept path (each headline metric
against the swept value, a line per family, the 95% interval over seeds), the leaderboard's
bar chart in the order of the swept values, and the swept values on the page. Synthetic
leaderboards only: no training."""

from __future__ import annotations

import re

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from PIL import Image

import mae_bench.plots
from mae_bench.plots import plot_leaderboard, plot_sweeps, sweep_figure, sweep_order
from mae_bench.report import _leaderboard_html, render_page

NAN = float("nan")

INFO = {
    "acc": {"headline": True, "bounds": [0, 1], "fmt": "{:.3f}", "description": "accuracy"},
    "loss_x": {"headline": False},  # not a headline metric: no panel
    "psnr": {"headline": True, "higher_is_better": True, "fmt": "{:.2f}"},
    "absent": {"headline": True},  # not on the board: no panel
}

ROWS = [
    # variant, family, masking.ratio, encoder.decoder_depth, masking.name, acc, acc_ci95, psnr
    ("vit-mae-ratio0.75", "vit-mae", 0.75, NAN, NAN, 0.90, 0.20, 10.0),  # interval cut at 1
    ("vit-mae-ratio0.5", "vit-mae", 0.5, NAN, NAN, 0.85, 0.01, 11.0),
    ("simmim", NAN, NAN, NAN, NAN, 0.80, 0.02, 12.0),  # not a sweep point
    ("grid-name_block", "grid", NAN, NAN, "block", 0.79, 0.03, 13.0),
    ("vit-mae-ratio0.9", "vit-mae", 0.9, NAN, NAN, 0.78, 0.02, 14.0),
    ("vit-mae-ratio0.6", "vit-mae", 0.6, NAN, NAN, 0.77, NAN, 15.0),  # one seed: no interval
    ("prod-ratio0.75-depth2", "prod", 0.75, 2.0, NAN, 0.72, NAN, 16.0),  # a product, 1 seed
    ("prod-ratio0.5-depth4", "prod", 0.5, 4.0, NAN, 0.71, NAN, 17.0),
    ("prod-ratio0.5-depth2", "prod", 0.5, 2.0, NAN, 0.70, NAN, 18.0),
    ("prod-ratio0.75-depth4", "prod", 0.75, 4.0, NAN, 0.69, NAN, 19.0),
    ("grid-name_random", "grid", NAN, NAN, "random", 0.60, 0.70, 20.0),  # cut at 0 and 1
    ("scratch-vit", NAN, NAN, NAN, NAN, 0.30, 0.01, NAN),  # a baseline
]


def _board(attrs: bool = False) -> pd.DataFrame:
    """A ranked leaderboard with two numeric sweeps (one a product with a second path), a
    categorical sweep, an unswept variant and a baseline."""
    columns = [
        "variant", "sweep_family", "masking.ratio", "encoder.decoder_depth", "masking.name",
        "acc", "acc_ci95", "psnr",
    ]  # fmt: skip
    board = pd.DataFrame(ROWS, columns=columns)
    board.insert(1, "rank", pd.array(range(1, len(board) + 1), dtype="Int64"))
    board.insert(3, "encoder", "vit")
    board["seeds"] = [3, 3, 3, 3, 3, 1, 1, 1, 1, 1, 3, 3]
    board["acc_std"] = board["acc_ci95"] / 2
    board["acc_seeds"] = board["seeds"]
    board["masking.name"] = board["masking.name"].astype(object)
    if attrs:
        board.attrs["sweep_paths"] = ["masking.ratio", "encoder.decoder_depth", "masking.name"]
    return board


def _row(board: pd.DataFrame, variant: str) -> pd.Series:
    return board.set_index("variant").loc[variant]


def _labelled(ax) -> list:
    return [line for line in ax.get_lines() if not line.get_label().startswith("_")]


def _band(collection) -> dict[float, tuple[float, float]]:
    """Per x, the lowest and highest y of a fill_between band."""
    ends: dict[float, list[float]] = {}
    for path in collection.get_paths():
        for x, y in path.vertices:
            ends.setdefault(round(float(x), 9), []).append(float(y))
    return {x: (min(ys), max(ys)) for x, ys in ends.items()}


@pytest.fixture
def close_figures():
    yield
    plt.close("all")


@pytest.mark.parametrize("attrs", [False, True])
def test_each_swept_path_gets_a_png(tmp_path, attrs):
    open_before = set(plt.get_fignums())  # another test's figures are not ours to judge
    written = plot_sweeps(_board(attrs), INFO, "acc", tmp_path)
    assert [p.name for p in written] == [
        "sweep_masking.ratio.png",
        "sweep_encoder.decoder_depth.png",
        "sweep_masking.name.png",
    ]
    for path in written:
        assert path.parent == tmp_path and path.stat().st_size > 5_000
        with Image.open(path) as image:
            image.verify()
            assert image.format == "PNG"
    assert set(plt.get_fignums()) <= open_before  # every figure it opened is closed


def test_no_sweeps_no_figures(tmp_path):
    plain = _board().drop(columns=["sweep_family", "masking.ratio", "encoder.decoder_depth"])
    plain = plain.drop(columns="masking.name")
    assert plot_sweeps(plain, INFO, "acc", tmp_path) == []
    declared_none = _board()
    declared_none.attrs["sweep_paths"] = []  # the board says: no sweeps
    assert plot_sweeps(declared_none, INFO, "acc", tmp_path) == []
    only_one = _board()
    only_one.attrs["sweep_paths"] = ["masking.name", "not.a.column"]
    assert [p.name for p in plot_sweeps(only_one, INFO, "acc", tmp_path)] == [
        "sweep_masking.name.png"
    ]
    assert [p.name for p in tmp_path.iterdir()] == ["sweep_masking.name.png"]


def test_a_numeric_sweep_is_drawn_by_value_with_its_interval(close_figures):
    board = _board()
    fig = sweep_figure(board, INFO, "acc", "masking.ratio")
    acc, psnr = fig.axes  # the primary first, then the headline metrics with values
    assert [ax.get_title() for ax in fig.axes] == [
        "acc (higher is better)",
        "psnr (higher is better)",
    ]
    assert (acc.get_xlabel(), acc.get_ylabel()) == ("masking.ratio", "acc")
    lines = _labelled(acc)
    assert [line.get_label() for line in lines] == [
        "vit-mae",
        "prod (encoder.decoder_depth=2)",
        "prod (encoder.decoder_depth=4)",
    ]
    assert acc.get_legend() is not None
    vit = lines[0]
    assert list(vit.get_xdata()) == [0.5, 0.6, 0.75, 0.9]  # sorted by value, not by rank
    means = [_row(board, f"vit-mae-ratio{r}")["acc"] for r in ("0.5", "0.6", "0.75", "0.9")]
    assert list(vit.get_ydata()) == pytest.approx(means)
    assert vit.get_marker() == "o"
    assert list(lines[1].get_xdata()) == [0.5, 0.75]
    assert list(lines[1].get_ydata()) == pytest.approx([0.70, 0.72])
    assert list(lines[2].get_ydata()) == pytest.approx([0.71, 0.69])
    # one band: vit-mae's (prod has one seed a point: no interval)
    (band,) = acc.collections
    assert _band(band) == {
        0.5: pytest.approx((0.84, 0.86)),
        0.75: pytest.approx((0.70, 1.0)),  # 0.9 + 0.2 drawn up to the accuracy's bound
        0.9: pytest.approx((0.76, 0.80)),
    }  # and none at 0.6, its one seed
    assert not psnr.collections  # no interval stored for psnr
    assert [t.get_text() for t in acc.get_xticklabels()] == ["0.5", "0.6", "0.75", "0.9"]


def test_a_product_draws_a_line_per_value_of_the_other_path(close_figures):
    fig = sweep_figure(_board(), INFO, "acc", "encoder.decoder_depth")
    acc = fig.axes[0]
    lines = _labelled(acc)
    assert [line.get_label() for line in lines] == [
        "prod (masking.ratio=0.5)",
        "prod (masking.ratio=0.75)",
    ]
    assert [list(line.get_xdata()) for line in lines] == [[2.0, 4.0], [2.0, 4.0]]
    assert [list(line.get_ydata()) for line in lines] == [[0.70, 0.71], [0.72, 0.69]]
    assert [t.get_text() for t in acc.get_xticklabels()] == ["2", "4"]  # as written
    assert not acc.collections  # one seed each


def test_paths_swept_together_share_a_line(close_figures):
    """A ``zip`` group moves its paths together: one line along each, not one per point."""
    board = _board()
    zipped = board["sweep_family"] == "vit-mae"
    board.loc[zipped, "encoder.decoder_depth"] = board.loc[zipped, "masking.ratio"] * 10
    for path, xs in (
        ("masking.ratio", [0.5, 0.6, 0.75, 0.9]),
        ("encoder.decoder_depth", [5, 6, 7.5, 9]),
    ):
        first = _labelled(sweep_figure(board, INFO, "acc", path).axes[0])[0]
        assert first.get_label() == "vit-mae"
        assert list(first.get_xdata()) == pytest.approx(xs)


def test_a_categorical_sweep_is_drawn_as_points_with_error_bars(close_figures):
    board = _board()
    fig = sweep_figure(board, INFO, "acc", "masking.name")
    acc, psnr = fig.axes
    assert [t.get_text() for t in acc.get_xticklabels()] == ["block", "random"]  # as they come
    assert acc.get_xlabel() == "masking.name"
    (container,) = acc.containers  # one errorbar per line
    points = container.lines[0]
    assert container.get_label() == "grid" and points.get_linestyle() == "None"
    assert list(points.get_xdata()) == [0, 1]
    assert list(points.get_ydata()) == pytest.approx([0.79, 0.60])
    assert acc.get_legend() is None  # one line
    (bars,) = [c for c in acc.collections if c.get_segments()]
    spans = sorted((min(y for _, y in s), max(y for _, y in s)) for s in bars.get_segments())
    assert spans == [pytest.approx((0.0, 1.0)), pytest.approx((0.76, 0.82))]  # 0.6 ± 0.7 cut
    assert not [c for c in psnr.collections if c.get_segments()]  # no interval: no bars


def test_the_bar_chart_reads_a_sweep_in_order_of_its_values(monkeypatch, tmp_path):
    figures = []
    monkeypatch.setattr(mae_bench.plots, "save_figure", lambda fig, path: figures.append(fig))
    board = _board()
    plot_leaderboard(board, "acc", tmp_path, bounds=(0, 1))
    order = [
        "vit-mae-ratio0.5", "vit-mae-ratio0.6", "vit-mae-ratio0.75", "vit-mae-ratio0.9",
        "simmim",
        "grid-name_block", "grid-name_random",
        "prod-ratio0.5-depth2", "prod-ratio0.5-depth4",
        "prod-ratio0.75-depth2", "prod-ratio0.75-depth4",
        "scratch-vit",
    ]  # fmt: skip
    ax = figures[0].axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == order
    widths = [bar.get_width() for bar in ax.patches]
    assert widths == pytest.approx([_row(board, v)["acc"] for v in order])
    assert list(sweep_order(board)["variant"]) == order
    assert list(board["variant"]) == [r[0] for r in ROWS]  # the board itself untouched
    plain = board.drop(columns=["sweep_family", "masking.ratio", "encoder.decoder_depth"])
    plot_leaderboard(plain.drop(columns="masking.name"), "acc", tmp_path)
    ranked = [t.get_text() for t in figures[1].axes[0].get_yticklabels()]
    assert ranked == [r[0] for r in ROWS]  # no sweeps: by rank, as before


def _cells(table: str) -> tuple[list[str], dict[str, dict[str, str]]]:
    """The leaderboard's headers, and its cells as text by variant and header."""
    text = lambda cell: re.sub(r"<[^>]+>", "", cell).strip()  # noqa: E731
    headers = [text(h) for h in re.findall(r"<th[^>]*>(.*?)</th>", table, re.S)]
    rows = {}
    for row in re.findall(r"<tr>(.*?)</tr>", table.split("<tbody>")[1], re.S):
        cells = [text(c) for c in re.findall(r"<td[^>]*>(.*?)</td>", row, re.S)]
        rows[cells[headers.index("variant")].split(" ")[0]] = dict(zip(headers, cells, strict=True))
    return headers, rows


def test_the_page_shows_the_swept_values_beside_the_names(tmp_path):
    board = _board()
    headers, rows = _cells(_leaderboard_html(board, "acc", INFO))
    assert headers[:7] == [
        "rank", "variant", "encoder", "masking.ratio", "encoder.decoder_depth", "masking.name",
        "seeds",
    ]  # fmt: skip
    swept = ("masking.ratio", "encoder.decoder_depth", "masking.name")
    assert [rows["vit-mae-ratio0.5"][c] for c in swept] == ["0.5", "", ""]
    assert [rows["prod-ratio0.75-depth4"][c] for c in swept] == ["0.75", "4", ""]
    assert [rows["grid-name_random"][c] for c in swept] == ["", "", "random"]
    assert [rows["simmim"][c] for c in swept] == ["", "", ""]
    assert rows["vit-mae-ratio0.5"]["acc"] == "0.850 ± 0.005"

    plots = plot_sweeps(board, INFO, "acc", tmp_path / "plots")
    suite = {"name": "sweeps", "resolved": {"primary_metric": "acc", "seeds": [0, 1, 2]}}
    page = render_page(tmp_path, suite, [], board, plots).read_text()
    for name in ("masking.ratio", "encoder.decoder_depth", "masking.name"):
        assert f'alt="sweep_{name}"' in page  # each sweep figure on the page
    assert '<th class="sweep"' in page and '<td class="sweep" data-v="0.75">0.75</td>' in page
    assert re.search(r'<td class="id">masking\.ratio</td><td class="id">a setting', page)


def test_float_values_are_shown_as_written():
    from mae_bench.leaderboard import sweep_texts

    values = pd.Series([0.5, NAN, 1.0, 1e-4, 0.3333333333333333])
    assert list(sweep_texts(values)) == ["0.5", "", "1.0", "0.0001", "0.3333333333333333"]
    assert list(sweep_texts(pd.Series([2.0, NAN, 4.0]))) == ["2", "", "4"]  # a CSV's ints
    assert list(sweep_texts(pd.Series([True, NAN, False], dtype=object))) == ["True", "", "False"]
    assert list(sweep_texts(pd.Series(np.array([1, 3])))) == ["1", "3"]


def _drawn_lines(ax) -> list[tuple[str, list, list]]:
    return [(ln.get_label(), list(ln.get_xdata()), list(ln.get_ydata())) for ln in _labelled(ax)]


def test_a_board_of_python_values_draws_the_same(close_figures):
    """The leaderboard as built from the records: each swept value as stored (int, float,
    str) in an object column, None where a variant does not sweep the path."""
    board = _board()
    swept = ["sweep_family", "masking.ratio", "encoder.decoder_depth", "masking.name"]
    for column in swept:
        plain = [None if pd.isna(v) else v for v in board[column]]
        if column == "encoder.decoder_depth":
            plain = [None if v is None else int(v) for v in plain]
        board[column] = pd.Series(plain, index=board.index, dtype=object)
    assert board["encoder.decoder_depth"].iloc[6] == 2 and board["masking.ratio"].iloc[2] is None
    board.attrs["sweep_paths"] = swept[1:]
    for path in swept[1:]:
        drawn = sweep_figure(board, INFO, "acc", path).axes[0]
        expected = sweep_figure(_board(), INFO, "acc", path).axes[0]
        assert _drawn_lines(drawn) == _drawn_lines(expected)
        assert [t.get_text() for t in drawn.get_xticklabels()] == [
            t.get_text() for t in expected.get_xticklabels()
        ]
        assert len(drawn.collections) == len(expected.collections)
    assert list(sweep_order(board)["variant"]) == list(sweep_order(_board())["variant"])
    _, rows = _cells(_leaderboard_html(board, "acc", INFO))
    assert rows["prod-ratio0.75-depth4"]["encoder.decoder_depth"] == "4"
    assert rows["prod-ratio0.75-depth4"]["masking.ratio"] == "0.75"
    assert rows["simmim"]["masking.ratio"] == ""


def test_a_list_valued_sweep_is_drawn_as_categories(tmp_path, close_figures):
    board = _board().drop(columns=["masking.name"])
    board["encoder.patch_size"] = pd.Series(
        [None, None, None, [4, 4], None, None, None, None, None, None, [2, 2], None], dtype=object
    )
    board.attrs["sweep_paths"] = ["masking.ratio", "encoder.patch_size"]
    fig = sweep_figure(board, INFO, "acc", "encoder.patch_size")
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["[4, 4]", "[2, 2]"]
    assert sweep_order(board)["variant"].tolist()[5:7] == ["grid-name_block", "grid-name_random"]
    _, rows = _cells(_leaderboard_html(board, "acc", INFO))
    assert rows["grid-name_random"]["encoder.patch_size"] == "[2, 2]"
