"""Throughput of a pretraining step and of feature extraction (``tox -e bench``).

Figures are printed by pytest-benchmark; under the default test run these functions execute
once without timing (``--benchmark-disable``), so they stay correct.
"""

import pytest
import torch

from mae_bench.contract import LossInputs
from mae_bench.data import ImageFeeder
from mae_bench.suite import load_suite
from mae_bench.train import loss_terms
from tests.conftest import ROOT

BATCH = 64


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
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    batch = data.pretrain[:BATCH]

    def step():
        x = feeder(batch)
        mask = masking(len(x), model.num_patches, progress=0.5, generator=gen)
        out = model(x, mask)
        inputs = LossInputs(x, out.pred, mask.mask, out.embedding, model.patch_size)
        loss, _ = loss_terms(losses, inputs)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return loss.item()

    loss = benchmark(step)
    assert loss == loss  # finite
    if benchmark.stats:
        benchmark.extra_info["imgs_per_s"] = BATCH / benchmark.stats.stats.mean
