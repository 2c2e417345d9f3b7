"""``mae-bench report``: tables and plots regenerated from stored results, no retraining.

Plots (PNG, under ``<out>/<suite>/plots/``): pretraining loss curves, the leaderboard bar
chart with 95% intervals, reconstruction grids (same images, same masks for every variant),
and for binary tasks ROC curves and precision/recall/F1 against the threshold.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
import torch
from safetensors.torch import load_file
from sklearn.metrics import roc_curve

from mae_bench.contract import Mask
from mae_bench.data import ImageFeeder
from mae_bench.evaluate import fixed_masks
from mae_bench.layers import patch_mask_to_pixels, unpatchify
from mae_bench.leaderboard import write_leaderboard
from mae_bench.plugins import Registry
from mae_bench.results import CellStore, read_suite_record
from mae_bench.suite import resolve_suite


def _save(fig: plt.Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120, bbox_inches="tight")
    plt.close(fig)
    tmp.replace(path)
    return path


def plot_loss_curves(records: list[dict[str, Any]], store: CellStore, out: Path) -> Path:
    """Pretraining loss per epoch, one line per variant (band: spread over seeds)."""
    frames = []
    for r in records:
        history = pd.read_csv(store.path(r["cell_id"]) / "history.csv")
        frames.append(history.assign(variant=r["variant"], seed=r["seed"]))
    data = pd.concat(frames, ignore_index=True)
    fig, ax = plt.subplots(figsize=(7, 4))
    sns.lineplot(data=data, x="epoch", y="loss", hue="variant", errorbar="sd", ax=ax)
    ax.set(title="Pretraining loss", ylabel="loss (weighted sum of terms)")
    return _save(fig, out / "loss_curves.png")


def plot_leaderboard(board: pd.DataFrame, metric: str, out: Path) -> Path:
    """Bar chart of ``metric`` per variant with its 95% confidence interval."""
    fig, ax = plt.subplots(figsize=(7, 0.5 + 0.45 * len(board)))
    ci = board.get(f"{metric}_ci95", pd.Series(np.nan, index=board.index)).fillna(0)
    sns.barplot(x=board[metric], y=board["variant"], color="tab:blue", ax=ax, orient="h")
    ax.errorbar(board[metric], np.arange(len(board)), xerr=ci, fmt="none", color="black")
    ax.set(title=f"{metric} (mean, 95% CI over seeds)", xlabel=metric, ylabel="")
    return _save(fig, out / f"leaderboard_{metric}.png")


def plot_finetune_curves(records: list[dict[str, Any]], store: CellStore, out: Path) -> Path | None:
    """Fine-tuning test accuracy and macro F1 per epoch: pretrained variants vs scratch."""
    frames = []
    for r in records:
        path = store.path(r["cell_id"]) / "finetune.csv"
        if path.is_file():
            name = r["variant"].replace("random-init", "scratch") if r.get("baseline") else None
            frames.append(pd.read_csv(path).assign(variant=name or r["variant"], seed=r["seed"]))
    if not frames:
        return None
    data = pd.concat(frames, ignore_index=True).dropna(subset=["test_acc"])
    long = data.melt(["variant", "seed", "epoch"], ["test_acc", "test_f1_macro"], "score")
    grid = sns.relplot(
        data=long,
        x="epoch",
        y="value",
        hue="variant",
        col="score",
        kind="line",
        errorbar="sd",
        height=3.5,
        aspect=1.2,
    )
    grid.set_titles("fine-tuning: {col_name}")
    return _save(grid.figure, out / "finetune_curves.png")


def plot_binary_curves(records: list[dict[str, Any]], store: CellStore, out: Path) -> list[Path]:
    """ROC curves (linear probe) and precision/recall/F1 vs threshold, binary tasks only."""
    paths = []
    thresholds = {
        f"{r['variant']}-seed{r['seed']}": pd.read_csv(p)
        for r in records
        if (p := store.path(r["cell_id"]) / "thresholds.csv").is_file()
    }
    binary = {k: t for k, t in thresholds.items() if t["class"].nunique() == 1}
    if not binary:
        return paths
    fig, ax = plt.subplots(figsize=(7, 4))
    long = pd.concat(
        [
            t.assign(cell=k).melt(["cell", "threshold"], ["precision", "recall", "f1"])
            for k, t in binary.items()
        ]
    )
    sns.lineplot(data=long, x="threshold", y="value", hue="variable", style="cell", ax=ax)
    ax.set(title="Linear probe: precision, recall and F1 vs threshold", ylim=(0, 1.02))
    paths.append(_save(fig, out / "thresholds.png"))
    fig, ax = plt.subplots(figsize=(5, 5))
    for r in records:
        path = store.path(r["cell_id"]) / "predictions.csv"
        name = f"{r['variant']}-seed{r['seed']}"
        if name not in binary or not path.is_file():
            continue
        preds = pd.read_csv(path)
        positive = f"p_{binary[name]['class'].iloc[0]}"
        classes = [c.removeprefix("p_") for c in preds.columns if c.startswith("p_")]
        label = classes.index(positive.removeprefix("p_"))
        fpr, tpr, _ = roc_curve(preds["label"] == label, preds[positive])
        ax.plot(fpr, tpr, label=f"{name} (AUC {r['metrics'].get('lp_auc', float('nan')):.3f})")
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":")
    ax.set(title="ROC (linear probe)", xlabel="false positive rate", ylabel="true positive rate")
    ax.legend(fontsize=7)
    paths.append(_save(fig, out / "roc.png"))
    return paths


@torch.no_grad()
def plot_reconstructions(
    root: Path, records: list[dict[str, Any]], registry: Registry, out: Path, n_images: int = 8
) -> Path:
    """Original / masked / each variant's reconstruction, same images and masks for all."""
    record = read_suite_record(root)
    suite = resolve_suite(record["resolved"], registry, source=str(root / "suite.json"))
    data = suite.build_dataset().load()
    ds = suite.config.dataset
    store = CellStore(root)
    first = {}
    for r in records:  # one cell per variant: its lowest seed
        if r["variant"] not in first or r["seed"] < first[r["variant"]]["seed"]:
            first[r["variant"]] = r
    variants = [v for v in suite.variants if v.name in first]  # pretrained ones: baselines skip
    images = data.test_images[: min(n_images, len(data.test_images))]
    rows: list[tuple[str, torch.Tensor]] = []
    for variant in variants:
        r = first[variant.name]
        feeder = ImageFeeder(
            ds.image_size,
            ds.channels,
            tuple(r["data"]["mean"]),
            tuple(r["data"]["std"]),
            torch.device("cpu"),
        )
        model = variant.build_model(ds.image_size, ds.channels).eval()
        model.encoder.load_state_dict(load_file(store.path(r["cell_id"]) / "encoder.safetensors"))
        model.decoder.load_state_dict(load_file(store.path(r["cell_id"]) / "decoder.safetensors"))
        x = feeder(images)
        mask: Mask = fixed_masks(len(x), model.num_patches, suite.config.eval.reconstruction)
        pred = unpatchify(model(x, mask).pred, model.patch_size, ds.channels)
        pixel_mask = patch_mask_to_pixels(mask.mask, model.patch_size)
        truth = feeder.to_pixels(x)
        if not rows:
            rows += [("original", truth), ("masked", truth * (1 - pixel_mask) + 0.5 * pixel_mask)]
        recon = feeder.to_pixels(pred) * pixel_mask + truth * (1 - pixel_mask)
        rows.append((variant.name, recon))
    fig, axes = plt.subplots(
        len(rows), len(images), figsize=(1.2 * len(images), 1.25 * len(rows)), squeeze=False
    )
    for i, (name, batch) in enumerate(rows):
        for j in range(len(images)):
            ax = axes[i][j]
            img = batch[j].permute(1, 2, 0).numpy()
            ax.imshow(img.squeeze(-1) if img.shape[-1] == 1 else img, cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[i][0].set_ylabel(name, rotation=0, ha="right", va="center", fontsize=8)
    fig.suptitle("Reconstructions (visible patches from the input)", fontsize=9)
    return _save(fig, out / "reconstructions.png")


def render_report(root: Path, registry: Registry) -> list[Path]:
    """Rewrite the tables and every plot of a suite's results folder."""
    record = read_suite_record(root)
    store = CellStore(root)
    records = [store.load(c["cell_id"]) for c in record["cells"] if store.is_done(c["cell_id"])]
    primary = record["resolved"].get("primary_metric", "lp_acc")
    board = write_leaderboard(root, records, title=record["name"], primary=primary)
    if not records:
        return []
    out = root / "plots"
    paths = [plot_loss_curves(records, store, out)]
    if primary in board:
        paths.append(plot_leaderboard(board, primary, out))
    finetune = plot_finetune_curves(records, store, out)
    paths += [finetune] if finetune else []
    paths += plot_binary_curves(records, store, out)
    paths.append(plot_reconstructions(root, records, registry, out))
    return paths
