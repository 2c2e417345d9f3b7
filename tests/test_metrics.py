"""Metrics against scikit-learn and hand-computed cases; aggregation on known numbers."""

import math

import numpy as np
import pandas as pd
import pytest
import torch
from mae_bench_plugins.probes import knn_classify
from sklearn import metrics as skm

from mae_bench.leaderboard import leaderboard_markdown, leaderboard_table
from mae_bench.metrics import (
    best_thresholds,
    classification_metrics,
    confusion,
    threshold_table,
)


def test_hand_computed_binary_case():
    y = np.array([0, 0, 1, 1])
    probs = np.array([[0.9, 0.1], [0.6, 0.4], [0.65, 0.35], [0.2, 0.8]])
    m = classification_metrics(y, probs, "lp_")
    assert m["lp_acc"] == 0.75
    assert m["lp_recall_macro"] == pytest.approx((1.0 + 0.5) / 2)
    assert m["lp_precision_macro"] == pytest.approx((2 / 3 + 1.0) / 2)
    assert m["lp_auc"] == pytest.approx(0.75)  # the classic roc_auc example
    assert confusion(y, probs) == [[2, 0], [1, 1]]


def test_multiclass_matches_sklearn():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 200)
    logits = rng.normal(size=(200, 4)) + np.eye(4)[y] * 1.5
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    m = classification_metrics(y, probs)
    pred = probs.argmax(1)
    assert m["f1_macro"] == pytest.approx(skm.f1_score(y, pred, average="macro"))
    assert m["precision_macro"] == pytest.approx(skm.precision_score(y, pred, average="macro"))
    assert m["recall_macro"] == pytest.approx(skm.recall_score(y, pred, average="macro"))
    assert m["auc"] == pytest.approx(skm.roc_auc_score(y, probs, multi_class="ovr"))
    assert math.isnan(classification_metrics(np.zeros(5, int), probs[:5])["auc"])


def test_threshold_table_known_example():
    y = np.array([0, 0, 1, 1])
    scores = np.array([0.1, 0.4, 0.35, 0.8])
    table = threshold_table(y, scores, np.array([0.35, 0.5]))
    row = table.iloc[0]
    assert (row.tp, row.fp, row.tn, row.fn) == (2, 1, 1, 0)
    assert row.accuracy == 0.75 and row.precision == pytest.approx(2 / 3)
    assert row.recall == 1.0 and row.specificity == 0.5 and row.f1 == pytest.approx(0.8)
    row = table.iloc[1]
    assert (row.tp, row.fp, row.tn, row.fn) == (1, 0, 2, 1) and row.precision == 1.0
    best = best_thresholds(y, scores)
    assert best["best_f1_threshold"] == 0.35 and best["best_f1"] == pytest.approx(0.8)
    assert best["youden_j"] == pytest.approx(0.5)
    assert best["youden_threshold"] in (0.35, 0.8)


def test_knn_weighted_votes():
    train = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    labels = torch.tensor([0, 0, 1, 1])
    probs = knn_classify(
        train, labels, torch.tensor([[1.0, 0.05], [0.0, 2.0]]), num_classes=2, k=3, temperature=0.1
    )
    assert probs.argmax(1).tolist() == [0, 1]
    assert torch.allclose(probs.sum(1), torch.ones(2))
    assert probs[0, 0] > 0.99  # two near neighbours outvote one far one
    uniform = knn_classify(
        train, labels, torch.tensor([[1.0, 1.0]]), num_classes=2, k=4, temperature=1e6
    )
    assert torch.allclose(uniform, torch.tensor([[0.5, 0.5]]), atol=1e-4)


def _runs(values: dict[str, list[float]]) -> pd.DataFrame:
    rows = []
    for variant, accs in values.items():
        for seed, acc in enumerate(accs):
            rows.append(
                {
                    "variant": variant,
                    "seed": seed,
                    "encoder": "e",
                    "masking": "m",
                    "loss": "l",
                    "lp_acc": acc,
                    "hf_error": 1 - acc,
                }
            )
    return pd.DataFrame(rows)


INFO = {
    "lp_acc": {"higher_is_better": True, "fmt": "{:.3f}", "headline": True},
    "hf_error": {"higher_is_better": False, "fmt": "{:.4f}", "headline": True},
}


def test_aggregation_mean_std_ci_and_ranking():
    board = leaderboard_table(
        _runs({"a": [0.5, 0.6, 0.7], "b": [0.8, 0.81, 0.82], "c": [0.6, 0.7, 0.8]}), info=INFO
    )
    assert board["variant"].tolist() == ["b", "c", "a"] and board["rank"].tolist() == [1, 2, 3]
    a = board.set_index("variant").loc["a"]
    assert a["lp_acc"] == pytest.approx(0.6) and a["lp_acc_std"] == pytest.approx(0.1)
    assert a["lp_acc_ci95"] == pytest.approx(4.302653 * 0.1 / math.sqrt(3), rel=1e-5)
    overlaps = board.set_index("variant")["overlaps_leader"]
    assert overlaps["b"] is True and overlaps["c"] is True  # 0.7 ± 0.248 reaches 0.8
    assert overlaps["a"] is True or overlaps["a"] is False
    lower = leaderboard_table(
        _runs({"a": [0.5, 0.6, 0.7], "b": [0.8, 0.81, 0.82]}), "hf_error", INFO
    )
    assert lower["variant"].tolist() == ["b", "a"]  # lower hf_error ranks first
    single = leaderboard_table(_runs({"a": [0.5], "b": [0.9]}))
    assert math.isnan(single["lp_acc_ci95"].iloc[0]) and pd.isna(single["overlaps_leader"][1])


def test_markdown_bolds_best_and_marks_overlap():
    board = leaderboard_table(
        _runs({"a": [0.5, 0.6, 0.7], "b": [0.8, 0.81, 0.82], "c": [0.6, 0.7, 0.8]}), info=INFO
    )
    md = leaderboard_markdown(board, "t", INFO)
    assert "**0.810 ± 0.010**" in md and "| c ≈" in md and "| b " in md
    assert "**0.1900 ± 0.0100**" in md  # hf_error: lower is best
