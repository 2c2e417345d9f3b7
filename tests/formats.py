"""Writers of tiny datasets in the exact official on-disk formats, for the loader tests."""

from __future__ import annotations

import pickle
import struct
from pathlib import Path
from typing import ClassVar

import numpy as np

STL10_CLASSES = [
    "airplane",
    "bird",
    "car",
    "cat",
    "deer",
    "dog",
    "horse",
    "monkey",
    "ship",
    "truck",
]


def _images(rng: np.random.Generator, n: int, size: int) -> np.ndarray:
    """Non-symmetric structured uint8 images (N, 3, size, size): orientation bugs show."""
    ramp = np.arange(size, dtype=np.float64)
    base = (ramp[None, :, None] * 2 + ramp[None, None, :] * 0.5)[None] % 256  # H and W differ
    noise = rng.integers(0, 40, size=(n, 3, size, size))
    return ((base + noise + rng.integers(0, 60, size=(n, 3, 1, 1))) % 256).astype(np.uint8)


def write_stl10(root: Path, n_train=20, n_test=12, n_unlabeled=30, seed=0) -> dict:
    """``root/stl10_binary/`` as in the official release: column-major per channel."""
    rng = np.random.default_rng(seed)
    folder = root / "stl10_binary"
    folder.mkdir(parents=True)
    out = {}
    for split, n in (("train", n_train), ("test", n_test), ("unlabeled", n_unlabeled)):
        x = _images(rng, n, 96)
        (folder / f"{split}_X.bin").write_bytes(x.transpose(0, 1, 3, 2).tobytes())
        out[f"{split}_x"] = x
        if split != "unlabeled":
            y = rng.integers(1, 11, size=n).astype(np.uint8)
            (folder / f"{split}_y.bin").write_bytes(y.tobytes())
            out[f"{split}_y"] = y
    (folder / "class_names.txt").write_text("\n".join(STL10_CLASSES) + "\n")
    folds = [" ".join(str(i) for i in rng.permutation(n_train)[: n_train // 2]) for _ in range(10)]
    (folder / "fold_indices.txt").write_text("\n".join(folds) + "\n")
    out["folds"] = [[int(i) for i in f.split()] for f in folds]
    return out


class _Py2Str(bytes):
    """Pickled as a Python 2 ``str``, like every key and name in the official CIFAR files."""


class _Py2Pickler(pickle._Pickler):
    dispatch: ClassVar[dict] = dict(pickle._Pickler.dispatch)

    def save_py2str(self, obj: _Py2Str) -> None:
        n = len(obj)
        if n < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([n]) + bytes(obj))
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", n) + bytes(obj))
        self.memoize(obj)

    dispatch[_Py2Str] = save_py2str


def _py2(value):
    if isinstance(value, bytes):
        return _Py2Str(value)
    if isinstance(value, list):
        return [_py2(v) for v in value]
    return value


def _pickle(path: Path, obj: dict) -> None:
    """Write ``obj`` as Python 2 wrote the official batches: protocol 2, str keys."""
    with path.open("wb") as handle:
        _Py2Pickler(handle, protocol=2).dump({_py2(k): _py2(v) for k, v in obj.items()})


def write_cifar10(root: Path, per_batch=6, n_test=8, seed=0) -> None:
    """``root/cifar-10-batches-py/``: five pickled train batches, a test batch, meta."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name, n in [(f"data_batch_{i}", per_batch) for i in range(1, 6)] + [("test_batch", n_test)]:
        x = _images(rng, n, 32).reshape(n, 3072)
        _pickle(
            folder / name,
            {
                b"batch_label": name.encode(),
                b"labels": rng.integers(0, 10, n).tolist(),
                b"data": x,
                b"filenames": [f"{i}.png".encode() for i in range(n)],
            },
        )
    names = [
        b"airplane",
        b"automobile",
        b"bird",
        b"cat",
        b"deer",
        b"dog",
        b"frog",
        b"horse",
        b"ship",
        b"truck",
    ]
    _pickle(
        folder / "batches.meta",
        {b"label_names": names, b"num_cases_per_batch": per_batch, b"num_vis": 3072},
    )


def write_cifar100(root: Path, n_train=12, n_test=8, seed=0) -> None:
    """``root/cifar-100-python/``: train, test and meta pickles with fine and coarse labels."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    for name, n in (("train", n_train), ("test", n_test)):
        _pickle(
            folder / name,
            {
                b"filenames": [f"{i}.png".encode() for i in range(n)],
                b"batch_label": name.encode(),
                b"fine_labels": rng.integers(0, 100, n).tolist(),
                b"coarse_labels": rng.integers(0, 20, n).tolist(),
                b"data": _images(rng, n, 32).reshape(n, 3072),
            },
        )
    _pickle(
        folder / "meta",
        {
            b"fine_label_names": [f"fine{i}".encode() for i in range(100)],
            b"coarse_label_names": [f"coarse{i}".encode() for i in range(20)],
        },
    )


def write_imagefolder(root: Path, classes=("cat", "dog"), per_class=8, seed=0) -> None:
    """``root/<class>/<n>.png`` (and a JPEG), images of varying sizes."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            h, w = 30 + i, 40 - i
            arr = rng.integers(0, 255, size=(h, w, 3), dtype=np.uint8)
            arr[..., c % 3] = 255  # a class-dependent colour cue
            ext = "jpg" if i == 0 else "png"
            Image.fromarray(arr).save(root / name / f"{i}.{ext}")
