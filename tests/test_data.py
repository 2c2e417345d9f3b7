"""The data path (mae_bench/data.py): the ImageFeeder's resizing and normalisation, batched
augmentation on the device, crop sampling as torchvision's, and concatenated image sets."""

import pytest
import torch
from scipy.stats import ks_2samp

from mae_bench.data import ConcatImages, ImageFeeder, sample_crops
from mae_bench.suite import AugmentConfig


def load(registry, name, **params):
    info = registry.get("dataset", name, "dataset")
    return info.cls(info.cls.Params(**params)).load()


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
    images = torch.randint(0, 256, (4, 3, 24, 24), dtype=torch.uint8)
    cfg = AugmentConfig(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0))
    out = _feeder(24).augment(images, cfg, torch.Generator().manual_seed(0))
    assert torch.allclose(out, images.float() / 255, atol=1e-6)


def test_batched_augment_flip_and_crop():
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
    img = torch.zeros(64, 1, 32, 32, dtype=torch.uint8)
    img[..., 16:] = 255
    out = _feeder(8, channels=1).augment(
        img, AugmentConfig(crop_scale=(0.05, 0.2)), torch.Generator().manual_seed(0)
    )
    left, right = out[..., :4].mean(dim=(1, 2, 3)), out[..., 4:].mean(dim=(1, 2, 3))
    assert torch.all(left <= right + 1e-6)
    assert (out.amax(dim=(1, 2, 3)) < 0.01).any() and (out.amin(dim=(1, 2, 3)) > 0.99).any()


def test_crop_boxes_follow_torchvision_random_resized_crop():
    from torchvision.transforms import RandomResizedCrop

    n, (h, w), scale, ratio = 4000, (96, 80), (0.2, 1.0), (3 / 4, 4 / 3)
    x0, y0, cw, ch = sample_crops(n, h, w, scale, ratio, torch.Generator().manual_seed(0))
    assert torch.all((x0 >= 0) & (x0 + cw <= w) & (y0 >= 0) & (y0 + ch <= h))
    assert torch.equal(cw, cw.round()) and torch.equal(x0, x0.round())
    torch.manual_seed(1)
    image = torch.zeros(3, h, w)
    ref = torch.tensor([RandomResizedCrop.get_params(image, scale, ratio) for _ in range(n)])
    ref_h, ref_w = ref[:, 2].float(), ref[:, 3].float()
    ours_area, ref_area = (cw * ch / (h * w)).numpy(), (ref_w * ref_h / (h * w)).numpy()
    assert ks_2samp(ours_area, ref_area).pvalue > 0.001
    assert ks_2samp(torch.log(cw / ch).numpy(), torch.log(ref_w / ref_h).numpy()).pvalue > 0.001
    full_ours = ((cw == w) | (ch == h)).float().mean().item()
    full_ref = ((ref_w == w) | (ref_h == h)).float().mean().item()
    assert full_ours == pytest.approx(full_ref, abs=0.02)
    # the centre-crop fallback when nothing fits: the whole image at the nearest ratio
    x0, y0, cw, ch = sample_crops(8, 10, 40, (1.0, 1.0), (1.0, 1.0))
    assert cw.tolist() == [10.0] * 8 and ch.tolist() == [10.0] * 8 and x0.tolist() == [15.0] * 8


def test_concat_images_indexing():
    a, b = torch.arange(6).view(3, 2), torch.arange(10, 18).view(4, 2)
    cat = ConcatImages(a, b)
    assert len(cat) == 7 and cat.shape == (7, 2)
    assert torch.equal(cat[torch.tensor([6, 0, 3, 2])], torch.cat([a, b])[[6, 0, 3, 2]])
    assert torch.equal(cat[1:5], torch.cat([a, b])[1:5])
