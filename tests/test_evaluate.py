"""Evaluation helpers (mae_bench/evaluate.py): frozen features extracted once per pooling,
the fixed evaluation sample and masks."""

import pytest
import torch

from mae_bench.data import ImageFeeder
from mae_bench.evaluate import FeatureCache, evaluation_sample, extract_features, fixed_masks
from mae_bench.suite import resolve_suite
from tests.conftest import tiny_suite_data


def test_fixed_masks_identical_across_calls():
    a, b = fixed_masks(10, 16, 0.75, seed=3), fixed_masks(10, 16, 0.75, seed=3)
    assert torch.equal(a.mask, b.mask) and torch.all(a.mask.sum(1) == 12)


def test_features_are_extracted_once_per_pooling_and_not_trained(registry):
    suite = resolve_suite(tiny_suite_data(), registry)
    ds = suite.build_dataset().load()
    feeder = ImageFeeder.fit(ds.pretrain, image_size=16, channels=3, device=torch.device("cpu"))
    torch.manual_seed(0)
    model = suite.variants[1].build_model(16, 3)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    extracted = []  # (pool, images) of every forward_features call
    real = model.forward_features

    def counting(x, pool):
        extracted.append((pool, len(x)))
        return real(x, pool)

    model.forward_features = counting
    cache = FeatureCache(model, ds, feeder)
    train, test = cache.get("cls")
    images = len(ds.train_images) + len(ds.test_images)
    assert sum(n for _, n in extracted) == images  # every image once, train and test
    again = cache.get("cls")
    assert again[0] is train and again[1] is test  # the same tensors, not extracted again
    assert sum(n for _, n in extracted) == images
    mean = cache.get("mean")  # another pooling: extracted once more
    assert sum(n for pool, n in extracted if pool == "mean") == images
    model.forward_features = real
    # what a direct extraction gives, frozen and on the CPU
    assert torch.equal(train, extract_features(model, ds.train_images, feeder, "cls"))
    assert torch.equal(test, extract_features(model, ds.test_images, feeder, "cls"))
    assert torch.equal(mean[1], extract_features(model, ds.test_images, feeder, "mean"))
    assert not torch.equal(mean[1], test)
    assert test.shape == (len(ds.test_images), 32) and not test.requires_grad
    assert test.device.type == "cpu" and test.dtype == torch.float32
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in weights.items())  # untrained


def test_evaluation_sample_is_stratified_and_fixed():
    labels = torch.arange(5).repeat_interleave(40)  # sorted by class, as an image folder
    a = evaluation_sample(labels, 50, seed=0)
    assert torch.bincount(labels[a], minlength=5).tolist() == [10] * 5
    assert torch.equal(a, evaluation_sample(labels, 50, seed=0))
    assert not torch.equal(a, evaluation_sample(labels, 50, seed=1))
    assert torch.equal(evaluation_sample(labels, 500), torch.arange(200))


def test_classifier_sanity_names_small_and_absent_classes():
    from mae_bench.evaluate import classifier_sanity

    test = torch.tensor([0] * 150 + [1] * 7 + [2] * 3)
    sanity = classifier_sanity(
        torch.arange(40) % 4, test, 4, class_names=["cat", "dog", "fox", "owl"],
        accuracy=("knn_acc", 0.95),
    )  # fmt: skip
    assert sanity["chance"] == pytest.approx(150 / 160)
    assert sanity["resolution"] == pytest.approx(1 / 160) and sanity["n_train"] == 40
    assert sanity["warnings"] == [
        "dog and fox have 7 and 3 test images (fewer than 10): one image moves a class's "
        "recall by 1/7 or more",
        "owl has no test images: left out of the macro averages",
    ]  # 160 test images: fine; 0.95 beats chance 0.9375
    below = classifier_sanity(torch.arange(4), test, 4, accuracy=("lp_acc", 0.9))
    assert below["warnings"][-1] == (
        "lp_acc 0.900 is no better than chance 0.938 (always predicting the test set's "
        "majority class)"
    )
