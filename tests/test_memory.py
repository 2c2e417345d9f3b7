"""memory.py: the pretraining step's footprint measured without memory; a plugin that
fails there fails its own cells, never the suite; a huge batch is estimated, not allocated;
the step is modelled as the device runs it (issue 18, item 9: bf16 autocast and fused
attention on CUDA, DDP's gradient buckets), checked against a transformer's saved-tensor
inventory and against the measured peak of a real CPU step."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from torch import Tensor

from mae_bench.errors import MaeBenchWarning
from mae_bench.memory import memory_check, memory_problem, pretrain_step_bytes
from mae_bench.suite import Suite, resolve_suite
from tests import fault_plugins
from tests.conftest import ROOT, invoke, registry_with, tiny_suite_data, write_suite

HEALTHY = {"name": "mlp", "patch_size": 4, "dim": 32, "hidden": 64}
FAULTY = {**HEALTHY, "name": "faulty"}
FAULTS = {
    "encoder-raises": {"encoder": {**FAULTY, "fault": "forward"}},
    "encoder-width": {"encoder": {**FAULTY, "fault": "width"}},
    "masking-raises": {"masking": {"name": "faulty", "fault": "raise"}},
    "masking-float-ids": {"masking": {"name": "faulty", "fault": "float-ids"}},
    "masking-nan-ratio": {"masking": {"name": "faulty", "fault": "nan-ratio"}},
    "loss-raises": {"loss": {"name": "faulty", "fault": "raise"}},
    "loss-not-tensor": {"loss": {"name": "faulty", "fault": "not-tensor"}},
}
REASONS = {
    "encoder-raises": "injected fault: encoder forward pass",
    "encoder-width": "returned tokens of shape",
    "masking-raises": "injected fault: masking",
    "masking-float-ids": "Mask.ids_keep must be a 2-D torch.int64 tensor",
    "masking-nan-ratio": "masking 'faulty': ratio_at(0) returned nan, not a mask ratio",
    "loss-raises": "injected fault: loss",
    "loss-not-tensor": "returned float, not a scalar tensor",
}


def fault_suite_data(*faults: str, **changes) -> dict:
    """A one-epoch suite: a healthy variant, then one per fault in ``faults``."""
    data = tiny_suite_data(name="faults", **changes)
    data["pretrain"] = {"epochs": 1, "batch_size": 32, "lr": 1.0e-3}
    data["eval"] = {"reconstruction": {"num_images": 8}, "linear_probe": {"epochs": 1}}
    data["variants"] = [{"name": "healthy", "encoder": HEALTHY}] + [
        {"name": fault, "encoder": HEALTHY, **FAULTS[fault]} for fault in faults
    ]
    return data


@pytest.fixture
def faults_installed(tmp_path: Path, monkeypatch, fresh_registry) -> Path:
    return fault_plugins.install(tmp_path / "site", monkeypatch)


@pytest.fixture(scope="module")
def fault_registry():
    return registry_with(fault_plugins, "faults")


def test_a_failing_variant_is_noted_and_not_refused(fault_registry):
    suite = resolve_suite(fault_suite_data(*FAULTS), fault_registry, "faults.yaml")
    check = memory_check(suite, torch.device("cpu"))
    assert check.problem is None
    assert set(check.unchecked) == set(FAULTS)
    for i, (name, reason) in enumerate(REASONS.items(), start=1):
        assert reason in check.unchecked[name] and "\n" not in check.unchecked[name]
        note = check.notes[i - 1]
        assert note.startswith(f"faults.yaml: variants[{i}] ({name}): ") and "\n" not in note
    with pytest.warns(MaeBenchWarning) as warned:  # the old call still answers, and warns
        assert memory_problem(suite, torch.device("cpu")) is None
    assert [str(w.message) for w in warned] == list(check.notes)


def test_the_cells_of_failing_plugins_fail_and_the_others_run(faults_installed, tmp_path):
    suite = write_suite(tmp_path, fault_suite_data(*FAULTS))
    out = tmp_path / "out"
    result = invoke("run", str(suite), "--out", str(out), "--device", "cpu")
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit) and "Traceback" not in result.output
    root = out / "faults"
    (healthy,) = (root / "cells").glob("healthy-seed0-*")
    assert (healthy / "pretrain.json").is_file() and len(list(healthy.glob("evals/*"))) == 3
    failed = {p.name.split("-seed0-")[0]: p for p in (root / "failed").glob("*.log")}
    assert set(failed) == set(FAULTS)
    for name, log in failed.items():
        reason = log.read_text().splitlines()[0]
        assert REASONS[name] in reason, (name, reason)
        assert f"  {name}-seed0-" in result.stderr
    assert "| healthy" in result.stdout


def test_validate_names_the_variant_it_could_not_check(faults_installed, tmp_path):
    suite = write_suite(tmp_path, fault_suite_data("masking-raises", "loss-not-tensor"))
    result = invoke("validate", str(suite))
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    assert "ok: suite 'faults'" in result.stdout
    assert (
        "warning: faults.yaml: variants[1] (masking-raises): its pretraining step's memory "
        "could not be estimated (RuntimeError: injected fault: masking)"
    ) in result.stderr.replace(f"{tmp_path}/", "")
    assert "variants[2] (loss-not-tensor): its pretraining step's memory" in result.stderr


def test_a_huge_batch_is_estimated_quickly_without_allocating_it(tmp_path, registry):
    data = fault_suite_data()
    data["pretrain"]["batch_size"] = 1_000_000_000_000
    suite = write_suite(tmp_path, data)
    start = time.perf_counter()
    result = invoke("validate", str(suite))
    seconds = time.perf_counter() - start
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    (warning,) = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert "variants[0] (healthy): one pretraining step needs about" in warning
    assert "micro-batch 1000000000000" in warning
    assert seconds < 5, seconds


def test_the_estimate_grows_with_the_batch_not_with_what_is_drawn(registry):
    small = resolve_suite(fault_suite_data(), registry, "a.yaml")
    data = fault_suite_data()
    data["pretrain"]["batch_size"] = 64
    double = resolve_suite(data, registry, "b.yaml")
    one, two = (pretrain_step_bytes(s.variants[0], s) for s in (small, double))
    assert one < two < 2 * one


# ------------------------------------------------ the step as the device runs it (item 9)
GiB = 2**30


def vit_base_suite(registry, batch_size: int = 1024) -> Suite:
    """suites/stl10_vitb.yaml (timm ViT-B/16 at 224, decoder 512 x 8) at ``batch_size``."""
    data = yaml.safe_load((ROOT / "suites" / "stl10_vitb.yaml").read_text())
    data["pretrain"]["batch_size"] = batch_size
    return resolve_suite(data, registry, "stl10_vitb.yaml")


def block_bytes(tokens: int, width: int, value_bytes: int) -> int:
    """What a pre-norm transformer block (MLP ratio 4, fused attention) keeps for backward:
    its two norms' inputs (the fp32 residual stream), and in the compute dtype the qkv
    input, q, k and v, the attention output, the projection's input, fc1's input, the
    GELU's input and fc2's input: 1 + 3 + 1 + 1 + 1 + 4 + 4 = 15 widths per token."""
    return tokens * width * (2 * 4 + 15 * value_bytes)


def vit_base_inventory(batch: int, value_bytes: int) -> int:
    """The ViT-B MAE step by hand: weights x 4 (weights, gradients, AdamW's two moments),
    the batch x 3, and the blocks' activations: 12 encoder blocks of width 768 on the cls
    token and the 49 visible patches of 196 (75% masked), 8 decoder blocks of width 512 on
    all 197 tokens. No attention map: the fused kernels keep none."""
    params = 85_647_360 + 26_008_320  # the encoder (timm ViT-B/16, no head), the decoder
    activations = batch * (
        12 * block_bytes(50, 768, value_bytes) + 8 * block_bytes(197, 512, value_bytes)
    )
    return 4 * 4 * params + 3 * batch * 3 * 224 * 224 * 4 + activations


def test_vit_base_at_batch_1024_is_estimated_in_bf16_with_fused_attention(registry):
    """The issue's case: ViT-B at batch 1024 was estimated at 126 GiB for a GPU (fp32
    attention maps of the unfused attention, views counted once each) against about 53
    GiB of real need. Modelled as CUDA runs it (bf16 autocast, fused attention), the
    estimate is within 10% of the saved-tensor inventory, and so is the fp32 one of a
    CPU step; bf16 keeps a bit over half the bytes of fp32."""
    suite = vit_base_suite(registry)
    variant = suite.variants[0]
    cuda = pretrain_step_bytes(variant, suite, device=torch.device("cuda"))
    cpu = pretrain_step_bytes(variant, suite, device="cpu")
    assert cuda == pytest.approx(vit_base_inventory(1024, value_bytes=2), rel=0.1)
    assert cpu == pytest.approx(vit_base_inventory(1024, value_bytes=4), rel=0.1)
    assert 45 * GiB < cuda < 56 * GiB, cuda / GiB  # the issue: ~53 GiB, not ~127
    assert 0.55 < cuda / cpu < 0.65, cuda / cpu


@pytest.fixture
def gpu_of(monkeypatch):
    """A (mocked) GPU of ``gib`` GiB, as ``memory_budget`` reads it."""

    def mock(gib: int) -> torch.device:
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
        props = SimpleNamespace(total_memory=gib * GiB, name=f"mock {gib} GB GPU")
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: props)
        return torch.device("cuda")

    return mock


def test_an_80_gb_gpu_takes_vit_base_at_batch_1024(registry, gpu_of):
    """Before: refused on an 80 GB GPU (126 GiB needed). Now it fits; a 48 GB one is still
    refused, with the figures and the precision they assume."""
    suite = vit_base_suite(registry)
    assert memory_check(suite, gpu_of(80)).problem is None
    problem = memory_check(suite, gpu_of(48)).problem
    assert problem is not None and "stl10_vitb.yaml: variants[0] (vitb-l1)" in problem
    assert "in bf16 autocast), more than the mock 48 GB GPU's 48.0 GiB of memory" in problem


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_a_data_parallel_step_adds_the_gradient_buckets(registry, device):
    """DDP copies every gradient into its buckets: a process of two holding the same
    micro-batch as one process alone needs the weights' bytes more, exactly."""
    data = fault_suite_data()
    data["variants"] = [{"name": "vit", "encoder": tiny_suite_data()["variants"][1]["encoder"]}]
    alone = resolve_suite(data, registry, "a.yaml")
    data["pretrain"]["batch_size"] *= 2
    shared = resolve_suite(data, registry, "b.yaml")
    one = pretrain_step_bytes(alone.variants[0], alone, 1, device)
    two = pretrain_step_bytes(shared.variants[0], shared, 2, device)
    model = alone.variants[0].build_model(16, 3)
    assert two - one == sum(p.numel() * 4 for p in model.parameters()) > 0


# Real CPU steps' peak resident memory, measured in a fresh process (this module run as a
# script): a ViT whose decoder sees 257 tokens (the attention maps the old estimate kept
# made it 3.7x the measured peak), and one like the STL-10 suite's at 64 px (1.3x).
MEASURED = {
    "vit-257-tokens": ({"patch_size": 4, "dim": 64, "depth": 2, "heads": 4,
                        "decoder_dim": 64, "decoder_depth": 2, "decoder_heads": 8}, 64, 32),
    "vit-stl10-like": ({"patch_size": 8, "dim": 192, "depth": 4, "heads": 6,
                        "decoder_dim": 128, "decoder_depth": 2, "decoder_heads": 4}, 64, 64),
}  # fmt: skip


def measured_suite_data(encoder: dict, image_size: int, batch_size: int) -> dict:
    """One ViT variant (``encoder``'s sizes) pretrained on augmented batches of
    ``batch_size`` synthetic images."""
    data = tiny_suite_data(name="measured")
    data["dataset"].update(image_size=image_size)
    data["pretrain"] = {"epochs": 1, "batch_size": batch_size, "lr": 1.0e-3,
                        "augment": {"crop_scale": [0.2, 1.0], "hflip": True}}  # fmt: skip
    data["variants"] = [{"name": "vit", "encoder": {"name": "vit", **encoder}}]
    return data


def _resident_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def measure_step(data: dict) -> dict[str, float]:
    """The peak resident memory that real pretraining steps (feeding, masks, forward,
    backward, AdamW) add to a warmed-up process holding the model and the images, and the
    estimate less the weights (which were there before). Two steps: the second one's
    backward runs beside AdamW's moments, as every step after the first does."""
    from mae_bench.data import ImageFeeder
    from mae_bench.device import peak_memory_mb, reset_peak_memory
    from mae_bench.plugins import load_registry
    from mae_bench.train import pretrain

    torch.set_num_threads(1)
    suite = resolve_suite(data, load_registry(), "measured.yaml")
    variant, ds, cfg = suite.variants[0], suite.config.dataset, suite.config.pretrain
    cpu = torch.device("cpu")
    torch.manual_seed(0)
    model = variant.build_model(ds.image_size, ds.channels)
    shape = (cfg.batch_size, ds.channels, ds.image_size, ds.image_size)
    images = torch.randint(0, 256, (2 * shape[0], *shape[1:]), dtype=torch.uint8)
    feeder = ImageFeeder(ds.image_size, ds.channels, (0.5,) * 3, (0.25,) * 3, cpu)
    parts = {"masking": variant.build_masking(), "losses": variant.build_losses(), "cfg": cfg}
    pretrain(model, images[:2], feeder, **parts, seed=0)  # warm-up: kernels, thread pools
    gc.collect()
    before = _resident_bytes()
    assert reset_peak_memory(cpu)
    pretrain(model, images, feeder, **parts, seed=0)
    measured = peak_memory_mb(cpu) * 2**20 - before
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    return {"measured": measured, "estimate": pretrain_step_bytes(variant, suite) - weights}


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's /proc")
@pytest.mark.parametrize("case", list(MEASURED))
def test_the_estimate_is_at_most_30_percent_above_a_measured_cpu_step(case):
    """The estimate errs on the safe side, by 14% to 16% here (the backward's transient is
    modelled as twice its largest saved tensor). glibc is told to give freed blocks back
    at once, so the resident peak follows the live tensors rather than its cache (without
    that it varies by about 10% from run to run)."""
    figures = measured_in_a_fresh_process(measured_suite_data(*MEASURED[case]))
    assert 0.9 < figures["estimate"] / figures["measured"] < 1.3, figures


def measured_in_a_fresh_process(data: dict, *mode: str) -> dict[str, float]:
    """:func:`measure_step` (or, with ``"finetune"``, :func:`measure_finetune_step`) of
    ``data`` in a fresh process, glibc giving freed blocks back at once."""
    done = subprocess.run(
        [sys.executable, "-m", "tests.test_memory", json.dumps(data), *mode],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
        env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_cuda_estimate_is_at_most_30_percent_above_a_measured_cuda_step(registry):
    """On a GPU: two real steps' peak allocated memory (bf16 autocast, fused attention)
    against the estimate for CUDA, the model on the device before them."""
    from mae_bench.data import ImageFeeder
    from mae_bench.train import pretrain

    data = measured_suite_data(*MEASURED["vit-stl10-like"])
    data["pretrain"]["batch_size"] = 512
    suite = resolve_suite(data, registry, "measured.yaml")
    variant, ds, cfg = suite.variants[0], suite.config.dataset, suite.config.pretrain
    cuda = torch.device("cuda")
    model = variant.build_model(ds.image_size, ds.channels).to(cuda)
    shape = (cfg.batch_size, ds.channels, ds.image_size, ds.image_size)
    images = torch.randint(0, 256, (2 * shape[0], *shape[1:]), dtype=torch.uint8)
    feeder = ImageFeeder(ds.image_size, ds.channels, (0.5,) * 3, (0.25,) * 3, cuda)
    parts = {"masking": variant.build_masking(), "losses": variant.build_losses(), "cfg": cfg}
    pretrain(model, images[:2], feeder, **parts, seed=0)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated(cuda)
    torch.cuda.reset_peak_memory_stats(cuda)
    pretrain(model, images, feeder, **parts, seed=0)
    measured = torch.cuda.max_memory_allocated(cuda) - before
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    estimate = pretrain_step_bytes(variant, suite, device=cuda) - weights
    assert 0.9 < estimate / measured < 1.3, (estimate, measured)


def test_a_fine_tuning_step_that_cannot_fit_is_refused_naming_its_batch(registry, gpu_of):
    """The STL-10 ViT-B suite pretrains in about 14 GiB at batch 128, which a 24 GB GPU
    holds; fine-tuning at batch 512 sees every patch (4x the tokens) and does not fit."""
    suite = vit_base_suite(registry, batch_size=128)
    assert memory_check(suite, gpu_of(24)).problem is None  # its fine-tuning batch is 128
    data = yaml.safe_load((ROOT / "suites" / "stl10_vitb.yaml").read_text())
    data["pretrain"]["batch_size"] = 128
    data["eval"]["finetune"]["batch_size"] = 512
    bigger = resolve_suite(data, registry, "stl10_vitb.yaml")
    problem = memory_check(bigger, gpu_of(24)).problem
    assert problem is not None and "one finetune training step needs about" in problem
    assert "(batch 512 at 224x224, every patch visible" in problem
    assert "lower eval.finetune.batch_size" in problem


def measure_finetune_step(data: dict) -> dict[str, float]:
    """As :func:`measure_step`, for two real fine-tuning steps (the evaluator's training
    step: forward, cross-entropy, backward, AdamW) of a warmed-up process."""
    from mae_bench.device import peak_memory_mb, reset_peak_memory
    from mae_bench.memory import FINETUNE_CLASSES, training_step_bytes
    from mae_bench.plugins import load_registry

    torch.set_num_threads(1)
    suite = resolve_suite(data, load_registry(), "measured.yaml")
    variant, ds = suite.variants[0], suite.config.dataset
    (evaluator,) = [e.cls(e.params) for e in suite.evaluators if e.config["name"] == "finetune"]
    torch.manual_seed(0)
    step = evaluator.training_step(variant.build_model(ds.image_size, ds.channels), 10)
    module, optimizer = step.module, torch.optim.AdamW(step.module.parameters(), lr=1e-4)
    x = torch.randn(step.batch_size, ds.channels, ds.image_size, ds.image_size)
    labels = torch.randint(0, 10, (step.batch_size,))

    def train(images: Tensor, y: Tensor) -> None:
        loss = torch.nn.functional.cross_entropy(module(images), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    train(x[:2], labels[:2])  # warm-up: kernels, thread pools, AdamW's moments
    gc.collect()
    before = _resident_bytes()
    assert reset_peak_memory(torch.device("cpu"))
    for _ in range(2):
        train(x, labels)
    measured = peak_memory_mb(torch.device("cpu")) * 2**20 - before
    need, _ = training_step_bytes(evaluator, variant, suite)
    trained = sum(p.numel() * 4 for p in module.parameters())
    head = (FINETUNE_CLASSES - 10) * (module.head.in_features + 1) * 4 * 4  # its 1000 classes
    # the weights, their moments and the batch were there before the measured steps
    return {"measured": measured, "estimate": need - head - 3 * trained - x.numel() * 4}


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's /proc")
def test_the_fine_tuning_estimate_is_at_most_30_percent_above_a_measured_cpu_step():
    data = measured_suite_data(*MEASURED["vit-stl10-like"])
    data["eval"] = {"finetune": {"enabled": True, "batch_size": 64}}
    figures = measured_in_a_fresh_process(data, "finetune")
    assert 0.9 < figures["estimate"] / figures["measured"] < 1.3, figures


if __name__ == "__main__":  # a fresh process: python -m tests.test_memory DATA [finetune]
    measure = measure_finetune_step if sys.argv[2:] == ["finetune"] else measure_step
    print(json.dumps(measure(json.loads(sys.argv[1]))))
