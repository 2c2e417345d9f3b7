"""Classification and threshold metrics (mae_bench/metrics.py) against scikit-learn and
hand-computed cases."""

import math
import warnings

import numpy as np
import pytest
from sklearn import metrics as skm

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


def test_binary_threshold_search_emits_no_runtime_warning():
    y = np.array([0, 0, 1, 1, 0, 1])
    scores = np.array([0.9, 0.8, 0.1, 0.2, 0.7, 0.3])  # worst ranking: F1 is 0/0 somewhere
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        best = best_thresholds(y, scores)
    assert 0 <= best["best_f1"] <= 1


def test_macro_averages_run_over_the_classes_in_the_test_set():
    """Three classes, class 2 absent from the test set, every prediction right: 1.0, not
    the 0.667 of counting the absent class as zero."""
    y = np.array([0, 0, 1, 1])
    probs = np.array([[0.8, 0.1, 0.1], [0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.2, 0.7, 0.1]])
    m = classification_metrics(y, probs)
    assert m["f1_macro"] == m["precision_macro"] == m["recall_macro"] == 1.0
    # predicting the absent class is still an error of the true class
    wrong = probs.copy()
    wrong[3] = [0.1, 0.2, 0.7]
    m = classification_metrics(y, wrong)
    assert m["recall_macro"] == pytest.approx((1.0 + 0.5) / 2)
    assert m["f1_macro"] == pytest.approx(skm.f1_score(y, wrong.argmax(1), labels=[0, 1],
                                                       average="macro"))  # fmt: skip


def test_auc_is_defined_when_a_row_gives_every_present_class_zero():
    """Sparse k-NN probabilities: image 4's neighbours are all of class 3, absent from the
    test set; the row scores the present classes equally instead of failing the cell."""
    y = np.array([0, 1, 2, 0, 1])
    probs = np.array(
        [[1.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, 1.0, 0], [0.6, 0.4, 0, 0], [0, 0, 0, 1.0]]
    )
    auc = classification_metrics(y, probs)["auc"]
    uniform = probs[:, :3].copy()
    uniform[4] = 1 / 3
    assert auc == pytest.approx(skm.roc_auc_score(y, uniform, multi_class="ovr"))
    binary = classification_metrics(np.array([0, 2, 0]), probs[[0, 2, 4]])["auc"]
    assert binary == pytest.approx(skm.roc_auc_score([0, 1, 0], [0.0, 1.0, 0.5]))
