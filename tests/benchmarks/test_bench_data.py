"""Images/s of the batched on-device data path vs torchvision's per-image PIL pipeline.

Both produce the same thing: STL-10-sized uint8 images (3x96x96) -> random resized crop
(scale 0.2-1) -> horizontal flip -> 96x96 -> normalized float batches of 128. The per-image
pipeline is the reference implementation (``torchvision.transforms`` through a DataLoader).
Run with ``tox -e bench``; the README records the measured ratio.
"""

import pytest
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from mae_bench.data import ImageFeeder, index_batches
from mae_bench.suite import AugmentConfig

N, SIZE, BATCH = 2048, 96, 128
MEAN, STD = (0.45, 0.44, 0.40), (0.26, 0.25, 0.27)


@pytest.fixture(scope="module")
def images():
    return torch.randint(0, 256, (N, 3, SIZE, SIZE), dtype=torch.uint8)


class PILPipeline(Dataset):
    """The per-image reference: tensor -> PIL -> RandomResizedCrop -> flip -> tensor."""

    def __init__(self, images: torch.Tensor) -> None:
        self.images = images
        self.transform = transforms.Compose(
            [
                transforms.ToPILImage(),
                transforms.RandomResizedCrop(SIZE, scale=(0.2, 1.0)),
                transforms.RandomHorizontalFlip(),
                transforms.ToTensor(),
                transforms.Normalize(MEAN, STD),
            ]
        )

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.transform(self.images[i])


def per_image_epoch(images: torch.Tensor) -> int:
    seen = 0
    for batch in DataLoader(PILPipeline(images), batch_size=BATCH, shuffle=True):
        assert batch.shape[1:] == (3, SIZE, SIZE) and batch.dtype == torch.float32
        seen += len(batch)
    return seen


def batched_epoch(images: torch.Tensor, feeder: ImageFeeder, generator: torch.Generator) -> int:
    cfg = AugmentConfig(crop_scale=(0.2, 1.0), hflip=True)
    seen = 0
    for idx in index_batches(len(images), BATCH, generator=generator):
        batch = feeder(images[idx], cfg, generator)
        assert batch.shape == (len(idx), 3, SIZE, SIZE) and batch.dtype == torch.float32
        assert torch.isfinite(batch).all()
        seen += len(batch)
    return seen


@pytest.mark.benchmark(group="data-path")
def test_per_image_torchvision_pipeline(benchmark, images):
    assert benchmark.pedantic(per_image_epoch, args=(images,), rounds=5) == N


@pytest.mark.benchmark(group="data-path")
def test_batched_device_pipeline(benchmark, images):
    feeder = ImageFeeder(SIZE, 3, MEAN, STD, torch.device("cpu"))
    generator = torch.Generator().manual_seed(0)
    assert benchmark.pedantic(batched_epoch, args=(images, feeder, generator), rounds=5) == N
