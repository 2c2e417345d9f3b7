"""``tox -e bench-gpu`` (``python -m mae_bench.bench``, issue 18 item 11): the shapes are the
STL-10 suites' own, the peaks are the datasheets' (or a measured matmul rate), a step is
timed phase by phase with the device synchronized, its FLOPs are the ones a real step does,
and a compile that fails or takes too long is a row saying why, never a crash."""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from mae_bench import bench
from mae_bench.bench import SHAPES, BenchShape, Row, device_peak, known_peak, run_step
from mae_bench.train import draw_mask, forward_loss
from tests.conftest import ROOT

CPU = torch.device("cpu")
TINY = BenchShape(
    "tiny",
    16,
    {"epochs": 1, "batch_size": 4, "lr": 1.0e-3,
     "augment": {"crop_scale": [0.2, 1.0], "hflip": True}},
    {"name": "vit", "encoder": {"name": "vit", "patch_size": 4, "dim": 32, "depth": 1,
                                "heads": 2, "decoder_dim": 16, "decoder_depth": 1}},
    batch=4, cpu_batch=4, cpu_steps=2,
)  # fmt: skip


@pytest.mark.parametrize(
    ("shape", "suite_file", "variant"),
    [(SHAPES[0], "stl10.yaml", "mae-original"), (SHAPES[1], "stl10_vitb.yaml", "vitb-l1")],
)
def test_the_shapes_are_the_suites_own(shape, suite_file, variant):
    suite = yaml.safe_load((ROOT / "suites" / suite_file).read_text())
    (theirs,) = [v for v in suite["variants"] if v["name"] == variant]
    assert shape.variant == theirs
    assert shape.pretrain == suite["pretrain"] and shape.batch == suite["pretrain"]["batch_size"]
    assert shape.image_size == suite["dataset"]["image_size"]


@pytest.mark.parametrize(
    ("name", "label", "tflops", "precision"),
    [
        ("NVIDIA H100 80GB HBM3", "H100 SXM", 989.4, "bf16"),
        ("NVIDIA H100 PCIe", "H100 PCIe", 756.5, "bf16"),
        ("NVIDIA H100 NVL", "H100 NVL", 835.5, "bf16"),
        ("NVIDIA H200", "H200 SXM", 989.4, "bf16"),
        ("NVIDIA A100-SXM4-80GB", "A100", 312.0, "bf16"),
        ("NVIDIA A100 80GB PCIe", "A100", 312.0, "bf16"),
        ("NVIDIA L4", "L4", 121.0, "bf16"),
        ("Tesla V100-SXM2-32GB", "V100 SXM2", 125.0, "fp16"),  # no bf16 tensor cores
        ("Tesla V100-PCIE-16GB", "V100 PCIe", 112.0, "fp16"),
    ],
)
def test_known_gpus_are_compared_with_their_datasheet_peak(
    monkeypatch, name, label, tflops, precision
):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    peak = device_peak(torch.device("cuda"))
    assert (peak.tflops, peak.precision) == (tflops, precision)
    assert peak.source == f"datasheet: {label}, dense"


def test_an_unknown_gpu_and_the_cpu_are_compared_with_a_measured_matmul_rate(monkeypatch):
    assert known_peak("NVIDIA L40S") is None  # not an L4
    measured = []
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA L40S")
    monkeypatch.setattr(
        bench, "matmul_tflops", lambda device, dtype, size: measured.append(dtype) or 362.0
    )
    peak = device_peak(torch.device("cuda"))
    assert (peak.tflops, peak.precision, measured) == (362.0, "bf16", [torch.bfloat16])
    assert peak.source.startswith("measured: 8192x8192 bf16 matmul (NVIDIA L40S not in")
    monkeypatch.undo()
    cpu = device_peak(CPU)  # really measured
    assert cpu.precision == "fp32" and cpu.source.startswith("measured: 1024x1024 fp32")
    assert 1e-4 < cpu.tflops < 100


def test_the_cuda_clock_waits_for_the_device(monkeypatch):
    synced = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: synced.append(device))
    bench.clock(CPU)
    assert synced == []
    bench.clock(torch.device("cuda", 1))
    assert synced == [torch.device("cuda", 1)]


def real_step_flops(shape: BenchShape, batch: int) -> int:
    """FLOPs of one real CPU step of ``shape``, counted around the step itself, attention
    unfused (FlopCounterMode has no formula for the CPU's fused attention kernel)."""
    suite = bench.shape_suite(shape)
    variant, ds = suite.variants[0], suite.config.dataset
    model = variant.build_model(ds.image_size, ds.channels)
    masking, losses = variant.build_masking(), variant.build_losses()
    x = torch.randn(batch, ds.channels, ds.image_size, ds.image_size)
    mask = draw_mask(masking, batch, model, bench.PROGRESS, torch.Generator().manual_seed(0))
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        loss, _ = forward_loss(model, x, mask, losses)
        loss.backward()
    return counter.get_total_flops()


def test_a_step_is_timed_phase_by_phase_with_the_flops_a_real_step_does():
    row = run_step(TINY, CPU, batch=4, steps=2)
    assert (row.shape, row.mode, row.batch, row.steps) == ("tiny", "eager", 4, 2)
    assert row.flops_per_step == real_step_flops(TINY, 4) > 0
    phases = (row.data_s, row.forward_backward_s, row.optimizer_s)
    assert all(0 < p < 60 for p in phases) and row.first_step_s > 0
    assert math.isnan(row.pipelined_s)  # on the CPU a step is the sum of its phases
    assert row.step_s == pytest.approx(sum(phases))
    assert row.images_per_s == pytest.approx(4 / sum(phases))
    assert row.tflops == pytest.approx(row.flops_per_step / sum(phases) / 1e12)


def test_the_table_has_every_figure_and_says_why_a_row_is_missing(capsys):
    peak = bench.Peak(0.5, "fp32", "measured: 1024x1024 fp32 matmul")
    timed = Row("tiny", "eager", 4, 2, 2e9, 0.1, 0.5, 0.2, first_step_s=1.5)
    missing = Row("tiny", "compiled", 0, 0, math.nan, note="unavailable: no compiler")
    lines = bench.table([timed, missing], peak).splitlines()
    assert [c.strip() for c in lines[0].strip("|").split("|")] == bench.HEADERS
    cells = [c.strip() for c in lines[2].strip("|").split("|")]
    # 4 images in 0.8 s: 5 images/s; 2 GFLOP in 0.8 s: 0.0025 TFLOP/s, 0.5% of 0.5 TFLOP/s
    assert cells == ["tiny", "eager", "4", "5.0", "2.0", "0.003", "0.5%", "100.0", "500.0",
                     "200.0", "800.0", "1.5", ""]  # fmt: skip
    assert lines[3].split("|")[-2].strip() == "unavailable: no compiler"


def test_a_compile_that_fails_or_does_not_finish_is_a_row_saying_why(monkeypatch, capsys):
    slow = bench.run_compiled_child(SHAPES[0], CPU, timeout_s=0.5)
    assert (slow.mode, slow.batch) == ("compiled", 0)
    assert slow.note == (
        "unavailable: not compiled and timed within 0.5 s on this device "
        "(--compile-timeout to wait longer)"
    )
    broken = bench.run_compiled_child(SHAPES[0], CPU, 120, ["--steps=oops"])
    assert broken.note.endswith("error: argument --steps: not a number: 'oops'")

    def no_compiler(model, **kwargs):
        raise RuntimeError("Compiler: cc not found")

    monkeypatch.setattr(torch, "compile", no_compiler)
    assert bench._child(TINY, CPU, batch=2, steps=1, warmup=0) == 0  # the child's side
    (printed,) = capsys.readouterr().out.splitlines()
    row = Row(**json.loads(printed))
    assert row.note == "unavailable: RuntimeError: Compiler: cc not found"


def test_bad_options_are_one_line_naming_them(capsys):
    assert bench.main(["--shapes", "stl10,stl11"]) == 2
    assert capsys.readouterr().err == (
        "error: --shapes: unknown stl11 (known: stl10, stl10-vitb)\n"
    )
    assert bench.main(["--modes", "fast"]) == 2
    assert "error: --modes: unknown fast (known: eager, compiled)" in capsys.readouterr().err
    assert bench.main(["--device", "tpu"]) == 2
    assert capsys.readouterr().err.startswith("error: --device: unknown or unsupported device")
    with pytest.raises(SystemExit) as exited:
        bench.main(["--batch", "0"])
    assert exited.value.code == 2
    assert capsys.readouterr().err.endswith("error: argument --batch: must be at least 1 (got 0)\n")


@pytest.mark.slow
def test_the_stl10_shape_runs_and_prints_its_table(capsys):
    """The command itself on this machine, the STL-10 shape eager, on few images."""
    assert (
        bench.main(["--shapes", "stl10", "--modes", "eager", "--batch", "2", "--steps", "1"]) == 0
    )
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("device: ") and "fp32 (measured: 1024x1024 fp32 matmul)" in out[1]
    cells = [c.strip() for c in out[5].strip("|").split("|")]
    assert cells[:3] == ["stl10", "eager", "2"] and float(cells[3]) > 0
    assert float(cells[4]) == pytest.approx(2 * 1.672, abs=0.05)  # GFLOP per step (1 decimal)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_a_gpu_both_shapes_run_in_bf16_below_the_peak():
    rows = bench.bench(torch.device("cuda"), modes=("eager",), steps=3, warmup=1)
    peak = device_peak(torch.device("cuda"))
    for row in rows:
        assert row.batch == 256 and not math.isnan(row.pipelined_s)
        assert 0 < row.tflops < peak.tflops
