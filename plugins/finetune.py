"""Fine-tuning protocol: the pretrained encoder plus a linear head, trained end to end."""

from __future__ import annotations

import math
from typing import Annotated, Literal

import numpy as np
import pandas as pd
import torch
from pydantic import Field, NonNegativeFloat, PositiveFloat, PositiveInt
from timm.optim import param_groups_weight_decay
from torch import Tensor, nn

from mae_bench import EvalContext, EvalResult, Evaluator, Metric, Params, hookimpl
from mae_bench.contract import ImageData, MaskedAutoencoder, Pool
from mae_bench.data import ImageFeeder, index_batches
from mae_bench.device import autocast, optimizer_options
from mae_bench.metrics import classification_metric_info, classification_metrics, confusion
from mae_bench.train import lr_at


class FinetuneParams(Params):
    """End-to-end fine-tuning with a linear head on a (stratified, per-seed) label fraction.

    AdamW, linear warmup then cosine; ``layer_decay`` < 1 scales each encoder block's lr as
    the model groups its layers (the last block ``layer_decay``); ``drop_path`` is the
    stochastic-depth rate of the last block (linearly increasing from 0).
    """

    epochs: PositiveInt = 30
    batch_size: PositiveInt = 64
    lr: PositiveFloat = 1e-3
    min_lr: NonNegativeFloat = 1e-6
    weight_decay: NonNegativeFloat = 0.05
    warmup_epochs: NonNegativeFloat = 3.0
    layer_decay: Annotated[float, Field(gt=0, le=1)] = 1.0
    drop_path: Annotated[float, Field(ge=0, lt=1)] = 0.0
    label_fraction: Annotated[float, Field(gt=0, le=1)] = 1.0
    pool: Literal["cls", "mean"] = "mean"
    eval_every: PositiveInt = 1  # epochs between test-set scores in the per-epoch history


class Classifier(nn.Module):
    """An MAE's encoder (all patches visible, pooled) followed by a normalized linear head.

    Holds the encoder only (``model.without_decoder()``); the head is created on the
    encoder's device.
    """

    def __init__(self, model: MaskedAutoencoder, num_classes: int, pool: Pool) -> None:
        super().__init__()
        self.model = model.without_decoder()
        self.pool = pool
        device = next(self.model.parameters()).device
        self.norm = nn.LayerNorm(model.embed_dim, device=device)
        self.head = nn.Linear(model.embed_dim, num_classes, device=device)
        nn.init.trunc_normal_(self.head.weight, std=2e-5)
        nn.init.zeros_(self.head.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.norm(self.model.forward_features(x, self.pool)))

    def param_groups(self, weight_decay: float, layer_decay: float) -> list[dict[str, object]]:
        """The encoder's own groups (layer-wise lr decay, as the model defines them) and the
        head and its norm at the full lr (no weight decay on 1-D parameters)."""
        head = nn.ModuleDict({"norm": self.norm, "head": self.head})
        top = [{**g, "lr_scale": 1.0} for g in param_groups_weight_decay(head, weight_decay)]
        return [*self.model.encoder_param_groups(weight_decay, layer_decay), *top]


def label_subset(labels: Tensor, fraction: float, seed: int) -> Tensor:
    """Indices of a stratified ``fraction`` of the labelled images, different per seed."""
    if fraction >= 1.0:
        return torch.arange(len(labels))
    from sklearn.model_selection import train_test_split

    y = labels.numpy()
    n_keep = max(round(fraction * len(y)), len(np.unique(y)))
    try:
        keep, _ = train_test_split(
            np.arange(len(y)), train_size=n_keep, stratify=y, random_state=seed
        )
    except ValueError:  # a class too small to stratify
        keep = np.random.default_rng(seed).choice(len(y), n_keep, replace=False)
    return torch.from_numpy(np.sort(keep))


@torch.no_grad()
def predict(classifier: Classifier, images, feeder: ImageFeeder, batch_size: int = 256) -> Tensor:
    """Class probabilities (N, K) on the CPU."""
    classifier.eval()
    out = []
    for idx in index_batches(len(images), batch_size):
        with autocast(feeder.device):
            out.append(classifier(feeder(images[idx])).float().softmax(1).cpu())
    return torch.cat(out)


def finetune(
    model: MaskedAutoencoder,
    data: ImageData,
    feeder: ImageFeeder,
    cfg: FinetuneParams,
    *,
    seed: int,
) -> tuple[dict[str, float], list[dict[str, float]], Tensor]:
    """Fine-tune a copy of ``model``'s encoder (on ``feeder.device``) on a label fraction;
    returns (ft_* metrics, history, test probs); ``model`` itself is left untouched.

    The history has the training loss and the test accuracy and macro F1 after every epoch.
    """
    device = feeder.device
    torch.manual_seed(seed)
    subset = label_subset(data.train_labels, cfg.label_fraction, seed)
    images, labels = data.train_images[subset], data.train_labels[subset]
    classifier = Classifier(model, data.num_classes, cfg.pool)
    classifier.model.set_drop_path(cfg.drop_path)
    groups = classifier.param_groups(cfg.weight_decay, cfg.layer_decay)
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, **optimizer_options(device))
    bs = min(cfg.batch_size, len(images))
    steps_per_epoch = math.ceil(len(images) / bs)
    total, warmup = steps_per_epoch * cfg.epochs, round(cfg.warmup_epochs * steps_per_epoch)
    generator = torch.Generator().manual_seed(seed)
    loss_fn = nn.CrossEntropyLoss()
    history, step = [], 0
    test_y = data.test_labels.numpy()
    for epoch in range(cfg.epochs):
        classifier.train()
        total_loss = torch.zeros((), device=device)
        for idx in index_batches(len(images), bs, generator=generator):
            lr = lr_at(step, total, warmup, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr * group["lr_scale"]
            x, y = feeder(images[idx]), labels[idx].to(device)
            with autocast(device):
                logits = classifier(x)
            loss = loss_fn(logits.float(), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total_loss += loss.detach()
            step += 1
        row = {"epoch": epoch + 1, "loss": float(total_loss) / steps_per_epoch}
        if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs:
            probs = predict(classifier, data.test_images, feeder)
            scores = classification_metrics(test_y, probs.numpy())
            row.update(test_acc=scores["acc"], test_f1_macro=scores["f1_macro"])
        history.append(row)
    metrics = classification_metrics(test_y, probs.numpy(), "ft_")
    metrics["ft_train_images"] = float(len(images))
    return metrics, history, probs


class FinetuneEvaluator(Evaluator):
    """The encoder plus a linear head trained end to end on a fraction of the labels."""

    name = "finetune"
    Params = FinetuneParams
    trains_encoder = True
    summary_priority = 0

    def metrics(self) -> dict[str, Metric]:
        return {
            **classification_metric_info("ft_", "the fine-tuned model", ("acc", "f1_macro")),
            "ft_train_images": Metric("labelled images fine-tuned on", fmt="{:.0f}"),
        }

    def evaluate(self, ctx: EvalContext) -> EvalResult:
        data, p = ctx.data, self.params
        scores, history, probs = finetune(ctx.model, data, ctx.feeder, p, seed=ctx.seed)
        return EvalResult(
            scores,
            tables={"finetune": pd.DataFrame(history)},
            confusion=confusion(data.test_labels.numpy(), probs.numpy()),
        )


@hookimpl
def register_evaluators(register):
    register(FinetuneEvaluator)
