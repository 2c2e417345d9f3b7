"""Your own images: one folder per class (torchvision's ImageFolder convention).

Images are decoded once, resized (shorter side) and centre-cropped to ``size``, and cached as
a uint8 array on disk, so later runs start at once. The cache key covers every file's path,
size and modification time, so changing the folder re-decodes it.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
import torch
from pydantic import Field, PositiveInt

from mae_bench import Dataset, ImageData, Params, UserError, hookimpl
from mae_bench.files import require_dir

CACHE_VERSION = 1
HINT = "Expected <root>/<class name>/<image files>, one folder per class."


class ImageFolderParams(Params):
    """Folders, split, stored image size, binary positive class and cache location."""

    root: str
    test_root: str | None = None
    test_fraction: Annotated[float, Field(gt=0, lt=1)] = 0.2
    split_seed: int = 0
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
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
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


def decode(path: Path, size: int) -> np.ndarray:
    """One image as (3, size, size) uint8: RGB, shorter side resized, centre-cropped."""
    from PIL import Image, UnidentifiedImageError
    from torchvision.transforms import functional as TF

    try:
        with Image.open(path) as img:
            img = img.convert("RGB")
            img = TF.center_crop(TF.resize(img, size), [size, size])
            return np.asarray(img, dtype=np.uint8).transpose(2, 0, 1)
    except (UnidentifiedImageError, OSError) as exc:
        raise UserError(f"imagefolder: cannot decode {path}: {exc}") from None


def cached_images(files: list[Path], size: int, cache_dir: Path) -> torch.Tensor:
    """Decode ``files`` once into a cached (N, 3, size, size) uint8 array, memory-mapped."""
    key = hashlib.sha256(f"v{CACHE_VERSION} {size}".encode())
    for f in files:
        stat = f.stat()
        key.update(f"{f.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    path = cache_dir / f"imagefolder-{key.hexdigest()[:20]}.npy"
    if not path.is_file():
        from rich.progress import track

        array = np.empty((len(files), 3, size, size), dtype=np.uint8)
        for i, f in enumerate(track(files, description="decoding images", transient=True)):
            array[i] = decode(f, size)
        cache_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=cache_dir, suffix=".npy.tmp")
        with os.fdopen(fd, "wb") as handle:
            np.save(handle, array)
        os.replace(tmp, path)
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
