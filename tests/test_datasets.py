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


def _feeder(size, channels=3):
    return ImageFeeder(size, channels, (0.0,) * channels, (1.0,) * channels, torch.device("cpu"))


def test_batched_augment_identity_crop_is_exact():
    from mae_bench.suite import AugmentConfig

    images = torch.randint(0, 256, (4, 3, 24, 24), dtype=torch.uint8)
    cfg = AugmentConfig(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0))
    out = _feeder(24).augment(images, cfg, torch.Generator().manual_seed(0))
    assert torch.allclose(out, images.float() / 255, atol=1e-6)


def test_batched_augment_flip_and_crop():
    from mae_bench.suite import AugmentConfig

    images = torch.randint(0, 256, (32, 3, 20, 20), dtype=torch.uint8)
    flipped = _feeder(20).augment(images, AugmentConfig(hflip=True), torch.Generator())
    plain = images.float() / 255
    is_flip = [torch.equal(o, p.flip(-1)) for o, p in zip(flipped, plain, strict=True)]
    is_same = [torch.equal(o, p) for o, p in zip(flipped, plain, strict=True)]
    assert all(f or s for f, s in zip(is_flip, is_same, strict=True))
    assert 4 < sum(is_flip) < 28
    cfg = AugmentConfig(crop_scale=(0.2, 1.0), hflip=True)
    a = _feeder(12).augment(images, cfg, torch.Generator().manual_seed(1))
    b = _feeder(12).augment(images, cfg, torch.Generator().manual_seed(1))
    c = _feeder(12).augment(images, cfg, torch.Generator().manual_seed(2))
    assert a.shape == (32, 3, 12, 12) and torch.equal(a, b) and not torch.equal(a, c)
    assert a.min() >= 0 and a.max() <= 1


def test_crop_takes_the_right_region():
    """A crop of a left-dark/right-bright image is dark, bright or mixed, never inverted."""
    from mae_bench.suite import AugmentConfig

    img = torch.zeros(64, 1, 32, 32, dtype=torch.uint8)
    img[..., 16:] = 255
    out = _feeder(8, channels=1).augment(
        img, AugmentConfig(crop_scale=(0.05, 0.2)), torch.Generator().manual_seed(0)
    )
    left, right = out[..., :4].mean(dim=(1, 2, 3)), out[..., 4:].mean(dim=(1, 2, 3))
    assert torch.all(left <= right + 1e-6)
    assert (out.amax(dim=(1, 2, 3)) < 0.01).any() and (out.amin(dim=(1, 2, 3)) > 0.99).any()
