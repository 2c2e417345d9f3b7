"""Your own images: one folder per class (torchvision's ImageFolder convention).

Images are decoded once, resized (shorter side) and centre-cropped to ``size``, and cached as
a uint8 array on disk, so later runs start at once. The cache key covers every file's path,
size and modification time, so changing the folder re-decodes it; a damaged cache file is
decoded again.

Every image becomes 8-bit RGB by its mode (:func:`to_rgb`): 16-bit images are scaled by their
bit depth (0..65535 -> 0..255), float images by their value range (0..1 as is, otherwise
min..max), transparent images are composited over black, CMYK is converted with
``(255 - C) * (255 - K) / 255`` per channel; nothing is clipped.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
import torch
from pydantic import Field, PositiveInt

from mae_bench import Dataset, ImageData, MaeBenchWarning, Params, UserError, hookimpl
from mae_bench.contract import Seed
from mae_bench.files import atomic_write, require_dir

CACHE_VERSION = 2  # 2: decoding by image mode (16-bit and float images no longer clipped)
HINT = "Expected <root>/<class name>/<image files>, one folder per class."


class ImageFolderParams(Params):
    """Folders, split, stored image size, binary positive class and cache location."""

    root: str
    test_root: str | None = None
    test_fraction: Annotated[float, Field(gt=0, lt=1)] = 0.2
    split_seed: Seed = 0
    size: PositiveInt = 64
    positive_class: str | None = None
    pretrain_split: Literal["train", "all"] = "train"
    cache_dir: str | None = None


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/mae-bench`` (``~/.cache/mae-bench`` by default)."""
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mae-bench"


def discover(root: Path) -> tuple[list[str], list[Path], list[int]]:
    """Class names (sorted folder names), image files and their labels."""
    from torchvision.datasets.folder import IMG_EXTENSIONS

    require_dir(root, "imagefolder", HINT)
    entries = [d for d in root.iterdir() if not d.name.startswith(".")]
    for entry in entries:
        if entry.is_symlink():
            check_class_link(root, entry)
    classes = sorted(d.name for d in entries if d.is_dir())
    if not classes:
        raise UserError(f"imagefolder: no class folders in {root}. {HINT}")
    files, labels = [], []
    for label, name in enumerate(classes):
        found = sorted(f for f in (root / name).rglob("*") if f.suffix.lower() in IMG_EXTENSIONS)
        if not found:
            raise UserError(
                f"imagefolder: class folder {root / name} has no images "
                f"(looked for {', '.join(IMG_EXTENSIONS)})"
            )
        files += found
        labels += [label] * len(found)
    return classes, files, labels


def check_class_link(root: Path, link: Path) -> None:
    """A class folder that is a symlink must lead to a folder strictly inside ``root``:
    a loop, a dangling link, a link to the root (or above it, which would read the other
    classes again) or out of it is refused."""
    try:
        target = link.resolve(strict=True)
    except (OSError, RuntimeError) as exc:
        raise UserError(
            f"imagefolder: class folder {link} is a symlink that loops or leads nowhere "
            f"({exc.__class__.__name__}); remove it or point it at a folder inside {root}"
        ) from None
    top = root.resolve()
    if target.is_dir() and top not in target.parents:
        where = "the dataset root or above it" if target in (top, *top.parents) else "outside it"
        raise UserError(
            f"imagefolder: class folder {link} is a symlink to {target}, {where}: refusing "
            f"to read classes through it (it would repeat or mix in other images); use a "
            f"real folder or a link to a folder inside {root}"
        )


_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")  # by bit depth; "I" beyond 65535: range
_ALPHA = ("LA", "La", "PA", "RGBA", "RGBa")


def _rescale(values: np.ndarray, top: float | None) -> np.ndarray:
    """Values to 0..255: divided by ``top`` (a bit depth's maximum) when they fit under it,
    else stretched from their own min..max (a constant image becomes 0)."""
    values = np.nan_to_num(values.astype(np.float64))
    low, high = float(values.min()), float(values.max())
    if top is not None and low >= 0 and high <= top:
        return values * (255.0 / top)
    return (values - low) * (255.0 / (high - low)) if high > low else np.zeros_like(values)


def to_rgb(img):
    """A PIL image of any mode as 8-bit RGB, without clipping high-bit-depth values."""
    from PIL import Image

    mode = img.mode
    if mode == "RGB":
        return img
    if mode == "P":
        return to_rgb(img.convert("RGBA" if "transparency" in img.info else "RGB"))
    if mode in _ALPHA:
        rgba = np.asarray(img.convert("RGBA"), dtype=np.float64)
        array = rgba[..., :3] * (rgba[..., 3:] / 255.0)  # over black
    elif mode == "CMYK":
        cmyk = np.asarray(img, dtype=np.float64)
        array = (255.0 - cmyk[..., :3]) * (255.0 - cmyk[..., 3:]) / 255.0
    elif mode in _SIXTEEN_BIT or mode == "I":  # "I": 16-bit PNG data in 32-bit integers
        array = _rescale(np.asarray(img), 65535.0)
    elif mode == "F":
        array = _rescale(np.asarray(img), 1.0)
    else:  # L, 1, YCbCr, LAB, HSV: PIL's own conversion is exact
        return img.convert("RGB")
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=2)
    return Image.fromarray(np.clip(np.rint(array), 0, 255).astype(np.uint8), "RGB")


def decode(path: Path, size: int) -> np.ndarray:
    """One image as (3, size, size) uint8: RGB, shorter side resized, centre-cropped."""
    from PIL import Image, UnidentifiedImageError
    from torchvision.transforms import functional as TF

    try:
        with Image.open(path) as img:
            img = to_rgb(img)
            img = TF.center_crop(TF.resize(img, size), [size, size])
            return np.asarray(img, dtype=np.uint8).transpose(2, 0, 1)
    except (UnidentifiedImageError, OSError) as exc:
        raise UserError(f"imagefolder: cannot decode {path}: {exc}") from None


def cached_images(files: list[Path], size: int, cache_dir: Path) -> torch.Tensor:
    """Decode ``files`` once into a cached (N, 3, size, size) uint8 array, memory-mapped.

    A cache file that does not load as that array (truncated, empty, garbled) is reported
    and decoded again.
    """
    key = hashlib.sha256(f"v{CACHE_VERSION} {size}".encode())
    for f in files:
        stat = f.stat()
        key.update(f"{f.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    path = cache_dir / f"imagefolder-{key.hexdigest()[:20]}.npy"
    shape = (len(files), 3, size, size)
    if path.is_file():
        try:
            cached = np.load(path, mmap_mode="c")
            if cached.shape == shape and cached.dtype == np.uint8:
                return torch.from_numpy(cached)
            problem = f"holds {cached.dtype} {cached.shape}, not uint8 {shape}"
        except (ValueError, OSError, EOFError) as exc:
            problem = str(exc) or type(exc).__name__
        warnings.warn(
            f"imagefolder: decode cache {path} is damaged ({problem}): decoding the images again",
            MaeBenchWarning,
            stacklevel=2,
        )
    from rich.progress import track

    array = np.empty(shape, dtype=np.uint8)
    for i, f in enumerate(track(files, description="decoding images", transient=True)):
        array[i] = decode(f, size)
    atomic_write(path, lambda handle: np.save(handle, array))
    return torch.from_numpy(np.load(path, mmap_mode="c"))


class ImageFolderDataset(Dataset):
    """A folder per class (cats vs dogs, a binary medical set, ...), decoded once and cached."""

    name = "imagefolder"
    Params = ImageFolderParams

    def load(self) -> ImageData:
        p = self.params
        cache = Path(p.cache_dir).expanduser() if p.cache_dir else default_cache_dir()
        classes, files, labels = discover(Path(p.root).expanduser())
        images = cached_images(files, p.size, cache)
        y = torch.tensor(labels, dtype=torch.long)
        if p.test_root:
            test_classes, test_files, test_labels = discover(Path(p.test_root).expanduser())
            unknown = sorted(set(test_classes) - set(classes))
            if unknown:
                raise UserError(
                    f"imagefolder: test_root has classes not in root: {', '.join(unknown)}"
                )
            remap = [classes.index(c) for c in test_classes]
            test_x = cached_images(test_files, p.size, cache)
            test_y = torch.tensor([remap[t] for t in test_labels], dtype=torch.long)
            train_x, train_y = images, y
        else:
            train_idx, test_idx = self._split(labels)
            train_x, train_y = images[train_idx], y[train_idx]
            test_x, test_y = images[test_idx], y[test_idx]
        positive = None
        if p.positive_class is not None:
            if p.positive_class not in classes:
                raise UserError(
                    f"imagefolder: positive_class {p.positive_class!r} is not a class folder; "
                    f"classes: {', '.join(classes)}"
                )
            positive = classes.index(p.positive_class)
        pretrain = images if p.pretrain_split == "all" and not p.test_root else train_x
        return ImageData(pretrain, train_x, train_y, test_x, test_y, classes, positive)

    @property
    def pretrain_sees_test(self) -> bool:
        return self.params.pretrain_split == "all" and not self.params.test_root

    def _split(self, labels: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        from sklearn.model_selection import train_test_split

        p = self.params
        try:
            train_idx, test_idx = train_test_split(
                range(len(labels)),
                test_size=p.test_fraction,
                random_state=p.split_seed,
                stratify=labels,
            )
        except ValueError as exc:
            raise UserError(
                f"imagefolder: cannot split {p.root} with test_fraction {p.test_fraction} "
                f"({exc}); add images or set test_root"
            ) from None
        return torch.tensor(train_idx), torch.tensor(test_idx)


@hookimpl
def register_datasets(register):
    register(ImageFolderDataset)
