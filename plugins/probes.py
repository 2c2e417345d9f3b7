"""Probes on frozen features: the MAE linear probe and the weighted k-NN classifier.

Both read the cell's frozen features from the shared cache (extracted once per pooling), so
adding one costs no extra encoder pass. Each stores with its result the facts that say how
far its figures can be trusted (:func:`mae_bench.evaluate.classifier_sanity`).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from pydantic import Field, NonNegativeFloat, PositiveFloat, PositiveInt, model_validator
from timm.optim import Lars
from torch import Tensor, nn

from mae_bench import EvalContext, EvalResult, Evaluator, Metric, Params, hookimpl
from mae_bench.contract import TablePlot
from mae_bench.data import index_batches
from mae_bench.errors import MaeBenchWarning
from mae_bench.evaluate import classifier_sanity
from mae_bench.metrics import (
    PREDICTIONS_TABLE,
    THRESHOLDS_TABLE,
    best_thresholds,
    binary_thresholds,
    classification_metric_info,
    classification_metrics,
    confusion,
    roc_auc,
    threshold_analysis,
    threshold_table,
)

THRESHOLD_FOLDS = 5
"""Folds of the cross-validation on the training features whose out-of-fold predictions
choose a binary task's decision thresholds (fewer when a class has fewer images)."""

HELD_OUT_THRESHOLD_METRICS = {
    "best_f1_threshold": Metric(
        "threshold maximising F1 on out-of-fold training predictions (binary tasks)",
        fmt="{:.2f}", compare=False, bounds=(0, 1),
    ),
    "best_f1": Metric(
        "test-set F1 at the best-F1 threshold chosen on the training features (binary tasks)",
        bounds=(0, 1),
    ),
    "youden_threshold": Metric(
        "threshold maximising Youden's J on out-of-fold training predictions (binary tasks)",
        fmt="{:.2f}", compare=False, bounds=(0, 1),
    ),
    "youden_j": Metric(
        "test-set Youden's J at the threshold chosen on the training features (binary tasks)",
        bounds=(-1, 1),
    ),
}  # fmt: skip
"""The linear probe's decision thresholds, chosen on held-out training predictions and
scored on the test set; the thresholds are settings it chose, not results to rank."""


class LinearProbeParams(Params):
    """Linear probe on frozen, cached features (BatchNorm without affine, then linear).

    ``optimizer``: ``adamw``, or ``lars`` as the official MAE probe (:class:`MaeLars`).
    The peak learning rate is ``lr``, or ``blr`` x batch / 256 (the MAE rule, with the batch
    actually used: at most the training images). It rises linearly from 0 over
    ``warmup_epochs`` and then falls by a half cosine to ``min_lr``, step by step over the
    steps the probe takes. The official recipe (main_linprobe.py) is ``optimizer: lars,
    blr: 0.1, warmup_epochs: 10, epochs: 90, weight_decay: 0`` at a batch of 16384."""

    epochs: PositiveInt = 100
    batch_size: PositiveInt = 256
    optimizer: Literal["adamw", "lars"] = Field(
        "adamw", description="adamw, or lars: the official MAE probe's optimizer"
    )
    lr: PositiveFloat = 1e-2
    blr: PositiveFloat | None = Field(
        None, description="sets lr = blr x batch / 256 (the MAE rule); not with lr"
    )
    warmup_epochs: NonNegativeFloat = 0.0
    min_lr: NonNegativeFloat = 0.0
    weight_decay: NonNegativeFloat = 0.0
    pool: Literal["cls", "mean"] = "mean"

    @model_validator(mode="before")
    @classmethod
    def _lr_or_blr(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("blr") is not None and data.get("lr") is not None:
            raise ValueError("set lr or blr (lr = blr x batch / 256), not both")
        return data

    def peak_lr(self, batch: int) -> float:
        """The peak learning rate at a batch of ``batch`` images: ``lr``, or by the MAE rule."""
        return self.lr if self.blr is None else self.blr * batch / 256


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


class MaeLars(Lars):
    """LARS as the official MAE linear probe runs it (facebookresearch/mae util/lars.py, from
    MoCo v3): SGD with momentum 0.9 whose update of a matrix is its gradient plus weight decay,
    rescaled to ``trust_coeff x ||w|| / ||g + wd w||``; vectors (biases, norm parameters)
    get neither decay nor rescaling. The learning rate is set per step by the caller.

    timm's :class:`~timm.optim.Lars` does the rescaling and momentum; its own weight decay
    would enter the ratio as ``||g|| + wd ||w||``, so the decay goes into the matrices'
    gradients here and timm's stays 0."""

    def __init__(
        self,
        params: Iterable[Tensor],
        *,
        weight_decay: float = 0.0,
        momentum: float = 0.9,
        trust_coeff: float = 1e-3,
    ) -> None:
        params = list(params)
        groups = [
            {"params": [p for p in params if p.ndim > 1], "always_adapt": True,
             "matrix_decay": weight_decay},
            {"params": [p for p in params if p.ndim <= 1], "always_adapt": False,
             "matrix_decay": 0.0},
        ]  # fmt: skip
        super().__init__(
            [g for g in groups if g["params"]], lr=0.0, momentum=momentum, weight_decay=0.0,
            trust_coeff=trust_coeff, eps=0.0,
        )  # fmt: skip

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """One update; ``closure`` (re-evaluating the loss) runs before the decay is added."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None and group["matrix_decay"]:
                    p.grad.add_(p, alpha=group["matrix_decay"])
        super().step()
        return loss


def probe_lr(epoch: float, peak: float, cfg: LinearProbeParams) -> float:
    """The learning rate at a fractional ``epoch`` (epochs done + steps taken / steps per
    epoch), as the official MAE schedule: linear from 0 over ``cfg.warmup_epochs``, then a
    half cosine from ``peak`` to ``cfg.min_lr`` at ``cfg.epochs``."""
    if epoch < cfg.warmup_epochs:
        return peak * epoch / cfg.warmup_epochs
    span = cfg.epochs - cfg.warmup_epochs
    progress = (epoch - cfg.warmup_epochs) / span if span > 0 else 1.0
    return cfg.min_lr + (peak - cfg.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def train_probe_head(
    train_x: Tensor, train_y: Tensor, cfg: LinearProbeParams, *, num_classes: int, seed: int
) -> nn.Sequential:
    """Train the MAE linear-probe head (BatchNorm without affine, then linear) on cached
    features; returned in eval mode.

    The BatchNorm normalises with batch statistics while training, and at test time with the
    exact mean and variance of all the training features (not a momentum-averaged estimate,
    which lags far behind on short probes). A one-image last batch, which BatchNorm cannot
    train on, is skipped and not counted in the learning-rate schedule.
    """
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    head = nn.Sequential(
        nn.BatchNorm1d(train_x.shape[1], affine=False, eps=1e-6),
        nn.Linear(train_x.shape[1], num_classes),
    )
    nn.init.trunc_normal_(head[1].weight, std=0.01)
    nn.init.zeros_(head[1].bias)
    optimizer: torch.optim.Optimizer
    if cfg.optimizer == "lars":
        optimizer = MaeLars(head.parameters(), weight_decay=cfg.weight_decay)
    else:
        optimizer = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    bs = min(cfg.batch_size, len(train_x))
    peak = cfg.peak_lr(bs)
    steps_per_epoch = len(train_x) // bs + (len(train_x) % bs >= 2)  # batches of 2 or more
    loss_fn = nn.CrossEntropyLoss()
    head.train()
    for epoch in range(cfg.epochs):
        taken = 0
        for idx in index_batches(len(train_x), bs, generator=generator):
            if len(idx) < 2:  # BatchNorm needs two samples
                continue
            for group in optimizer.param_groups:
                group["lr"] = probe_lr(epoch + taken / steps_per_epoch, peak, cfg)
            loss = loss_fn(head(train_x[idx]), train_y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            taken += 1
    norm = head[0]
    norm.running_mean.copy_(train_x.mean(dim=0))
    norm.running_var.copy_(train_x.var(dim=0))
    return head.eval()


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
    """The MAE linear probe (:func:`train_probe_head`) on cached features. Returns
    ``{"lp_acc", "lp_train_acc"}`` and the test-set class probabilities (N, K)."""
    head = train_probe_head(train_x, train_y, cfg, num_classes=num_classes, seed=seed)
    with torch.no_grad():
        train_acc = (head(train_x).argmax(1) == train_y).float().mean().item()
        probs = head(test_x).softmax(dim=1)
    test_acc = (probs.argmax(1) == test_y).float().mean().item()
    return {"lp_acc": test_acc, "lp_train_acc": train_acc}, probs


def cross_validation_folds(labels: np.ndarray, folds: int = THRESHOLD_FOLDS) -> int:
    """How many stratified folds ``labels`` allow, up to ``folds``: as many as the smallest
    class present has images; 0 with fewer than two classes."""
    counts = np.bincount(labels)
    present = counts[counts > 0]
    return min(folds, int(present.min())) if len(present) >= 2 else 0


def out_of_fold_probs(
    train_x: Tensor,
    train_y: Tensor,
    cfg: LinearProbeParams,
    *,
    num_classes: int,
    seed: int,
    folds: int = THRESHOLD_FOLDS,
) -> Tensor | None:
    """Each training image's class probabilities from a probe trained without it: stratified
    ``folds``-fold cross-validation (:func:`cross_validation_folds`), split by ``seed``.
    None when that leaves fewer than two folds (a class with a single image, or one class)."""
    from sklearn.model_selection import StratifiedKFold

    labels = train_y.numpy()
    splits = cross_validation_folds(labels, folds)
    if splits < 2:
        return None
    probs = torch.zeros(len(train_x), num_classes)
    cv = StratifiedKFold(splits, shuffle=True, random_state=seed)
    for fit, held in cv.split(np.zeros(len(labels)), labels):
        fit, held = torch.from_numpy(fit), torch.from_numpy(held)
        head = train_probe_head(train_x[fit], train_y[fit], cfg, num_classes=num_classes, seed=seed)
        with torch.no_grad():
            probs[held] = head(train_x[held]).softmax(dim=1)
    return probs


def held_out_thresholds(
    choose_y: np.ndarray, choose_scores: np.ndarray, test_y: np.ndarray, test_scores: np.ndarray
) -> dict[str, float]:
    """The best-F1 and Youden thresholds chosen on one set (``choose_*``: held-out training
    predictions) and the F1 and Youden's J they reach on another (``test_*``). Labels are
    binary (1 = positive); a sample is predicted positive when its score is at least the
    threshold. NaN where a set lacks a class."""
    chosen = best_thresholds(choose_y, choose_scores)
    test_y = np.asarray(test_y).astype(bool)
    out = {"best_f1_threshold": chosen["best_f1_threshold"], "best_f1": math.nan,
           "youden_threshold": chosen["youden_threshold"], "youden_j": math.nan}  # fmt: skip
    if test_y.all() or not test_y.any():
        return out
    for threshold_key, score_key in (
        ("best_f1_threshold", "best_f1"),
        ("youden_threshold", "youden_j"),
    ):
        threshold = out[threshold_key]
        if math.isnan(threshold):
            continue
        row = threshold_table(test_y, test_scores, np.array([threshold])).iloc[0]
        out[score_key] = float(
            row["f1"] if score_key == "best_f1" else row["recall"] + row["specificity"] - 1
        )
    return out


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
    """The MAE linear probe on frozen features: accuracy, F1, AUC, a threshold table, and a
    binary task's decision thresholds chosen on held-out training predictions."""

    name = "linear_probe"
    Params = LinearProbeParams
    enabled_by_default = True
    summary_priority = 10

    def metrics(self) -> dict[str, Metric]:
        return {
            **classification_metric_info("lp_", "the linear probe", ("acc", "f1_macro")),
            "lp_train_acc": Metric(
                "training accuracy of the linear probe (a diagnostic, not compared)",
                compare=False, bounds=(0, 1),
            ),
            **{f"lp_{k}": m for k, m in HELD_OUT_THRESHOLD_METRICS.items()},
        }  # fmt: skip

    def evaluate(self, ctx: EvalContext) -> EvalResult:
        """Train the probe on the training features and score the test features; a binary
        task's thresholds are chosen on out-of-fold training predictions
        (:func:`out_of_fold_probs`) and scored on the test set."""
        data, p = ctx.data, self.params
        train_x, test_x = ctx.features.get(p.pool)
        scores, probs = linear_probe(
            train_x, data.train_labels, test_x, data.test_labels, p,
            num_classes=data.num_classes, seed=ctx.seed,
        )  # fmt: skip
        test_y = data.test_labels.numpy()
        scores.update(classification_metrics(test_y, probs.numpy(), "lp_"))
        thresholds = threshold_analysis(data, probs, ctx.thresholds)
        sanity = classifier_sanity(
            data.train_labels, data.test_labels, data.num_classes,
            class_names=data.class_names, accuracy=("lp_acc", scores["lp_acc"]),
        )  # fmt: skip
        if data.num_classes == 2:
            scores.update(self._thresholds(ctx, train_x, probs, sanity))
        predictions = pd.DataFrame(probs.numpy(), columns=[f"p_{c}" for c in data.class_names])
        predictions.insert(0, "label", test_y)
        return EvalResult(
            scores,
            tables={PREDICTIONS_TABLE: predictions, THRESHOLDS_TABLE: thresholds},
            confusion=confusion(test_y, probs.numpy()),
            sanity=sanity,
        )

    def _thresholds(
        self, ctx: EvalContext, train_x: Tensor, test_probs: Tensor, sanity: dict[str, Any]
    ) -> dict[str, float]:
        """The binary task's thresholds, chosen on held-out training predictions and scored
        on the test set (``lp_``-prefixed); what chose them is noted in ``sanity``."""
        data = ctx.data
        positive = 1 if data.positive_class is None else data.positive_class
        held_out = out_of_fold_probs(
            train_x, data.train_labels, self.params, num_classes=2, seed=ctx.seed
        )
        if held_out is None:
            sanity["warnings"].append(
                "no decision thresholds: a class has fewer than 2 training images to hold out"
            )
            choose_y, choose_scores = np.zeros(1), np.zeros(1)  # one class: NaN thresholds
        else:
            choose_y = data.train_labels.numpy() == positive
            choose_scores = held_out[:, positive].numpy()
            folds = cross_validation_folds(data.train_labels.numpy())
            sanity["thresholds_chosen_on"] = (
                f"out-of-fold predictions on the {len(choose_y)} training images "
                f"({folds}-fold cross-validation)"
            )
        best = held_out_thresholds(
            choose_y, choose_scores, data.test_labels.numpy() == positive,
            test_probs[:, positive].numpy(),
        )  # fmt: skip
        return {f"lp_{k}": v for k, v in best.items()}

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
        scores = classification_metrics(data.test_labels.numpy(), probs.numpy(), "knn_")
        sanity = classifier_sanity(
            data.train_labels, data.test_labels, data.num_classes,
            class_names=data.class_names, accuracy=("knn_acc", scores["knn_acc"]),
        )  # fmt: skip
        return EvalResult(scores, sanity=sanity)


@hookimpl
def register_evaluators(register):
    register(LinearProbeEvaluator)
    register(KNNEvaluator)
