"""Throughput of one pretraining step per quick-suite variant (``tox -e bench``).

Figures are printed by pytest-benchmark; under the default test run these functions execute
once without timing (``--benchmark-disable``), so they stay correct.
"""

import pytest
import torch

from mae_bench.data import ImageFeeder
from mae_bench.suite import load_suite
from mae_bench.train import make_optimizer, train_step
from tests.conftest import ROOT


@pytest.fixture(scope="module")
def quick(registry):
    suite = load_suite(ROOT / "suites" / "quick.yaml", registry)
    data = suite.build_dataset().load()
    feeder = ImageFeeder.fit(data.pretrain, image_size=16, channels=3, device=torch.device("cpu"))
    return suite, data, feeder


@pytest.mark.parametrize("variant", ["mlp-baseline", "vit-mae", "vit-improved"])
def test_pretrain_step(benchmark, quick, variant):
    suite, data, feeder = quick
    v = next(v for v in suite.variants if v.name == variant)
    torch.manual_seed(0)
    model = v.build_model(16, 3)
    masking, losses = v.build_masking(), v.build_losses()
    optimizer = make_optimizer(model, suite.config.pretrain, feeder.device)
    generator = torch.Generator().manual_seed(0)
    batch = data.pretrain[: suite.config.pretrain.batch_size]

    def step() -> float:
        x = feeder(batch)
        mask = masking(len(x), model.grid, progress=0.5, generator=generator)
        loss, _ = train_step(model, x, mask, losses, optimizer)
        return loss.item()

    assert torch.isfinite(torch.tensor(benchmark(step)))
    if benchmark.stats:
        benchmark.extra_info["imgs_per_s"] = len(batch) / benchmark.stats.stats.mean
