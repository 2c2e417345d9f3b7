"""Protocols of the linear probe checked against the official formulas (facebookresearch/mae
main_linprobe.py, util/lars.py, util/lr_sched.py), written out here as our own reference
code: the LARS update, the warmup + half-cosine schedule per step taken, the MAE lr rule,
and decision thresholds chosen on held-out training predictions, never on the test set."""

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from mae_bench_plugins.probes import (
    LinearProbeEvaluator,
    LinearProbeParams,
    MaeLars,
    linear_probe,
)
from pydantic import ValidationError


def official_lr(epoch: float, peak: float, warmup: float, epochs: float, min_lr: float) -> float:
    """util/lr_sched.py: linear warmup from 0, then half-cosine to min_lr, at a fractional
    epoch (``epoch + step / steps_per_epoch``)."""
    if epoch < warmup:
        return peak * epoch / warmup
    progress = (epoch - warmup) / (epochs - warmup)
    return min_lr + (peak - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def official_lars_step(
    params: list[torch.Tensor], grads: list[torch.Tensor], buffers: list[torch.Tensor], lr: float,
    weight_decay: float, momentum: float = 0.9, trust: float = 1e-3,
) -> None:  # fmt: skip
    """util/lars.py: matrices get weight decay, then the update is rescaled to
    trust x ||w|| / ||g + wd w||; vectors neither; then SGD with momentum (no dampening)."""
    for p, g, mu in zip(params, grads, buffers, strict=True):
        update = g.clone()
        if p.ndim > 1:
            update = update + weight_decay * p
            w_norm, u_norm = p.norm(), update.norm()
            if w_norm > 0 and u_norm > 0:
                update = update * (trust * w_norm / u_norm)
        mu.mul_(momentum).add_(update)
        p.sub_(lr * mu)


def record_lrs(monkeypatch: pytest.MonkeyPatch, optimizer: type) -> list[float]:
    """The learning rate of every optimizer step ``optimizer`` takes from now on."""
    lrs: list[float] = []
    real = optimizer.step

    def step(self, *args, **kwargs):
        lrs.append(self.param_groups[0]["lr"])
        return real(self, *args, **kwargs)

    monkeypatch.setattr(optimizer, "step", step)
    return lrs


def features(n: int, dim: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Three separable classes in ``dim`` dimensions."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 3
    return torch.randn(3, dim, generator=g)[y] * 3 + torch.randn(n, dim, generator=g), y


# ------------------------------------------------------------------- schedule (item 13)
def test_probe_schedule_counts_only_the_steps_it_takes(monkeypatch):
    """33 images in batches of 16: 16, 16 and a one-image batch BatchNorm cannot train on.
    Two steps an epoch, so the schedule ends at the last of 8 steps (lr 0.038 x peak), not
    after 12 counted steps of which 4 never ran (final lr 0.37 x peak)."""
    lrs = record_lrs(monkeypatch, torch.optim.AdamW)
    x, y = features(33)
    linear_probe(x, y, x, y, LinearProbeParams(epochs=4, batch_size=16, lr=0.1),
                 num_classes=3, seed=0)  # fmt: skip
    expected = [official_lr(step / 2, 0.1, 0, 4, 0.0) for step in range(8)]
    assert lrs == pytest.approx(expected)
    assert lrs[-1] < 0.05 * 0.1


def test_lars_probe_follows_the_official_schedule_and_lr_rule(monkeypatch):
    """blr 0.1 at a batch of 32: lr 0.0125 (blr x batch / 256), warmup from 0 over 2 epochs,
    then half-cosine to min_lr, one value per step."""
    lrs = record_lrs(monkeypatch, MaeLars)
    x, y = features(96)
    cfg = LinearProbeParams(optimizer="lars", blr=0.1, warmup_epochs=2, epochs=6,
                            batch_size=32, min_lr=1e-4)  # fmt: skip
    linear_probe(x, y, x, y, cfg, num_classes=3, seed=0)
    expected = [official_lr(step / 3, 0.1 * 32 / 256, 2, 6, 1e-4) for step in range(18)]
    assert lrs == pytest.approx(expected)


def test_blr_follows_the_batch_actually_used(monkeypatch):
    """A batch above the training set is the training set: lr = blr x 40 / 256."""
    lrs = record_lrs(monkeypatch, torch.optim.AdamW)
    x, y = features(40)
    linear_probe(x, y, x, y, LinearProbeParams(epochs=1, batch_size=512, blr=0.1),
                 num_classes=3, seed=0)  # fmt: skip
    assert lrs == pytest.approx([0.1 * 40 / 256])


def test_lr_and_blr_together_are_refused():
    with pytest.raises(ValidationError, match="lr or blr"):
        LinearProbeParams(lr=0.1, blr=0.1)
    assert LinearProbeParams(blr=0.1).blr == 0.1


# ------------------------------------------------------------------- LARS (item 13)
def test_lars_update_is_the_official_one():
    """Matrices: weight decay in the gradient, rescaled by trust x ||w|| / ||g + wd w||;
    biases: plain momentum SGD, no decay, no rescaling; five steps with momentum."""
    g = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(4, 6, generator=g), torch.randn(4, generator=g)
    ours = [weight.clone().requires_grad_(), bias.clone().requires_grad_()]
    reference = [weight.clone(), bias.clone()]
    buffers = [torch.zeros_like(weight), torch.zeros_like(bias)]
    optimizer = MaeLars(ours, weight_decay=0.05)
    for step in range(5):
        grads = [torch.randn(4, 6, generator=g), torch.randn(4, generator=g)]
        lr = 0.5 / (step + 1)
        for group in optimizer.param_groups:
            group["lr"] = lr
        for p, grad in zip(ours, grads, strict=True):
            p.grad = grad.clone()
        optimizer.step()
        official_lars_step(reference, grads, buffers, lr, weight_decay=0.05)
    for p, expected in zip(ours, reference, strict=True):
        assert torch.allclose(p.detach(), expected, atol=1e-6)


def test_lars_probe_learns_separable_features():
    """LARS moves each matrix by lr x 0.001 x ||w|| a step: 200 images need a blr far above
    the official 0.1 (tuned for 1.28M ImageNet images) to learn in 20 epochs."""
    x, y = features(300, dim=16)
    cfg = LinearProbeParams(optimizer="lars", blr=20, warmup_epochs=2, epochs=20, batch_size=32)
    out, _ = linear_probe(x[:200], y[:200], x[200:], y[200:], cfg, num_classes=3, seed=0)
    assert out["lp_acc"] > 0.9


# ------------------------------------------------------------------- thresholds (item 8)
def binary_probe_context(train_x, train_y, test_x, test_y, seed: int = 0) -> SimpleNamespace:
    """What LinearProbeEvaluator.evaluate reads of a binary cell."""
    data = SimpleNamespace(
        train_labels=train_y, test_labels=test_y, num_classes=2,
        class_names=["negative", "positive"], positive_class=1,
    )  # fmt: skip
    features = SimpleNamespace(get=lambda pool: (train_x, test_x))
    return SimpleNamespace(data=data, features=features, seed=seed, thresholds=[0.5])


def test_thresholds_on_random_features_report_no_skill():
    """Features carry nothing about the labels: the Youden J reported on the test set must
    average about 0 (0.005 +- 0.006 here; choosing the threshold on the test set itself
    averaged 0.08)."""
    evaluator = LinearProbeEvaluator(LinearProbeParams(epochs=3, batch_size=64))
    youden = []
    for draw in range(60):
        g = torch.Generator().manual_seed(draw)
        train_x, test_x = torch.randn(60, 4, generator=g), torch.randn(200, 4, generator=g)
        train_y, test_y = torch.arange(60) % 2, torch.randperm(200, generator=g) % 2
        scores = evaluator.evaluate(binary_probe_context(train_x, train_y, test_x, test_y, draw))
        youden.append(scores.metrics["lp_youden_j"])
    assert abs(np.mean(youden)) < 0.03


def test_thresholds_are_chosen_without_the_test_labels():
    """Shuffling the test labels changes what the thresholds score, not where they are."""
    x, y = features(160, dim=4, seed=1)
    y = (y == 0).long()
    evaluator = LinearProbeEvaluator(LinearProbeParams(epochs=5, batch_size=32))
    shuffled = y[80:][torch.randperm(80, generator=torch.Generator().manual_seed(0))]
    first = evaluator.evaluate(binary_probe_context(x[:80], y[:80], x[80:], y[80:])).metrics
    second = evaluator.evaluate(binary_probe_context(x[:80], y[:80], x[80:], shuffled)).metrics
    for key in ("lp_best_f1_threshold", "lp_youden_threshold"):
        assert first[key] == second[key] and 0 <= first[key] <= 1
    assert first["lp_youden_j"] > 0.8 > second["lp_youden_j"]
    again = evaluator.evaluate(binary_probe_context(x[:80], y[:80], x[80:], y[80:])).metrics
    np.testing.assert_equal(again, first)  # deterministic per seed (NaN equal to NaN)


def test_no_thresholds_without_two_training_images_of_each_class():
    x, y = features(40, dim=4)
    train_y = torch.zeros(20, dtype=torch.long)
    train_y[0] = 1  # a single positive training image: nothing to hold out
    test_y = (y[20:] == 0).long()
    evaluator = LinearProbeEvaluator(LinearProbeParams(epochs=2))
    result = evaluator.evaluate(binary_probe_context(x[:20], train_y, x[20:], test_y))
    assert all(math.isnan(result.metrics[f"lp_{k}"]) for k in ("best_f1_threshold", "youden_j"))
    assert "no decision thresholds" in " ".join(result.sanity["warnings"])
    assert "thresholds_chosen_on" not in result.sanity


def test_held_out_thresholds_score_the_test_set_at_the_chosen_threshold():
    from mae_bench_plugins.probes import held_out_thresholds

    choose_y = np.array([0, 0, 0, 1, 1, 1])
    choose_scores = np.array([0.1, 0.2, 0.3, 0.6, 0.7, 0.8])  # any threshold in (0.3, 0.6]
    test_y = np.array([0, 1, 1, 0])
    test_scores = np.array([0.7, 0.65, 0.2, 0.1])  # at 0.6: one TP, one FP, one FN, one TN
    best = held_out_thresholds(choose_y, choose_scores, test_y, test_scores)
    assert best["best_f1_threshold"] == pytest.approx(0.6)
    assert best["youden_threshold"] == pytest.approx(0.6)
    assert best["best_f1"] == pytest.approx(0.5)
    assert best["youden_j"] == pytest.approx(0.0)


@pytest.mark.parametrize("suite", ["stl10.yaml", "stl10_vitb.yaml"])
def test_stl10_suites_probe_with_the_official_recipe(suite):
    import yaml

    from tests.conftest import ROOT

    raw = yaml.safe_load((ROOT / "suites" / suite).read_text())["eval"]["linear_probe"]
    cfg = LinearProbeParams(**raw)
    assert (cfg.optimizer, cfg.blr, cfg.epochs, cfg.warmup_epochs) == ("lars", 0.1, 90, 10)
    assert cfg.weight_decay == 0 and cfg.min_lr == 0 and cfg.batch_size == 16384
