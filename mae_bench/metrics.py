"""Classification metrics and threshold analysis (scikit-learn where it has them), and the
declarations of the metrics the core itself reports.

scikit-learn is imported by the functions that compute with it: a suite is read and
validated without loading it."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from mae_bench.contract import Metric

if TYPE_CHECKING:
    import torch

    from mae_bench.contract import ImageData

DEFAULT_PRIMARY_METRIC = "lp_acc"
"""What a suite ranks its variants by unless it sets ``primary_metric``."""
THRESHOLDS_TABLE = "thresholds"
"""A classifier's threshold table (:func:`threshold_analysis`), as evaluators store it."""
UNIT_INTERVAL = (0.0, 1.0)
"""The range of a proportion (accuracy, F1, AUC, ...): drawn intervals are clipped to it."""
PREDICTIONS_TABLE = "predictions"
"""A classifier's test-set class probabilities: ``label`` and one ``p_<class>`` per class."""


def classification_metrics(
    y_true: np.ndarray, probs: np.ndarray, prefix: str = ""
) -> dict[str, float]:
    """Accuracy, macro F1/precision/recall and ROC AUC from class probabilities (N, K).

    Macro averages run over the classes present in the test labels: a class absent from
    the test set has no recall to average (counting it as zero would score perfect
    predictions 0.667 with one of three classes absent); a prediction of an absent class is
    still an error of the true class. AUC is binary for two classes (class 1 positive) and
    macro one-vs-rest over the present classes otherwise; it is NaN when the test labels
    hold a single class.
    """
    from sklearn import metrics as skm

    y_true = np.asarray(y_true)
    probs = np.asarray(probs, dtype=np.float64)
    y_pred = probs.argmax(axis=1)
    labels = np.unique(y_true)
    macro = {"labels": labels, "average": "macro", "zero_division": 0}
    out = {
        "acc": skm.accuracy_score(y_true, y_pred),
        "f1_macro": skm.f1_score(y_true, y_pred, **macro),
        "precision_macro": skm.precision_score(y_true, y_pred, **macro),
        "recall_macro": skm.recall_score(y_true, y_pred, **macro),
        "auc": roc_auc(y_true, probs),
    }
    return {f"{prefix}{k}": float(v) for k, v in out.items()}


def roc_auc(y_true: np.ndarray, probs: np.ndarray) -> float:
    """Binary AUC of class 1, or macro one-vs-rest AUC over the classes present.

    With more than two classes the scores are renormalised over the present classes; a row
    that gives every present class zero (sparse k-NN probabilities, all neighbours from an
    absent class) says nothing about them and scores them equally."""
    from sklearn import metrics as skm

    present = np.unique(y_true)
    if len(present) < 2:
        return float("nan")
    if probs.shape[1] == 2:
        return float(skm.roc_auc_score(y_true, probs[:, 1]))
    kept = probs[:, present]
    total = kept.sum(axis=1, keepdims=True)
    scores = np.divide(kept, total, out=np.full_like(kept, 1 / len(present)), where=total > 0)
    if len(present) == 2:
        return float(skm.roc_auc_score(y_true == present[1], scores[:, 1]))
    return float(skm.roc_auc_score(y_true, scores, multi_class="ovr", labels=present))


def confusion(y_true: np.ndarray, probs: np.ndarray) -> list[list[int]]:
    """Confusion matrix (rows: true class, columns: predicted), as nested lists."""
    from sklearn import metrics as skm

    labels = np.arange(np.asarray(probs).shape[1])
    return skm.confusion_matrix(y_true, np.asarray(probs).argmax(axis=1), labels=labels).tolist()


def threshold_table(y_true: np.ndarray, scores: np.ndarray, thresholds: np.ndarray) -> pd.DataFrame:
    """Accuracy, precision, recall (sensitivity), specificity and F1 at each threshold.

    ``y_true`` is binary (1 = positive); a sample is predicted positive when its score is at
    least the threshold.
    """
    from sklearn import metrics as skm

    y_true = np.asarray(y_true).astype(bool)
    scores = np.asarray(scores, dtype=np.float64)
    rows = []
    for t in thresholds:
        pred = scores >= t
        tn, fp, fn, tp = skm.confusion_matrix(y_true, pred, labels=[False, True]).ravel()
        rows.append(
            {
                "threshold": float(t),
                "accuracy": skm.accuracy_score(y_true, pred),
                "precision": skm.precision_score(y_true, pred, zero_division=0),
                "recall": skm.recall_score(y_true, pred, zero_division=0),
                "specificity": tn / (tn + fp) if tn + fp else float("nan"),
                "f1": skm.f1_score(y_true, pred, zero_division=0),
                "tp": int(tp),
                "fp": int(fp),
                "tn": int(tn),
                "fn": int(fn),
            }
        )
    return pd.DataFrame(rows)


def best_thresholds(y_true: np.ndarray, scores: np.ndarray) -> dict[str, float]:
    """The threshold maximising F1 (over the PR curve) and Youden's J (over the ROC curve)."""
    from sklearn import metrics as skm

    y_true = np.asarray(y_true).astype(bool)
    if y_true.all() or not y_true.any():
        return {
            "best_f1_threshold": float("nan"),
            "best_f1": float("nan"),
            "youden_threshold": float("nan"),
            "youden_j": float("nan"),
        }
    precision, recall, pr_thresholds = skm.precision_recall_curve(y_true, scores)
    total = precision + recall
    f1 = np.divide(2 * precision * recall, total, out=np.zeros_like(total), where=total > 0)
    best = int(np.argmax(f1[:-1]))  # the last PR point has no threshold
    fpr, tpr, roc_thresholds = skm.roc_curve(y_true, scores)
    j = tpr - fpr
    youden = int(np.argmax(j))
    return {
        "best_f1_threshold": float(pr_thresholds[best]),
        "best_f1": float(f1[best]),
        "youden_threshold": float(min(roc_thresholds[youden], 1.0)),
        "youden_j": float(j[youden]),
    }


def threshold_analysis(
    data: ImageData, probs: torch.Tensor, thresholds: list[float]
) -> pd.DataFrame:
    """Threshold table of the positive class (binary) or of every class one-vs-rest, on the
    test set. (Best thresholds are chosen on held-out data, never here: see
    ``plugins/probes.py``.)"""
    y, p = data.test_labels.numpy(), probs.numpy()
    if data.num_classes == 2:
        positive = 1 if data.positive_class is None else data.positive_class
        classes = [positive]
    else:
        classes = list(range(data.num_classes))
    tables = []
    for c in classes:
        table = threshold_table(y == c, p[:, c], np.array(thresholds))
        table.insert(0, "class", data.class_names[c])
        tables.append(table)
    return pd.concat(tables, ignore_index=True)


def binary_thresholds(table: pd.DataFrame) -> bool:
    """Whether a table of :func:`threshold_analysis` is a binary task's (its positive class
    only, not every class one-vs-rest)."""
    return table["class"].nunique() == 1


def classification_metric_info(
    prefix: str, what: str, headline: tuple[str, ...] = ()
) -> dict[str, Metric]:
    """The metrics of :func:`classification_metrics` with ``prefix``, described for ``what``
    (e.g. "the linear probe"); ``headline`` names those shown in Markdown leaderboards."""
    info = {
        "acc": ("test accuracy", "{:.3f}"),
        "f1_macro": ("macro F1 on the test set", "{:.3f}"),
        "precision_macro": ("macro precision on the test set", "{:.3f}"),
        "recall_macro": ("macro recall on the test set", "{:.3f}"),
        "auc": ("ROC AUC (binary, or macro one-vs-rest)", "{:.3f}"),
    }
    return {
        f"{prefix}{key}": Metric(
            f"{text} of {what}",
            fmt=fmt,
            headline=key in headline,
            summary=None if key == "acc" else key,
            bounds=UNIT_INTERVAL,
        )
        for key, (text, fmt) in info.items()
    }


TIMING_METRICS = ("pretrain_s", "imgs_per_s")
"""Core metrics that measure speed: comparable only between cells timed in one run on one
host (the leaderboard marks them otherwise)."""

CORE_METRICS = {
    "pretrain_s": Metric(
        "pretraining time (s)", False, "{:.1f}", headline=True, compare=False, bounds=(0, None)
    ),
    "imgs_per_s": Metric(
        "pretraining throughput (images/s)",
        True,
        "{:.0f}",
        headline=True,
        compare=False,
        bounds=(0, None),
    ),
    "params_m": Metric(
        "encoder parameters (millions)", False, "{:.3f}", True, compare=False, bounds=(0, None)
    ),
    "pretrain_tflops": Metric(
        "pretraining compute (TFLOPs): FLOPs per image of a training step (flops_per_image) "
        "times the images pretraining saw; a cost, not a result",
        False,
        "{:,.3f}",
        headline=True,
        compare=False,
        bounds=(0, None),
    ),
    "params_total_m": Metric(
        "encoder + decoder parameters (millions)",
        False,
        "{:.3f}",
        compare=False,
        bounds=(0, None),
    ),
    "flops_per_image": Metric(
        "GFLOPs per image of one pretraining step (forward, losses and backward, as torch's "
        "FlopCounterMode counts them: matrix products, convolutions, attention), averaged "
        "over the masking schedule",
        False,
        "{:.4f}",
        compare=False,
        bounds=(0, None),
    ),
    "final_loss": Metric("pretraining loss in the last epoch", False, "{:.4f}", compare=False),
    "peak_mem_mb": Metric(
        "peak memory of the cell's pretraining (MiB): allocated tensors on CUDA, the process's "
        "peak resident memory during the cell on a Linux CPU, empty where that cannot be "
        "measured per cell",
        False,
        "{:.0f}",
        compare=False,
        bounds=(0, None),
    ),
}
"""Metrics the runner itself measures on every cell (evaluators add their own). Timings,
sizes and compute are not compared: they describe the run and the model, not how good it is.
A cell without pretraining (a baseline) has no timings and no compute."""
