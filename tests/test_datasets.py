"""The built-in datasets: digits and synthetic (plugins/datasets.py), and STL-10, CIFAR and
image folders (stl10.py, cifar.py, imagefolder.py) read from tiny files in the exact official
formats, images of every mode, symlinked class folders and a damaged decode cache."""

import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from mae_bench_plugins.imagefolder import cached_images, decode, discover, to_rgb
from PIL import Image

from mae_bench.data import ConcatImages
from mae_bench.errors import MaeBenchWarning, UserError
from tests.formats import write_cifar10, write_cifar100, write_imagefolder, write_stl10


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


@pytest.fixture
def stl10_root(tmp_path):
    return tmp_path, write_stl10(tmp_path)


def test_stl10_matches_torchvision_reader(registry, stl10_root, monkeypatch):
    root, truth = stl10_root
    data = load(registry, "stl10", root=str(root))
    monkeypatch.setattr(torchvision.datasets.STL10, "_check_integrity", lambda self: True)
    for split in ("train", "test"):
        ref = torchvision.datasets.STL10(str(root), split=split)
        ours = getattr(data, f"{split}_images")
        assert torch.equal(ours, torch.from_numpy(ref.data))
        assert torch.equal(getattr(data, f"{split}_labels"), torch.from_numpy(ref.labels).long())
        assert torch.equal(ours, torch.from_numpy(truth[f"{split}_x"]))
    assert torch.equal(data.pretrain, torch.from_numpy(truth["unlabeled_x"]))
    assert data.class_names[0] == "airplane" and data.num_classes == 10


def test_stl10_splits_and_folds(registry, stl10_root):
    root, truth = stl10_root
    both = load(registry, "stl10", root=str(root), pretrain_split="train+unlabeled")
    assert isinstance(both.pretrain, ConcatImages) and len(both.pretrain) == 50
    idx = torch.tensor([0, 19, 20, 49, 3])
    expected = np.concatenate([truth["train_x"], truth["unlabeled_x"]])[idx.numpy()]
    assert torch.equal(both.pretrain[idx], torch.from_numpy(expected))
    fold = load(registry, "stl10", root=str(root), fold=3)
    assert torch.equal(fold.train_images, torch.from_numpy(truth["train_x"][truth["folds"][3]]))
    assert len(fold.train_labels) == len(truth["folds"][3])


def test_stl10_is_memory_mapped(registry, stl10_root):
    root, _ = stl10_root
    data = load(registry, "stl10", root=str(root))
    assert data.pretrain.untyped_storage().data_ptr() != 0
    assert not data.pretrain.is_contiguous()  # a transposed view of the mapped file


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda f: (f / "test_y.bin").unlink(), "file not found: .*test_y.bin"),
        (
            lambda f: (f / "train_X.bin").write_bytes((f / "train_X.bin").read_bytes()[:-1]),
            "train_X.bin has 552959 bytes, not a whole number of 27648-byte images",
        ),
        (
            lambda f: (f / "train_y.bin").write_bytes(b"\x01" * 5),
            "train_y.bin has 5 labels but its image file has 20 images",
        ),
        (lambda f: (f / "test_y.bin").write_bytes(b"\x00" * 12), "labels outside 1..10"),
    ],
)
def test_stl10_clear_errors(registry, stl10_root, damage, message):
    root, _ = stl10_root
    damage(root / "stl10_binary")
    with pytest.raises(UserError, match=message):
        load(registry, "stl10", root=str(root))


def test_stl10_missing_root(registry, tmp_path):
    with pytest.raises(UserError, match=r"stl10: folder not found: .*stl10_binary\. Get the"):
        load(registry, "stl10", root=str(tmp_path / "nowhere"))


def test_cifar10_matches_torchvision_reader(registry, tmp_path, monkeypatch):
    write_cifar10(tmp_path)
    data = load(registry, "cifar10", root=str(tmp_path))
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *args: True)
    for train, split in ((True, "train"), (False, "test")):
        ref = torchvision.datasets.CIFAR10(str(tmp_path), train=train)
        ours = getattr(data, f"{split}_images")
        assert torch.equal(ours.permute(0, 2, 3, 1), torch.from_numpy(ref.data))
        assert getattr(data, f"{split}_labels").tolist() == ref.targets
    assert data.class_names == ref.classes and len(data.train_images) == 30


def test_cifar100_fine_and_coarse(registry, tmp_path, monkeypatch):
    write_cifar100(tmp_path)
    fine = load(registry, "cifar100", root=str(tmp_path))
    coarse = load(registry, "cifar100", root=str(tmp_path), labels="coarse")
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *args: True)
    ref = torchvision.datasets.CIFAR100(str(tmp_path), train=False)
    assert torch.equal(fine.test_images.permute(0, 2, 3, 1), torch.from_numpy(ref.data))
    assert fine.test_labels.tolist() == ref.targets
    assert fine.num_classes == 100 and coarse.num_classes == 20
    assert int(coarse.train_labels.max()) < 20


def test_cifar_errors(registry, tmp_path):
    with pytest.raises(UserError, match=r"cifar10: folder not found: .*cifar-10-batches-py"):
        load(registry, "cifar10", root=str(tmp_path))
    write_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(UserError, match=r"file not found: .*data_batch_3"):
        load(registry, "cifar10", root=str(tmp_path))
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"not a pickle")
    with pytest.raises(UserError, match="data_batch_3 is not a readable CIFAR batch"):
        load(registry, "cifar10", root=str(tmp_path))


def test_imagefolder_decodes_once_and_caches(registry, tmp_path, monkeypatch):
    write_imagefolder(tmp_path / "pets", per_class=10)
    params = {
        "root": str(tmp_path / "pets"),
        "size": 24,
        "cache_dir": str(tmp_path / "cache"),
        "positive_class": "dog",
    }
    data = load(registry, "imagefolder", **params)
    assert data.class_names == ["cat", "dog"] and data.positive_class == 1
    assert data.train_images.shape[1:] == (3, 24, 24) and len(data.test_images) == 4
    assert sorted(data.test_labels.tolist()) == [0, 0, 1, 1]  # stratified
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 1
    # the colour cue survives decoding: class c has channel c saturated
    assert data.train_images[data.train_labels == 1][:, 1].float().mean() > 250

    import mae_bench_plugins.imagefolder as module

    def no_decode(*args):
        raise AssertionError("decoded again")

    monkeypatch.setattr(module, "decode", no_decode)
    again = load(registry, "imagefolder", **params)
    assert torch.equal(again.train_images, data.train_images)
    (tmp_path / "pets" / "cat" / "1.png").touch()  # a changed file invalidates the cache
    os.utime(tmp_path / "pets" / "cat" / "1.png", ns=(1, 1))
    with pytest.raises(AssertionError, match="decoded again"):
        load(registry, "imagefolder", **params)


def test_imagefolder_test_root(registry, tmp_path):
    write_imagefolder(tmp_path / "train", per_class=4)
    write_imagefolder(tmp_path / "test", classes=("dog",), per_class=3, seed=1)
    data = load(
        registry,
        "imagefolder",
        root=str(tmp_path / "train"),
        test_root=str(tmp_path / "test"),
        size=16,
        cache_dir=str(tmp_path / "c"),
    )
    assert len(data.train_images) == 8 and data.test_labels.tolist() == [1, 1, 1]


def test_imagefolder_errors(registry, tmp_path):
    cache = str(tmp_path / "c")
    with pytest.raises(UserError, match="imagefolder: folder not found"):
        load(registry, "imagefolder", root=str(tmp_path / "none"), cache_dir=cache)
    (tmp_path / "flat").mkdir()
    with pytest.raises(UserError, match="no class folders in"):
        load(registry, "imagefolder", root=str(tmp_path / "flat"), cache_dir=cache)
    write_imagefolder(tmp_path / "pets", per_class=3)
    (tmp_path / "pets" / "bird").mkdir()
    with pytest.raises(UserError, match=r"class folder .*bird has no images"):
        load(registry, "imagefolder", root=str(tmp_path / "pets"), cache_dir=cache)
    (tmp_path / "pets" / "bird").rmdir()
    with pytest.raises(UserError, match="positive_class 'cow' is not a class folder; classes: "):
        load(
            registry,
            "imagefolder",
            root=str(tmp_path / "pets"),
            positive_class="cow",
            cache_dir=cache,
        )
    (tmp_path / "pets" / "cat" / "9.png").write_bytes(b"garbage")
    with pytest.raises(UserError, match=r"cannot decode .*9.png"):
        load(registry, "imagefolder", root=str(tmp_path / "pets"), cache_dir=cache)



# --------------------------------------------------------------- images of every mode
def _rgb(img) -> np.ndarray:
    return np.asarray(to_rgb(img))


def test_sixteen_bit_and_float_images_are_scaled_not_clipped(tmp_path):
    raw = np.array([[0, 257], [32896, 65535]], dtype=np.uint16)
    png = tmp_path / "sixteen.png"
    Image.fromarray(raw).save(png)
    with Image.open(png) as img:
        assert img.mode.startswith("I")  # a real 16-bit PNG, as medical sets ship them
        decoded = _rgb(img)
    assert decoded[..., 0].tolist() == [[0, 1], [128, 255]]
    assert (decoded[..., 2] == decoded[..., 0]).all()
    unit = Image.fromarray(np.array([[0.0, 0.25], [0.5, 1.0]], dtype=np.float32), "F")
    assert _rgb(unit)[..., 1].tolist() == [[0, 64], [128, 255]]
    wide = Image.fromarray(np.array([[-5.0, 0.0], [5.0, 15.0]], dtype=np.float32), "F")
    assert _rgb(wide)[..., 1].tolist() == [[0, 64], [128, 255]]  # by its value range
    tiff = tmp_path / "float.tiff"
    unit.save(tiff)
    assert decode(tiff, 2)[0].tolist() == [[0, 64], [128, 255]]


def test_palette_bilevel_alpha_and_cmyk_images_decode_to_known_rgb():
    palette = Image.new("P", (2, 1))
    palette.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    palette.putdata([0, 1])
    assert _rgb(palette).tolist() == [[[10, 20, 30], [200, 100, 50]]]
    bilevel = Image.fromarray(np.array([[0, 1]], dtype=bool))
    assert bilevel.mode == "1" and _rgb(bilevel).tolist() == [[[0, 0, 0], [255, 255, 255]]]
    la = Image.fromarray(np.array([[[200, 255], [200, 0]]], dtype=np.uint8), "LA")
    assert _rgb(la).tolist() == [[[200, 200, 200], [0, 0, 0]]]  # over black
    rgba = Image.fromarray(np.array([[[100, 50, 200, 255], [100, 50, 200, 51]]], np.uint8))
    assert _rgb(rgba).tolist() == [[[100, 50, 200], [20, 10, 40]]]
    cmyk = Image.fromarray(
        np.array([[[0, 0, 0, 0], [255, 0, 0, 0], [0, 0, 0, 128]]], dtype=np.uint8), "CMYK"
    )
    assert _rgb(cmyk).tolist() == [[[255, 255, 255], [0, 255, 255], [127, 127, 127]]]



# --------------------------------------------------------------- class folders and the cache
def _class_dirs(root: Path, *names: str) -> None:
    for name in names:
        (root / name).mkdir(parents=True)
        Image.new("RGB", (4, 4), (9, 9, 9)).save(root / name / "a.png")


@pytest.mark.parametrize(
    ("target", "message"),
    [(".", "the dataset root or above"), ("c", "loops or leads nowhere"), ("OUT", "outside it")],
)
def test_class_folder_symlinks_that_loop_or_escape_are_refused(tmp_path, target, message):
    root = tmp_path / "data"
    _class_dirs(root, "a", "b")
    _class_dirs(tmp_path, "elsewhere")
    os.symlink(tmp_path / "elsewhere" if target == "OUT" else target, root / "c")
    with pytest.raises(UserError, match=message):
        discover(root)


def test_class_folder_symlink_inside_the_root_is_read(tmp_path):
    root = tmp_path / "data"
    _class_dirs(root, "a", "store/b")
    os.symlink("store/b", root / "b")
    classes, files, _ = discover(root)
    assert classes == ["a", "b", "store"] and len(files) == 3


def test_damaged_decode_cache_is_rebuilt_with_a_warning(tmp_path):
    files = []
    for i in range(3):
        files.append(tmp_path / f"{i}.png")
        Image.new("RGB", (8, 8), (i * 50, 0, 0)).save(files[-1])
    first = cached_images(files, 4, tmp_path / "cache").clone()
    (cache,) = (tmp_path / "cache").glob("*.npy")
    for damage in (b"", cache.read_bytes()[:100]):
        cache.write_bytes(damage)
        with pytest.warns(MaeBenchWarning, match=f"decode cache {cache} is damaged"):
            again = cached_images(files, 4, tmp_path / "cache")
        assert torch.equal(again, first)
