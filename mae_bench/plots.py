"""``mae-bench report``: tables and plots regenerated from stored results, no retraining.

Plots (PNG, under ``<out>/<suite>/plots/``): pretraining loss curves, the leaderboard bar
chart with 95% intervals, reconstruction grids (same images, same masks for every variant),
fine-tuning curves (pretrained vs scratch), a t-SNE of frozen features (the best variant vs
a random init), ROC curves and precision/recall/F1 vs the threshold.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
import torch
from sklearn.metrics import roc_curve

from mae_bench.checkpoints import load_weights
from mae_bench.contract import ImageData, Mask, MaskedAutoencoder
from mae_bench.data import ImageFeeder
from mae_bench.errors import MaeBenchWarning, UserError
from mae_bench.evaluate import evaluation_sample, extract_features, fixed_masks, reconstruct
from mae_bench.layers import patch_mask_to_pixels
from mae_bench.leaderboard import scratch_name, write_leaderboard
from mae_bench.metrics import roc_auc
from mae_bench.plan import baseline_variants
from mae_bench.plugins import Registry
from mae_bench.results import (
    CellStore,
    evaluations,
    read_suite_record,
    read_table,
    suite_cells,
)
from mae_bench.suite import Suite, resolve_suite


def lowest_seed_cells(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """One record per variant: the cell with its lowest seed, in record order."""
    first: dict[str, dict[str, Any]] = {}
    for r in records:
        if r["variant"] not in first or r["seed"] < first[r["variant"]]["seed"]:
            first[r["variant"]] = r
    return first


def _save(fig: plt.Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120, bbox_inches="tight")
    plt.close(fig)
    tmp.replace(path)
    return path


def plot_loss_curves(records: list[dict[str, Any]], store: CellStore, out: Path) -> Path | None:
    """Pretraining loss per epoch, one line per variant (band: spread over seeds)."""
    frames = []
    for r in records:
        if r.get("baseline"):
            continue
        path = store.path(r["cell_id"]) / "history.csv"
        history = read_table(path)
        if history is None or "loss" not in history:
            if history is not None or not path.exists():
                warnings.warn(f"{path}: no loss history: skipped", MaeBenchWarning, 2)
            continue
        frames.append(history.assign(variant=r["variant"], seed=r["seed"]))
    if not frames:
        return None
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
        path = store.table_path(r, "finetune")
        table = read_table(path) if path else None
        if table is not None:
            name = scratch_name(r["variant"]) if r.get("baseline") else r["variant"]
            frames.append(table.assign(variant=name, seed=r["seed"]))
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


def plot_roc_and_thresholds(
    records: list[dict[str, Any]], store: CellStore, out: Path
) -> list[Path]:
    """ROC curves and precision/recall/F1 vs threshold of the evaluator that stores test-set
    ``predictions`` and ``thresholds`` tables (the linear probe), one line per variant
    (lowest seed). Binary tasks use the positive class; multi-class tasks the
    micro-averaged one-vs-rest ROC and the class-averaged threshold curves."""
    with_predictions = [r for r in records if store.table_path(r, "predictions")]
    first = lowest_seed_cells(with_predictions)
    if not first:
        return []
    fig_t, ax_t = plt.subplots(figsize=(7, 4))
    fig_r, ax_r = plt.subplots(figsize=(5, 5))
    frames = []
    source = "classifier"
    for name, r in first.items():
        source = next(
            (e for e, ev in evaluations(r) if "predictions" in ev["tables"]),
            source,
        )
        preds = read_table(store.table_path(r, "predictions"))
        thresholds = store.table_path(r, "thresholds")
        table = read_table(thresholds) if thresholds else None
        if preds is None or table is None:
            continue
        probs = preds.filter(like="p_").to_numpy()
        classes = [c.removeprefix("p_") for c in preds.columns if c.startswith("p_")]
        if table["class"].nunique() == 1:  # binary: the positive class
            k = classes.index(str(table["class"].iloc[0]))
            fpr, tpr, _ = roc_curve(preds["label"] == k, probs[:, k])
        else:  # micro-average over classes, one-vs-rest
            onehot = np.eye(len(classes))[preds["label"].to_numpy()]
            fpr, tpr, _ = roc_curve(onehot.ravel(), probs.ravel())
        auc = roc_auc(preds["label"].to_numpy(), probs)
        ax_r.plot(fpr, tpr, label=f"{name} (AUC {auc:.3f})")
        curves = table.groupby("threshold")[["precision", "recall", "f1"]].mean().reset_index()
        frames.append(curves.melt("threshold", var_name="score").assign(variant=name))
    if not frames:
        plt.close(fig_r)
        plt.close(fig_t)
        return []
    ax_r.plot([0, 1], [0, 1], color="grey", linestyle=":")
    ax_r.set(title=f"ROC ({source})", xlabel="false positive rate", ylabel="true positive rate")
    ax_r.legend(fontsize=7)
    sns.lineplot(
        data=pd.concat(frames), x="threshold", y="value", hue="variant", style="score", ax=ax_t
    )
    ax_t.set(title=f"{source}: precision, recall and F1 vs threshold", ylim=(0, 1.02))
    ax_t.legend(fontsize=7, bbox_to_anchor=(1.02, 1), loc="upper left")
    return [_save(fig_r, out / "roc.png"), _save(fig_t, out / "thresholds.png")]


@dataclass
class StoredModels:
    """A suite's dataset and, per variant (lowest seed), its stored model and feeder."""

    suite: Suite
    data: ImageData
    models: dict[str, tuple[MaskedAutoencoder, ImageFeeder, dict[str, Any]]]


def load_stored_models(
    root: Path, records: list[dict[str, Any]], registry: Registry
) -> StoredModels:
    """Rebuild every variant's model (baselines included) from its stored weights."""
    record = read_suite_record(root)
    suite = resolve_suite(record["resolved"], registry, source=str(root / "suite.json"))
    data = suite.build_dataset().load()
    ds = suite.config.dataset
    store = CellStore(root)
    first = lowest_seed_cells(records)
    models = {}
    for variant in [*suite.variants, *baseline_variants(suite)]:
        if variant.name not in first:
            continue
        r = first[variant.name]
        mean, std = tuple(r["data"]["mean"]), tuple(r["data"]["std"])
        feeder = ImageFeeder(ds.image_size, ds.channels, mean, std, torch.device("cpu"))
        model = variant.build_model(ds.image_size, ds.channels).eval()
        try:
            load_weights(model, store.path(r["cell_id"]))
        except UserError as exc:
            warnings.warn(f"damaged weights: {exc}: {variant.name} skipped", MaeBenchWarning, 2)
            continue
        models[variant.name] = (model, feeder, r)
    return StoredModels(suite, data, models)


@torch.no_grad()
def plot_reconstructions(stored: StoredModels, out: Path, n_images: int = 10) -> Path | None:
    """Original / masked / each variant's reconstruction, same images and masks for all.

    The images are a fixed-seed stratified sample of the test set (one of every class where
    ``n_images`` allows); predictions are mapped to pixels by the variant's own loss
    (``Loss.to_input_space``: ``norm_pix`` predictions are de-normalised from visible
    patches only)."""
    recon = stored.suite.eval_config.get("reconstruction", {})  # its masks, if it ran
    ratio, seed = recon.get("mask_ratio", 0.75), recon.get("mask_seed", 0)
    sample = evaluation_sample(stored.data.test_labels, n_images, seed)
    images = stored.data.test_images[sample]
    variants = {v.name: v for v in stored.suite.variants}
    rows: list[tuple[str, torch.Tensor]] = []
    for name, (model, feeder, record) in stored.models.items():
        if record.get("baseline"):
            continue
        x = feeder(images)
        mask: Mask = fixed_masks(len(x), model.num_patches, ratio, seed)
        pred = reconstruct(model, x, mask, variants[name].decoder_loss())
        pixel_mask = patch_mask_to_pixels(mask.mask, model.patch_size)
        truth = feeder.to_pixels(x)
        if not rows:
            rows += [("original", truth), ("masked", truth * (1 - pixel_mask) + 0.5 * pixel_mask)]
        recon = feeder.to_pixels(pred) * pixel_mask + truth * (1 - pixel_mask)
        rows.append((name, recon))
    if not rows:
        return None
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


def plot_tsne(stored: StoredModels, best: str, out: Path, max_points: int = 2000) -> Path:
    """t-SNE of frozen test-set features, coloured by label: ``best`` vs a random init.

    The random init is the suite's stored ``random-init`` baseline for the same encoder when
    there is one, else the same architecture freshly initialised with the cell's seed.
    """
    from sklearn.manifold import TSNE

    model, feeder, record = stored.models[best]
    variant = next(v for v in stored.suite.variants if v.name == best)
    random_init = next(
        (
            m
            for name, (m, _, r) in stored.models.items()
            if r.get("baseline") and r["config"]["variant"]["encoder"] == variant.encoder.config
        ),
        None,
    )
    if random_init is None:
        torch.manual_seed(record["seed"])
        ds = stored.suite.config.dataset
        random_init = variant.build_model(ds.image_size, ds.channels).eval()
    sample = evaluation_sample(stored.data.test_labels, max_points)
    images = stored.data.test_images[sample]
    labels = stored.data.test_labels[sample].numpy()
    settings = stored.suite.eval_config.values()
    pools = [c["pool"] for c in settings if isinstance(c, dict) and "pool" in c]
    pool = pools[0] if pools else "mean"  # as the first probe reads the features
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.5))
    for ax, (title, m) in zip(axes, ((best, model), ("random init", random_init)), strict=True):
        feats = extract_features(m, images, feeder, pool).numpy()
        perplexity = min(30.0, (len(feats) - 1) / 3)
        xy = TSNE(perplexity=perplexity, init="pca", random_state=0).fit_transform(feats)
        names = np.array(stored.data.class_names)[labels]
        sns.scatterplot(x=xy[:, 0], y=xy[:, 1], hue=names, s=10, ax=ax, legend=ax is axes[1])
        ax.set(title=f"t-SNE of frozen features: {title}", xticks=[], yticks=[])
    if axes[1].get_legend():
        axes[1].legend(fontsize=7, markerscale=1.5, bbox_to_anchor=(1.02, 1), loc="upper left")
    return _save(fig, out / "tsne.png")


def render_report(root: Path, registry: Registry) -> tuple[list[Path], Path]:
    """Rewrite the tables, every plot and the self-contained ``report.html`` that embeds
    them; returns the plots and the page."""
    from mae_bench.page import render_page

    record = read_suite_record(root)
    store = CellStore(root)
    records = list(store.finished(suite_cells(record), repair=False).values())
    primary = record["resolved"].get("primary_metric", "lp_acc")
    reference = record["resolved"].get("reference")
    board, _ = write_leaderboard(root, records, record["name"], primary, reference)
    plots = draw_plots(root, records, board, primary, registry) if records else []
    return plots, render_page(root, record, records, board, plots)


def draw_plots(
    root: Path, records: list[dict[str, Any]], board: pd.DataFrame, primary: str, registry: Registry
) -> list[Path]:
    """Every plot of a suite's finished cells, under ``root/plots``."""
    store = CellStore(root)
    out = root / "plots"
    losses = plot_loss_curves(records, store, out)
    paths = [losses] if losses else []
    if primary in board:
        paths.append(plot_leaderboard(board, primary, out))
    finetune = plot_finetune_curves(records, store, out)
    paths += [finetune] if finetune else []
    paths += plot_roc_and_thresholds(records, store, out)
    stored = load_stored_models(root, records, registry)
    grid = plot_reconstructions(stored, out)
    paths += [grid] if grid else []
    pretrained = [
        n
        for n in board["variant"]
        if n in stored.models and not stored.models[n][2].get("baseline")
    ]
    if pretrained:  # the board is ranked: the first pretrained variant is the best
        paths.append(plot_tsne(stored, pretrained[0], out))
    return paths
