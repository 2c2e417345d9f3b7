"""Figures (mae_bench/plots.py): `mae-bench report` regenerates the tables and every plot,
skips what a damaged cell cannot give, and draws a third-party evaluator's own figure."""

import pandas as pd
import pytest
import yaml
from PIL import Image

from mae_bench import EvalResult, Evaluator, Metric, hookimpl
from mae_bench.contract import TablePlot
from mae_bench.plots import plot_compute, plot_leaderboard, plot_loss_curves
from mae_bench.report import render_report
from mae_bench.results import CellStore, read_suite_record, recorded_cells
from mae_bench.runner import run_suite
from mae_bench.suite import load_suite
from tests.conftest import invoke, registry_with


def test_report_regenerates_tables_and_plots(tiny_run_copy):
    root = tiny_run_copy.root
    (root / "leaderboard.csv").unlink()
    result = invoke("report", str(root))
    assert result.exit_code == 0, result.output + str(result.exception)
    plots = {p.name: p.stat().st_size for p in (root / "plots").glob("*.png")}
    assert set(plots) == {
        "loss_curves.png",
        "leaderboard_lp_acc.png",
        "compute.png",
        "reconstructions.png",
        "tsne.png",
        "roc.png",
        "thresholds.png",
        "variant_masks.png",
    }
    assert all(size > 5_000 for size in plots.values())
    assert (root / "leaderboard.csv").is_file()
    with Image.open(root / "plots" / "reconstructions.png") as img:
        assert img.size[0] > 300 and img.size[1] > 200
    assert invoke("report", str(root.parent / "nope")).exit_code == 2
    page = (root / "report.html").read_text()
    assert 'alt="compute"' in page  # the page shows every plot draw_plots returns


def test_report_skips_truncated_weights_and_missing_history(tiny_run_copy):
    root = tiny_run_copy.root
    cells = tiny_run_copy.cells()
    weights = cells["vit-seed0"] / "encoder.safetensors"
    weights.write_bytes(weights.read_bytes()[:50])
    (cells["mlp-seed0"] / "history.csv").unlink()
    result = invoke("report", str(root))
    assert result.exit_code == 0, result.output
    assert f"warning: damaged result {weights}" in result.stderr  # left out, seed 1 drawn
    assert f"{cells['mlp-seed0'] / 'history.csv'}: no loss history: skipped" in result.stderr
    assert (root / "plots" / "reconstructions.png").is_file()  # from the intact cells


def test_a_third_party_evaluator_draws_its_own_plot(tiny_run_copy):
    """An evaluator shipped by another package contributes a figure of its own table (in
    plots/, on the page and in each variant's section) with no change to the core."""
    seen = {}

    class NormPlot(TablePlot):
        name = "feature_norms"
        table = "norms"
        title = "frozen feature norms"
        seeds = "all"
        variant_panel = True

        def draw(self, ax, tables, **also):
            seen["tables"] = tables
            for name, table in tables.items():
                ax.hist(table["norm"], bins=10, alpha=0.5, label=name)
            ax.legend()

        def draw_variant(self, ax, table):
            seen.setdefault("variants", []).append(sorted(table["seed"].unique()))
            ax.hist(table["norm"], bins=10)

    class NormEvaluator(Evaluator):
        name = "norms"

        def metrics(self):
            return {"norm_mean": Metric("mean norm of the frozen test features")}

        def evaluate(self, ctx):
            norms = ctx.features.get("mean")[1].norm(dim=1).numpy()
            table = pd.DataFrame({"norm": norms})
            return EvalResult({"norm_mean": float(norms.mean())}, {"norms": table})

        def plots(self):
            return [NormPlot()]

    class Package:
        @staticmethod
        @hookimpl
        def register_evaluators(register):
            register(NormEvaluator)

    registry = registry_with(Package, "norms")
    # the shared tiny run (seeds 0 and 1) with this evaluator added: it alone runs
    suite_file = tiny_run_copy.suite
    data = yaml.safe_load(suite_file.read_text())
    data["eval"] = {**data["eval"], "norms": {}}
    suite_file.write_text(yaml.safe_dump(data, sort_keys=False))
    summary = run_suite(load_suite(suite_file, registry), tiny_run_copy.out, "cpu")
    assert not summary.failed
    root = tiny_run_copy.root
    assert len(list(root.glob("cells/*/evals/norms-*/norms.csv"))) == 4
    plots, page = render_report(root, registry)
    drawn = root / "plots" / "feature_norms.png"
    assert drawn in plots and drawn.stat().st_size > 5_000
    assert sorted(seen["tables"]) == ["mlp", "vit"]  # every variant, each seed stacked
    assert all(sorted(t["seed"].unique()) == [0, 1] for t in seen["tables"].values())
    assert seen["variants"] == [[0, 1], [0, 1]]  # a panel in each variant's section
    assert 'alt="feature_norms"' in page.read_text()


def _drawn(monkeypatch) -> list:
    """The figures plots.py saves from now on (still open, for inspection)."""
    import mae_bench.plots

    figures = []
    monkeypatch.setattr(mae_bench.plots, "save_figure", lambda fig, path: figures.append(fig))
    return figures


def test_intervals_drawn_stay_inside_the_metrics_range(monkeypatch, tmp_path):
    """An accuracy of 0.95 ± 0.17 (three seeds) is drawn up to 1, not to 1.12."""
    figures = _drawn(monkeypatch)
    board = pd.DataFrame({"variant": ["a", "b"], "acc": [0.95, 0.04], "acc_ci95": [0.17, 0.1]})
    plot_leaderboard(board, "acc", tmp_path, bounds=(0, 1))
    (segments,) = [c.get_segments() for c in figures[0].axes[0].collections if c.get_segments()]
    ends = sorted(x for segment in segments for x, _ in segment)
    assert ends == pytest.approx([0.0, 0.14, 0.78, 1.0])
    plot_leaderboard(board, "acc", tmp_path)  # no declared range: drawn as computed
    (segments,) = [c.get_segments() for c in figures[1].axes[0].collections if c.get_segments()]
    assert max(x for segment in segments for x, _ in segment) == pytest.approx(1.12)


def test_the_loss_plot_draws_each_term_not_their_sum(tiny_run, monkeypatch, tmp_path):
    """mlp minimises mse, vit mse + 0.1 laplacian + 0.01 uniformity: their weighted sums are
    different objectives. One panel per term, each variant that has it, unweighted."""
    figures = _drawn(monkeypatch)
    root = tiny_run.root
    records = list(
        CellStore(root).finished(recorded_cells(read_suite_record(root)), repair=False).values()
    )
    plot_loss_curves(records, CellStore(root), tmp_path)
    axes = figures[0].axes
    assert [ax.get_title() for ax in axes] == ["mse", "laplacian", "uniformity"]
    assert sorted(
        line.get_label() for line in axes[0].get_lines() if line.get_label()[0] != "_"
    ) == ["mlp", "vit"]
    assert [line.get_label() for line in axes[1].get_lines() if line.get_label()[0] != "_"] == [
        "vit"
    ]
    history = (
        pd.concat(pd.read_csv(path) for path in sorted(root.glob("cells/vit-*/history.csv")))
        .groupby("epoch")["uniformity"]
        .mean()
    )
    (line,) = [line for line in axes[2].get_lines() if line.get_label() == "vit"]
    assert list(line.get_ydata()) == pytest.approx(history.tolist())  # mean over seeds, unweighted


def test_headline_metrics_are_drawn_against_pretraining_compute(monkeypatch, tmp_path):
    """One panel per headline metric (the primary first; the runner's own costs are not
    results), x = pretrain_tflops on a log scale, one labelled point per pretrained variant
    with its interval inside the metric's range; a no-pretraining row has no compute."""
    figures = _drawn(monkeypatch)
    board = pd.DataFrame(
        {
            "variant": ["mae", "simmim", "random-init"],
            "pretrain_tflops": [0.5, 1.6, float("nan")],
            "acc": [0.95, 0.9, 0.3],
            "acc_ci95": [0.17, 0.02, 0.01],
            "psnr": [11.0, 12.0, float("nan")],
            "pretrain_s": [3.0, 9.0, float("nan")],
        }
    )
    info = {
        "acc": {"headline": True, "bounds": [0, 1]},
        "psnr": {"headline": True, "higher_is_better": True, "bounds": [None, None]},
        "not_shown": {"headline": False},
        "pretrain_s": {"headline": True},
    }
    plot_compute(board, info, "psnr", tmp_path)
    (figure,) = figures
    axes = figure.axes
    assert [ax.get_title() for ax in axes] == ["psnr (higher is better)", "acc (higher is better)"]
    acc = axes[1]
    assert acc.get_xscale() == "log" and "TFLOPs" in acc.get_xlabel()
    assert [text.get_text() for text in acc.texts] == ["mae", "simmim"]
    points = [line.get_xydata().tolist() for line in acc.get_lines() if line.get_marker() == "o"]
    assert points == [[[0.5, 0.95]], [[1.6, 0.9]]]
    tops = [max(y for _, y in seg) for c in acc.collections for seg in c.get_segments()]
    assert max(tops) == pytest.approx(1.0)  # 0.95 + 0.17 drawn up to 1
    assert plot_compute(board.drop(columns="pretrain_tflops"), info, "psnr", tmp_path) is None
    assert len(figures) == 1  # nothing drawn without compute
