"""Probes on frozen features: the MAE linear probe and the weighted k-NN classifier.

Both read the cell's frozen features from the shared cache (extracted once per pooling), so
adding one costs no extra encoder pass.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from pydantic import Field, NonNegativeFloat, PositiveFloat, PositiveInt
from torch import Tensor, nn

from mae_bench import EvalContext, EvalResult, Evaluator, Metric, Params, hookimpl
from mae_bench.contract import TablePlot
from mae_bench.data import index_batches
from mae_bench.errors import MaeBenchWarning
from mae_bench.metrics import (
    PREDICTIONS_TABLE,
    THRESHOLD_METRICS,
    THRESHOLDS_TABLE,
    binary_thresholds,
    classification_metric_info,
    classification_metrics,
    confusion,
    roc_auc,
    threshold_analysis,
)


class LinearProbeParams(Params):
    """Linear probe on frozen, cached features (BatchNorm without affine, then linear)."""

    epochs: PositiveInt = 100
    batch_size: PositiveInt = 256
    lr: PositiveFloat = 1e-2
    weight_decay: NonNegativeFloat = 0.0
    pool: Literal["cls", "mean"] = "mean"


class KNNParams(Params):
    """k-NN on the cached frozen features: cosine similarity, temperature-weighted votes (DINO).

    A ``k`` above the number of training images is not refused (the dataset is unknown at
    validation): every training image votes, with a warning naming ``eval.knn.k``."""

    k: PositiveInt = Field(
        20,
        description="neighbours that vote; more than the training images: all of them, warned",
    )
    temperature: PositiveFloat = 0.07
    pool: Literal["cls", "mean"] = "mean"


def linear_probe(
    train_x: Tensor,
    train_y: Tensor,
    test_x: Tensor,
    test_y: Tensor,
    cfg: LinearProbeParams,
    *,
    num_classes: int,
    seed: int,
) -> tuple[dict[str, float], Tensor]:
    """The MAE linear-probe head (BatchNorm without affine, then linear) on cached features.

    The BatchNorm normalises with batch statistics while training, and at test time with the
    exact mean and variance of all the training features (not a momentum-averaged estimate,
    which lags far behind on short probes). Returns ``{"lp_acc", "lp_train_acc"}`` and the
    test-set class probabilities (N, K).
    """
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    head = nn.Sequential(
        nn.BatchNorm1d(train_x.shape[1], affine=False, eps=1e-6),
        nn.Linear(train_x.shape[1], num_classes),
    )
    nn.init.trunc_normal_(head[1].weight, std=0.01)
    nn.init.zeros_(head[1].bias)
    optimizer = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    bs = min(cfg.batch_size, len(train_x))
    steps = cfg.epochs * math.ceil(len(train_x) / bs)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    loss_fn = nn.CrossEntropyLoss()
    head.train()
    for _ in range(cfg.epochs):
        for idx in index_batches(len(train_x), bs, generator=generator):
            if len(idx) < 2:  # BatchNorm needs two samples
                continue
            loss = loss_fn(head(train_x[idx]), train_y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    norm = head[0]
    norm.running_mean.copy_(train_x.mean(dim=0))
    norm.running_var.copy_(train_x.var(dim=0))
    head.eval()
    with torch.no_grad():
        train_acc = (head(train_x).argmax(1) == train_y).float().mean().item()
        probs = head(test_x).softmax(dim=1)
    test_acc = (probs.argmax(1) == test_y).float().mean().item()
    return {"lp_acc": test_acc, "lp_train_acc": train_acc}, probs


@torch.no_grad()
def knn_classify(
    train_x: Tensor,
    train_y: Tensor,
    test_x: Tensor,
    *,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    batch_size: int = 1024,
) -> Tensor:
    """Weighted k-NN (DINO): cosine similarity, votes weighted by exp(sim / T); probs (N, K).

    The weights are normalised over the k neighbours as a softmax of sim / T, which is the
    same vote without overflow at small temperatures.
    """
    train = F.normalize(train_x.float(), dim=1)
    k = min(k, len(train))
    out = []
    for chunk in F.normalize(test_x.float(), dim=1).split(batch_size):
        sim, idx = (chunk @ train.T).topk(k, dim=1)
        weights = (sim / temperature).softmax(dim=1)
        out.append(torch.zeros(len(chunk), num_classes).scatter_add_(1, train_y[idx], weights))
    return torch.cat(out)


class LinearProbeEvaluator(Evaluator):
    """The MAE linear probe on frozen features: accuracy, F1, AUC and a threshold table."""

    name = "linear_probe"
    Params = LinearProbeParams
    enabled_by_default = True
    summary_priority = 10

    def metrics(self) -> dict[str, Metric]:
        return {
            **classification_metric_info("lp_", "the linear probe", ("acc", "f1_macro")),
            "lp_train_acc": Metric("training accuracy of the linear probe"),
            **{f"lp_{k}": m for k, m in THRESHOLD_METRICS.items()},
        }

    def evaluate(self, ctx: EvalContext) -> EvalResult:
        data, p = ctx.data, self.params
        train_x, test_x = ctx.features.get(p.pool)
        scores, probs = linear_probe(
            train_x, data.train_labels, test_x, data.test_labels, p,
            num_classes=data.num_classes, seed=ctx.seed,
        )  # fmt: skip
        test_y = data.test_labels.numpy()
        scores.update(classification_metrics(test_y, probs.numpy(), "lp_"))
        thresholds, best = threshold_analysis(data, probs, ctx.thresholds)
        scores.update({f"lp_{k}": v for k, v in best.items()})
        predictions = pd.DataFrame(probs.numpy(), columns=[f"p_{c}" for c in data.class_names])
        predictions.insert(0, "label", test_y)
        return EvalResult(
            scores,
            tables={PREDICTIONS_TABLE: predictions, THRESHOLDS_TABLE: thresholds},
            confusion=confusion(test_y, probs.numpy()),
        )

    def plots(self) -> list[TablePlot]:
        return [RocPlot(self.name), ThresholdPlot(self.name)]


class RocPlot(TablePlot):
    """ROC curves of a classifier's test-set predictions, one per variant (lowest seed):
    the positive class of a binary task, else micro-averaged one-vs-rest."""

    name = "roc"
    table = PREDICTIONS_TABLE
    also = (THRESHOLDS_TABLE,)  # which class is the positive one
    size = (5.0, 5.0)

    def __init__(self, source: str) -> None:
        self.title = f"ROC ({source})"

    def draw(
        self, ax: Any, tables: dict[str, pd.DataFrame], **also: dict[str, pd.DataFrame]
    ) -> bool:
        from sklearn.metrics import roc_curve

        drawn = False
        for name, preds in tables.items():
            table = also[THRESHOLDS_TABLE].get(name)
            if table is None:
                continue
            probs = preds.filter(like="p_").to_numpy()
            classes = [c.removeprefix("p_") for c in preds.columns if c.startswith("p_")]
            if binary_thresholds(table):  # binary: the positive class
                k = classes.index(str(table["class"].iloc[0]))
                fpr, tpr, _ = roc_curve(preds["label"] == k, probs[:, k])
            else:  # micro-average over classes, one-vs-rest
                onehot = np.eye(len(classes))[preds["label"].to_numpy()]
                fpr, tpr, _ = roc_curve(onehot.ravel(), probs.ravel())
            auc = roc_auc(preds["label"].to_numpy(), probs)
            ax.plot(fpr, tpr, label=f"{name} (AUC {auc:.3f})")
            drawn = True
        if not drawn:
            return False
        ax.plot([0, 1], [0, 1], color="grey", linestyle=":")
        ax.set(xlabel="false positive rate", ylabel="true positive rate")
        ax.legend(fontsize=7)
        return True


class ThresholdPlot(TablePlot):
    """Precision, recall and F1 against the decision threshold, one line per variant (lowest
    seed): the positive class of a binary task, else averaged over the classes."""

    name = "thresholds"
    table = THRESHOLDS_TABLE

    def __init__(self, source: str) -> None:
        self.title = f"{source}: precision, recall and F1 vs threshold"

    def draw(
        self, ax: Any, tables: dict[str, pd.DataFrame], **also: dict[str, pd.DataFrame]
    ) -> None:
        import seaborn as sns

        frames = []
        for name, table in tables.items():
            curves = table.groupby("threshold")[["precision", "recall", "f1"]].mean().reset_index()
            frames.append(curves.melt("threshold", var_name="score").assign(variant=name))
        sns.lineplot(
            data=pd.concat(frames), x="threshold", y="value", hue="variant", style="score", ax=ax
        )
        ax.set(ylim=(0, 1.02))
        ax.legend(fontsize=7, bbox_to_anchor=(1.02, 1), loc="upper left")


class KNNEvaluator(Evaluator):
    """Weighted k-NN (DINO) on frozen features: accuracy, F1, AUC."""

    name = "knn"
    Params = KNNParams
    enabled_by_default = True
    summary_priority = 20

    def metrics(self) -> dict[str, Metric]:
        return classification_metric_info("knn_", "the k-NN classifier", ("acc",))

    def evaluate(self, ctx: EvalContext) -> EvalResult:
        data, p = ctx.data, self.params
        train_x, test_x = ctx.features.get(p.pool)
        if p.k > len(train_x):
            warnings.warn(
                f"eval.knn.k: {p.k} is more than the {len(train_x)} training images: all "
                f"{len(train_x)} vote (k = {len(train_x)})",
                MaeBenchWarning,
                stacklevel=2,
            )
        probs = knn_classify(
            train_x, data.train_labels, test_x, num_classes=data.num_classes,
            k=p.k, temperature=p.temperature,
        )  # fmt: skip
        return EvalResult(classification_metrics(data.test_labels.numpy(), probs.numpy(), "knn_"))


@hookimpl
def register_evaluators(register):
    register(LinearProbeEvaluator)
    register(KNNEvaluator)
