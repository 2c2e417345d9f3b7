"""STL-10 from the official binary release (``stl10_binary/``), memory-mapped."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import numpy as np
import torch
from pydantic import Field

from mae_bench import Dataset, ImageData, Params, UserError, hookimpl
from mae_bench.data import ConcatImages, as_uint8_images, memmap_uint8
from mae_bench.files import require_dir, require_file

FOLDER = "stl10_binary"
IMAGE_SHAPE = (3, 96, 96)
HINT = (
    "Get the official binary release (stl10_binary.tar.gz) and extract it so that "
    "<root>/stl10_binary/train_X.bin exists, or set `download: true` where the network allows."
)


class STL10Params(Params):
    """Where the data is, what to pretrain on, and an optional predefined training fold."""

    root: str = "data"
    pretrain_split: Literal["unlabeled", "train+unlabeled", "train"] = "unlabeled"
    fold: Annotated[int, Field(ge=0, le=9)] | None = None
    download: bool = False


def read_images(path: Path) -> np.ndarray:
    """An STL-10 ``*_X.bin`` file as (N, 3, 96, 96): stored column-major per channel."""
    return memmap_uint8(path, IMAGE_SHAPE, "stl10", HINT).transpose(0, 1, 3, 2)


def read_labels(path: Path, expected: int) -> torch.Tensor:
    """An STL-10 ``*_y.bin`` file (labels 1..10) as 0-based int64."""
    require_file(path, "stl10", HINT)
    labels = np.fromfile(path, dtype=np.uint8)
    if len(labels) != expected:
        raise UserError(
            f"stl10: {path} has {len(labels)} labels but its image file has {expected} images"
        )
    if labels.min() < 1 or labels.max() > 10:
        raise UserError(f"stl10: {path} has labels outside 1..10: not an STL-10 label file")
    return torch.from_numpy(labels.astype(np.int64) - 1)


class STL10Dataset(Dataset):
    """STL-10 (96x96 colour, 10 classes): 100k unlabeled images for pretraining."""

    name = "stl10"
    Params = STL10Params

    def load(self) -> ImageData:
        p = self.params
        root = Path(p.root).expanduser()
        folder = root / FOLDER
        if p.download and not folder.is_dir():
            self._download(root)
        require_dir(folder, "stl10", HINT)
        train_x = as_uint8_images(read_images(folder / "train_X.bin"))
        train_y = read_labels(folder / "train_y.bin", len(train_x))
        test_x = as_uint8_images(read_images(folder / "test_X.bin"))
        test_y = read_labels(folder / "test_y.bin", len(test_x))
        if p.pretrain_split == "train":
            pretrain = train_x
        else:
            unlabeled = as_uint8_images(read_images(folder / "unlabeled_X.bin"))
            pretrain = (
                unlabeled if p.pretrain_split == "unlabeled" else ConcatImages(train_x, unlabeled)
            )
        if p.fold is not None:
            idx = self._fold(folder / "fold_indices.txt", p.fold, len(train_x))
            train_x, train_y = train_x[idx], train_y[idx]
        names_file = folder / "class_names.txt"
        names = names_file.read_text().split() if names_file.is_file() else []
        return ImageData(pretrain, train_x, train_y, test_x, test_y, class_names=names)

    @staticmethod
    def _fold(path: Path, fold: int, n_train: int) -> torch.Tensor:
        require_file(path, "stl10", HINT)
        lines = path.read_text().splitlines()
        if len(lines) <= fold:
            raise UserError(f"stl10: {path} has {len(lines)} folds; fold {fold} is missing")
        idx = torch.tensor([int(i) for i in lines[fold].split()], dtype=torch.long)
        if len(idx) == 0 or idx.max() >= n_train or idx.min() < 0:
            raise UserError(f"stl10: fold {fold} of {path} indexes outside the training images")
        return idx

    @staticmethod
    def _download(root: Path) -> None:
        from torchvision.datasets import STL10

        try:
            STL10(str(root), split="train+unlabeled", download=True)
        except Exception as exc:  # no network, disk full, ...
            raise UserError(f"stl10: download into {root} failed: {exc}") from None


@hookimpl
def register_datasets(register):
    register(STL10Dataset)
