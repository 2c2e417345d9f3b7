"""The probes (plugins/probes.py): the linear probe and k-NN on frozen features."""

import warnings
from types import SimpleNamespace

import pytest
import torch
from mae_bench_plugins.probes import (
    KNNEvaluator,
    KNNParams,
    LinearProbeEvaluator,
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
    data = SimpleNamespace(
        train_labels=labels, test_labels=labels[:6], num_classes=2, class_names=["a", "b"]
    )
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


# ------------------------------------------------------------------- sanity (issue 17, 18)
def classifier_context(train_y, test_y, *, dim: int = 4, signal: float = 0.0, seed: int = 0):
    """What the probes read of a cell: features that carry ``signal`` about the labels."""
    g = torch.Generator().manual_seed(seed)
    num_classes = int(max(train_y.max(), test_y.max())) + 1
    centers = torch.randn(num_classes, dim, generator=g) * signal
    train_x = centers[train_y] + torch.randn(len(train_y), dim, generator=g)
    test_x = centers[test_y] + torch.randn(len(test_y), dim, generator=g)
    data = SimpleNamespace(
        train_labels=train_y, test_labels=test_y, num_classes=num_classes,
        class_names=[f"c{k}" for k in range(num_classes)], positive_class=None,
    )  # fmt: skip
    features = SimpleNamespace(get=lambda pool: (train_x, test_x))
    return SimpleNamespace(data=data, features=features, seed=seed, thresholds=[0.5])


@pytest.mark.parametrize(
    ("evaluator", "acc"),
    [
        (LinearProbeEvaluator(LinearProbeParams(epochs=3)), "lp_acc"),
        (KNNEvaluator(KNNParams(k=5)), "knn_acc"),
    ],
)
def test_probes_store_sizes_chance_and_resolution_and_warn_on_a_small_test_set(evaluator, acc):
    """40 training and 30 test images (18 of class 0): chance is the majority share 0.6, one
    image moves the accuracy by 1/30, and 6 images of class 2 cannot separate variants."""
    train_y = torch.arange(40) % 3
    test_y = torch.tensor([0] * 18 + [1] * 6 + [2] * 6)
    result = evaluator.evaluate(classifier_context(train_y, test_y))
    sanity = result.sanity
    assert {k: sanity[k] for k in ("n_train", "n_test", "num_classes")} == {
        "n_train": 40, "n_test": 30, "num_classes": 3,
    }  # fmt: skip
    assert sanity["chance"] == pytest.approx(0.6)
    assert sanity["resolution"] == pytest.approx(1 / 30)
    warned = " ".join(sanity["warnings"])
    assert "30 test images" in warned and "1/30" in warned
    assert "c1 and c2 have 6 test images" in warned
    assert result.metrics[acc] <= 0.6 and f"{acc} " in warned and "chance" in warned


def test_probes_on_a_large_balanced_test_set_warn_of_nothing():
    train_y, test_y = torch.arange(150) % 3, torch.arange(300) % 3
    for evaluator in (
        LinearProbeEvaluator(LinearProbeParams(epochs=10)),
        KNNEvaluator(KNNParams()),
    ):
        result = evaluator.evaluate(classifier_context(train_y, test_y, signal=4.0))
        assert result.sanity["warnings"] == []
        assert result.sanity["resolution"] == pytest.approx(1 / 300)
        assert result.sanity["chance"] == pytest.approx(1 / 3)


def test_probe_metrics_declare_their_range_and_what_is_compared():
    lp = LinearProbeEvaluator(LinearProbeParams()).metrics()
    knn = KNNEvaluator(KNNParams()).metrics()
    for name in ("lp_acc", "lp_f1_macro", "lp_auc", "lp_train_acc", "lp_best_f1", "knn_acc",
                 "knn_auc", "knn_recall_macro"):  # fmt: skip
        assert {**lp, **knn}[name].bounds == (0, 1), name
    assert lp["lp_youden_j"].bounds == (-1, 1)
    for name in ("lp_train_acc", "lp_best_f1_threshold", "lp_youden_threshold"):
        assert lp[name].compare is False, name  # a diagnostic and the thresholds' positions
    assert lp["lp_acc"].compare and lp["lp_youden_j"].compare
