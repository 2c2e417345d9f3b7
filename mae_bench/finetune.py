"""Fine-tuning protocol: the pretrained encoder plus a linear head, trained end to end."""

from __future__ import annotations

import math
import re

import numpy as np
import torch
from timm.layers import DropPath
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from mae_bench.contract import ImageData, MaskedAutoencoder, Pool
from mae_bench.data import ImageFeeder, index_batches
from mae_bench.device import autocast, optimizer_options
from mae_bench.metrics import classification_metrics
from mae_bench.suite import FinetuneConfig
from mae_bench.train import lr_at

_BLOCK = re.compile(r"blocks\.(\d+)\.")
_EMBEDDING = ("patch_embed", "cls_token", "pos_embed", "reg_token")


class Classifier(nn.Module):
    """An MAE's encoder (all patches visible, pooled) followed by a normalized linear head."""

    def __init__(self, model: MaskedAutoencoder, num_classes: int, pool: Pool) -> None:
        super().__init__()
        self.model = model
        self.pool = pool
        self.norm = nn.LayerNorm(model.embed_dim)
        self.head = nn.Linear(model.embed_dim, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=2e-5)
        nn.init.zeros_(self.head.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.norm(self.model.forward_features(x, self.pool)))


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


def set_drop_path(encoder: nn.Module, rate: float) -> None:
    """Stochastic depth on the encoder's timm blocks, rising linearly to ``rate``."""
    blocks = [m for m in encoder.modules() if isinstance(m, Block)]
    for i, block in enumerate(blocks):
        r = rate * i / max(1, len(blocks) - 1)
        block.drop_path1 = DropPath(r) if r > 0 else nn.Identity()
        block.drop_path2 = DropPath(r) if r > 0 else nn.Identity()


def param_groups(
    classifier: Classifier, weight_decay: float, layer_decay: float
) -> list[dict[str, object]]:
    """AdamW groups: no decay on 1-D params and tokens; lr scaled per block (layer decay).

    Block ``i`` of the encoder gets ``layer_decay ** (depth + 1 - (i + 1))``; embeddings get
    the smallest scale, everything after the blocks (norms, head) the full lr. Encoders
    without ``blocks.N`` parameters (the MLP) get one scale.
    """
    names = [n for n, p in classifier.named_parameters() if p.requires_grad]
    depth = max((int(m.group(1)) + 1 for n in names if (m := _BLOCK.search(n))), default=0)
    groups: dict[tuple[int, bool], dict[str, object]] = {}
    for name, param in classifier.named_parameters():
        if not param.requires_grad:
            continue
        match = _BLOCK.search(name)
        if match:
            layer = int(match.group(1)) + 1
        elif name.startswith("model.") and any(e in name for e in _EMBEDDING):
            layer = 0
        else:
            layer = depth + 1
        no_decay = param.ndim <= 1 or any(t in name for t in ("cls_token", "pos_embed"))
        key = (layer, no_decay)
        if key not in groups:
            groups[key] = {
                "params": [],
                "weight_decay": 0.0 if no_decay else weight_decay,
                "lr_scale": layer_decay ** (depth + 1 - layer),
            }
        groups[key]["params"].append(param)
    return list(groups.values())


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
    cfg: FinetuneConfig,
    *,
    seed: int,
) -> tuple[dict[str, float], list[dict[str, float]], Tensor]:
    """Fine-tune ``model``'s encoder on a label fraction; (ft_* metrics, history, test probs).

    The history has the training loss and the test accuracy and macro F1 after every epoch.
    """
    device = feeder.device
    torch.manual_seed(seed)
    subset = label_subset(data.train_labels, cfg.label_fraction, seed)
    images, labels = data.train_images[subset], data.train_labels[subset]
    set_drop_path(model.encoder, cfg.drop_path)
    classifier = Classifier(model, data.num_classes, cfg.pool).to(device)
    groups = param_groups(classifier, cfg.weight_decay, cfg.layer_decay)
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
