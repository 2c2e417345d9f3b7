import torch

from mae_bench.data import ImageFeeder


def load(registry, name, **params):
    info = registry.get("dataset", name, "dataset")
    return info.cls(info.cls.Params(**params)).load()


def test_digits_is_real_and_split_stratified(registry):
    data = load(registry, "digits")
    assert data.train_images.shape[1:] == (1, 8, 8) and data.train_images.dtype == torch.uint8
    assert len(data.train_images) + len(data.test_images) == 1797
    assert len(data.test_images) == 360
    assert data.num_classes == 10
    counts = torch.bincount(data.test_labels, minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37  # stratified
    assert torch.equal(data.pretrain, data.train_images)  # no test images in pretraining
    assert int(data.train_images.max()) == 255


def test_synthetic_is_deterministic_and_sized(registry):
    a = load(registry, "synthetic", size=12, color=False, n_pretrain=10, n_train=20, n_test=6)
    b = load(registry, "synthetic", size=12, color=False, n_pretrain=10, n_train=20, n_test=6)
    assert a.pretrain.shape == (10, 1, 12, 12)
    assert torch.equal(a.train_images, b.train_images)
    assert torch.equal(a.test_labels, b.test_labels)
    assert int(a.train_labels.max()) < 4


def test_feeder_resizes_replicates_and_normalizes(registry):
    data = load(registry, "digits")
    feeder = ImageFeeder.fit(data.pretrain, image_size=16, channels=3, device=torch.device("cpu"))
    x = feeder(data.pretrain)
    assert x.shape == (len(data.pretrain), 3, 16, 16)
    assert torch.allclose(x.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-4)
    assert torch.allclose(x.std(dim=(0, 2, 3)), torch.ones(3), atol=1e-3)
    assert torch.equal(x[:, 0], x[:, 2])
    pixels = feeder.to_pixels(x)
    assert pixels.min() >= 0 and pixels.max() <= 1
    assert torch.allclose(pixels, feeder.pixels(data.pretrain), atol=1e-5)
