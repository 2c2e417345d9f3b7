"""The probes (plugins/probes.py): the linear probe and k-NN on frozen features."""

import warnings
from types import SimpleNamespace

import pytest
import torch
from mae_bench_plugins.probes import (
    KNNEvaluator,
    KNNParams,
    LinearProbeParams,
    knn_classify,
    linear_probe,
)

from mae_bench.errors import MaeBenchWarning


def test_linear_probe_separates_separable_features():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(3, 16, generator=g) * 3
    y = torch.randint(3, (300,), generator=g)
    x = centers[y] + torch.randn(300, 16, generator=g)
    out, probs = linear_probe(
        x[:200], y[:200], x[200:], y[200:], LinearProbeParams(epochs=30), num_classes=3, seed=0
    )
    assert out["lp_acc"] > 0.95
    assert probs.shape == (100, 3) and torch.allclose(probs.sum(1), torch.ones(100))
    assert out["lp_acc"] == (probs.argmax(1) == y[200:]).float().mean().item()
    noise, _ = linear_probe(
        torch.randn(200, 16),
        y[:200],
        torch.randn(100, 16),
        y[200:],
        LinearProbeParams(epochs=30),
        num_classes=3,
        seed=0,
    )
    assert noise["lp_acc"] < 0.6


def test_linear_probe_normalises_test_features_with_exact_training_statistics():
    """Features far from zero, a short probe: momentum-averaged running statistics would
    still sit near zero and put every test feature on one side of the boundary."""
    g = torch.Generator().manual_seed(0)
    y = torch.randint(2, (400,), generator=g)
    x = 100.0 + torch.randn(400, 4, generator=g) * 0.1
    x[:, 0] += 0.3 * (2 * y - 1)
    out, _ = linear_probe(
        x[:300], y[:300], x[300:], y[300:], LinearProbeParams(epochs=2, batch_size=50),
        num_classes=2, seed=0,
    )  # fmt: skip
    assert out["lp_acc"] > 0.9


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


def test_knn_votes_are_stable_at_tiny_temperatures():
    g = torch.Generator().manual_seed(0)
    train, test = torch.randn(50, 8, generator=g), torch.randn(10, 8, generator=g)
    labels = torch.randint(3, (50,), generator=g)
    probs = knn_classify(train, labels, test, num_classes=3, k=5, temperature=0.001)
    assert torch.isfinite(probs).all() and torch.allclose(probs.sum(1), torch.ones(10))
    nearest = (torch.nn.functional.normalize(test, dim=1)
               @ torch.nn.functional.normalize(train, dim=1).T).argmax(1)  # fmt: skip
    assert torch.equal(probs.argmax(1), labels[nearest])


def test_knn_k_above_the_training_set_is_warned_and_every_image_votes():
    g = torch.Generator().manual_seed(0)
    train_x, test_x = torch.randn(10, 4, generator=g), torch.randn(6, 4, generator=g)
    labels = torch.arange(10) % 2
    features = SimpleNamespace(get=lambda pool: (train_x, test_x))
    data = SimpleNamespace(train_labels=labels, test_labels=labels[:6], num_classes=2)
    ctx = SimpleNamespace(data=data, features=features)
    with pytest.warns(MaeBenchWarning) as caught:
        many = KNNEvaluator(KNNParams(k=50)).evaluate(ctx)
    assert [str(w.message) for w in caught] == [
        "eval.knn.k: 50 is more than the 10 training images: all 10 vote (k = 10)"
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # k within the training set: no warning
        every = KNNEvaluator(KNNParams(k=10)).evaluate(ctx)
    assert many.metrics == every.metrics
