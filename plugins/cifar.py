"""CIFAR-10 and CIFAR-100 from the official python-pickle batches.

The batches are Python pickles, as distributed: load only files you obtained from the
official release (torchvision reads them the same way).
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from mae_bench import Dataset, ImageData, Params, UserError, hookimpl
from mae_bench.files import require_dir, require_file

IMAGE_BYTES = 3 * 32 * 32


def _hint(archive: str, folder: str) -> str:
    return (
        f"Get the official python version ({archive}) and extract it so that "
        f"<root>/{folder}/ exists, or set `download: true` where the network allows."
    )


def _text(value: Any) -> Any:
    """A Python-2 ``str`` read as bytes, decoded; anything else as is."""
    return value.decode() if isinstance(value, bytes) else value


def read_batch(path: Path, dataset: str, hint: str) -> dict[str, Any]:
    """One pickled batch, keys decoded to str."""
    require_file(path, dataset, hint)
    try:
        with path.open("rb") as handle:
            raw = pickle.load(handle, encoding="bytes")
    except (pickle.UnpicklingError, EOFError, ValueError) as exc:
        raise UserError(f"{dataset}: {path} is not a readable CIFAR batch ({exc})") from None
    return {_text(k): v for k, v in raw.items()}


def batch_images(batch: dict[str, Any], path: Path, dataset: str) -> torch.Tensor:
    """The ``data`` rows (R, G, B planes of 32x32) as (N, 3, 32, 32) uint8."""
    data = np.asarray(batch.get("data"), dtype=np.uint8)
    if data.ndim != 2 or data.shape[1] != IMAGE_BYTES:
        raise UserError(f"{dataset}: {path} has data of shape {data.shape}, not (N, 3072)")
    return torch.from_numpy(data.reshape(-1, 3, 32, 32).copy())


class CIFAR10Params(Params):
    """Where ``cifar-10-batches-py/`` lies."""

    root: str = "data"
    download: bool = False


class CIFAR10Dataset(Dataset):
    """CIFAR-10 (32x32 colour, 10 classes), official pickle batches; pretrains on train."""

    name = "cifar10"
    Params = CIFAR10Params
    folder = "cifar-10-batches-py"
    archive = "cifar-10-python.tar.gz"
    train_files = tuple(f"data_batch_{i}" for i in range(1, 6))
    test_files = ("test_batch",)
    label_key = "labels"

    def _label_names(self, folder: Path, hint: str) -> list[str]:
        meta = read_batch(folder / "batches.meta", self.name, hint)
        return [_text(n) for n in meta["label_names"]]

    def _split(self, folder: Path, files: tuple[str, ...], hint: str):
        images, labels = [], []
        for name in files:
            path = folder / name
            batch = read_batch(path, self.name, hint)
            x = batch_images(batch, path, self.name)
            y = torch.as_tensor(batch.get(self.label_key, []), dtype=torch.long)
            if len(y) != len(x):
                raise UserError(f"{self.name}: {path} has {len(y)} labels for {len(x)} images")
            images.append(x)
            labels.append(y)
        return torch.cat(images), torch.cat(labels)

    def load(self) -> ImageData:
        root = Path(self.params.root).expanduser()
        folder = root / self.folder
        hint = _hint(self.archive, self.folder)
        if self.params.download and not folder.is_dir():
            self._download(root)
        require_dir(folder, self.name, hint)
        train_x, train_y = self._split(folder, self.train_files, hint)
        test_x, test_y = self._split(folder, self.test_files, hint)
        names = self._label_names(folder, hint)
        return ImageData(train_x, train_x, train_y, test_x, test_y, class_names=names)

    def _download(self, root: Path) -> None:
        from torchvision import datasets

        cls = datasets.CIFAR10 if self.name == "cifar10" else datasets.CIFAR100
        try:
            cls(str(root), train=True, download=True)
        except Exception as exc:
            raise UserError(f"{self.name}: download into {root} failed: {exc}") from None


class CIFAR100Params(CIFAR10Params):
    """Where ``cifar-100-python/`` lies, and fine (100) or coarse (20) labels."""

    labels: Literal["fine", "coarse"] = "fine"


class CIFAR100Dataset(CIFAR10Dataset):
    """CIFAR-100 (32x32 colour, 100 fine or 20 coarse classes), official pickle files."""

    name = "cifar100"
    Params = CIFAR100Params
    folder = "cifar-100-python"
    archive = "cifar-100-python.tar.gz"
    train_files = ("train",)
    test_files = ("test",)

    @property
    def label_key(self) -> str:  # type: ignore[override]
        return f"{self.params.labels}_labels"

    def _label_names(self, folder: Path, hint: str) -> list[str]:
        meta = read_batch(folder / "meta", self.name, hint)
        names = meta[f"{self.params.labels}_label_names"]
        return [_text(n) for n in names]


@hookimpl
def register_datasets(register):
    register(CIFAR10Dataset)
    register(CIFAR100Dataset)
