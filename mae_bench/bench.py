"""How fast a pretraining step runs on this device, against what the device could do
(``tox -e bench-gpu``, or ``python -m mae_bench.bench``).

Two shapes: the STL-10 suite's ViT (96 px, patch 8, encoder 192 x 8, decoder 128 x 4,
batch 256; ``suites/stl10.yaml``) and the ViT-Base one (timm's ViT-B/16 at 224, decoder
512 x 8; ``suites/stl10_vitb.yaml``), on synthetic uint8 images of their size. Per shape
and mode (eager, and ``torch.compile``d), one row: images/s, the step's FLOPs (as
:func:`mae_bench.cell.step_flops` counts them for ``pretrain_tflops``: forward, losses and
backward), the achieved TFLOP/s, the model FLOPs utilisation (MFU) against the device's
peak, and the split of a step's time into data (gather, feed, augment, masks), forward +
backward, and optimizer.

The step is the training loop's (:func:`mae_bench.train.train_step`, timed phase by
phase): the feeder and masks of :func:`mae_bench.train.pretrain`, the forward pass in bf16
autocast on CUDA (:func:`mae_bench.train.forward_loss`), fused AdamW there, TF32 matmuls.
On CUDA the clock synchronizes the device around each phase; images/s there comes from
steps run back to back without synchronizing (as training runs them), on the CPU from the
phases' sum. The peak is the datasheet's dense tensor-core figure for known GPUs
(:data:`PEAK_TFLOPS`, bf16 as the loop computes), else a measured matrix product rate
(fp32 on the CPU, bf16 on an unknown GPU).

On the CPU the same models run on fewer images and steps (``cpu_batch``), so the run takes
a few minutes. A compiled row runs in a child process with a time limit
(``--compile-timeout``, default 60 s on the CPU, where inductor's C++ compile of one model
can take minutes on a busy machine, and 600 s elsewhere); a compile that fails or does not
finish in time is shown as unavailable with the reason, never a crash.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tabulate import tabulate

from mae_bench.cell import step_flops
from mae_bench.data import ImageFeeder
from mae_bench.device import Compiled, device_name, prepare, resolve_device
from mae_bench.errors import UserError, exception_line
from mae_bench.plugins import load_registry
from mae_bench.suite import Suite, resolve_suite
from mae_bench.train import draw_mask, forward_loss, make_optimizer

# ------------------------------------------------------------------ what the device can do
PEAK_TFLOPS: tuple[tuple[str, str, dict[str, float | None]], ...] = (
    (r"H200 NVL", "H200 NVL", {"bf16": 835.5, "fp16": 835.5, "fp32": 60.0}),
    (r"H200", "H200 SXM", {"bf16": 989.4, "fp16": 989.4, "fp32": 66.9}),
    (r"H100 NVL", "H100 NVL", {"bf16": 835.5, "fp16": 835.5, "fp32": 60.0}),
    (r"H100 PCIE", "H100 PCIe", {"bf16": 756.5, "fp16": 756.5, "fp32": 51.2}),
    (r"H100", "H100 SXM", {"bf16": 989.4, "fp16": 989.4, "fp32": 66.9}),
    (r"A100", "A100", {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5}),
    (r"\bL4\b", "L4", {"bf16": 121.0, "fp16": 121.0, "fp32": 30.3}),
    (r"V100 PCIE", "V100 PCIe", {"bf16": None, "fp16": 112.0, "fp32": 14.0}),
    (r"V100", "V100 SXM2", {"bf16": None, "fp16": 125.0, "fp32": 15.7}),
)
"""Dense peak TFLOP/s of known GPUs by precision, from NVIDIA's datasheets (bf16 and fp16
on tensor cores without sparsity, fp32 without TF32; None: no tensor-core rate): (pattern
matched on the upper-cased device name with dashes as spaces, label, peaks). The first
pattern that matches is the device's."""


@dataclass(frozen=True)
class Peak:
    """A device's peak rate for the precision a step computes in, and where it comes from."""

    tflops: float
    precision: str
    source: str


def known_peak(name: str) -> tuple[str, dict[str, float | None]] | None:
    """The label and dense peaks (:data:`PEAK_TFLOPS`) of a GPU named ``name``, or None."""
    normalized = name.upper().replace("-", " ")
    for pattern, label, peaks in PEAK_TFLOPS:
        if re.search(pattern, normalized):
            return label, peaks
    return None


def matmul_tflops(device: torch.device, dtype: torch.dtype, size: int, repeats: int = 5) -> float:
    """The best rate of ``repeats`` square matrix products of side ``size`` on ``device``."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    torch.mm(a, b)  # warm-up: kernels chosen, threads started
    best = math.inf
    for _ in range(repeats):
        start = clock(device)
        torch.mm(a, b)
        best = min(best, clock(device) - start)
    return 2 * size**3 / best / 1e12


def device_peak(device: torch.device) -> Peak:
    """What :func:`run_step` rows are compared with: a known GPU's bf16 peak (fp16 where bf16
    has no tensor-core rate), an unknown GPU's measured bf16 matrix product rate, or the
    CPU's measured fp32 one (the precision the loop computes in there)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        known = known_peak(name)
        if known is not None:
            label, peaks = known
            precision = "bf16" if peaks["bf16"] is not None else "fp16"
            tflops = peaks[precision]
            assert tflops is not None
            return Peak(tflops, precision, f"datasheet: {label}, dense")
        rate = matmul_tflops(device, torch.bfloat16, 8192)
        return Peak(rate, "bf16", f"measured: 8192x8192 bf16 matmul ({name} not in the table)")
    size = 1024
    rate = matmul_tflops(device, torch.float32, size)
    return Peak(rate, "fp32", f"measured: {size}x{size} fp32 matmul")


def clock(device: torch.device) -> float:
    """Seconds (``perf_counter``), once the device has finished what it was given."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()
    return time.perf_counter()


# ------------------------------------------------------------------ the shapes
@dataclass(frozen=True)
class BenchShape:
    """A pretraining step to time: ``variant`` pretrained as ``pretrain`` says on synthetic
    images of ``image_size``, ``batch`` images per step (``cpu_batch`` and ``cpu_steps``
    timed steps on the CPU)."""

    name: str
    image_size: int
    pretrain: dict[str, Any]
    variant: dict[str, Any]
    batch: int = 256
    cpu_batch: int = 8
    cpu_steps: int = 3

    @property
    def suite(self) -> dict[str, Any]:
        """A suite of this variant alone, on synthetic images (never loaded)."""
        dataset = {"name": "synthetic", "image_size": self.image_size, "channels": 3}
        return {"name": self.name, "dataset": dataset, "pretrain": self.pretrain,
                "variants": [self.variant]}  # fmt: skip


_STL10_PRETRAIN = {
    "epochs": 100,
    "batch_size": 256,
    "lr": 1.0e-3,
    "warmup_epochs": 10,
    "weight_decay": 0.05,
    "augment": {"crop_scale": [0.2, 1.0], "hflip": True},
}
_STL10_VIT = {
    "name": "vit",
    "patch_size": 8,
    "dim": 192,
    "depth": 8,
    "heads": 6,
    "decoder_dim": 128,
    "decoder_depth": 4,
    "decoder_heads": 4,
}
_VIT_B = {"name": "timm", "model": "vit_base_patch16_224", "decoder_dim": 512,
          "decoder_depth": 8, "decoder_heads": 16}  # fmt: skip
SHAPES: tuple[BenchShape, ...] = (
    BenchShape("stl10", 96, _STL10_PRETRAIN, {"name": "mae-original", "encoder": _STL10_VIT,
               "masking": {"name": "random", "ratio": 0.75}, "loss": {"name": "mse"}},
               cpu_batch=8, cpu_steps=3),
    BenchShape("stl10-vitb", 224, {**_STL10_PRETRAIN, "lr": 6.0e-4}, {"name": "vitb-l1",
               "encoder": _VIT_B, "masking": {"name": "random", "ratio": 0.75},
               "loss": {"name": "l1"}}, cpu_batch=2, cpu_steps=2),
)  # fmt: skip
"""``suites/stl10.yaml``'s ``mae-original`` and ``suites/stl10_vitb.yaml``'s ``vitb-l1``
(the tests keep them equal to the suites' own)."""

PROGRESS = 0.5
"""Where in training the timed steps are (a masking schedule's ratio there)."""


# ------------------------------------------------------------------ one row
@dataclass
class Row:
    """One shape in one mode on one device: per-step medians of each phase (seconds)."""

    shape: str
    mode: str
    batch: int
    steps: int
    flops_per_step: float
    data_s: float = math.nan
    forward_backward_s: float = math.nan
    optimizer_s: float = math.nan
    pipelined_s: float = math.nan  # a step's time run back to back (CUDA), else NaN
    first_step_s: float = math.nan  # the first step (compiling, for a compiled row)
    note: str = ""

    @property
    def step_s(self) -> float:
        """A step's time: run back to back where measured, else the sum of its phases."""
        if not math.isnan(self.pipelined_s):
            return self.pipelined_s
        return self.data_s + self.forward_backward_s + self.optimizer_s

    @property
    def images_per_s(self) -> float:
        """Pretraining throughput."""
        return self.batch / self.step_s

    @property
    def tflops(self) -> float:
        """Achieved TFLOP/s (counted FLOPs over the step's time)."""
        return self.flops_per_step / self.step_s / 1e12


def shape_suite(shape: BenchShape) -> Suite:
    """``shape``'s suite, validated against the installed plugins."""
    return resolve_suite(shape.suite, load_registry(), f"bench:{shape.name}")


def run_step(
    shape: BenchShape,
    device: torch.device,
    mode: str = "eager",
    *,
    batch: int | None = None,
    steps: int | None = None,
    warmup: int | None = None,
) -> Row:
    """Time ``shape``'s pretraining step on ``device`` (``mode``: ``eager`` or ``compiled``):
    ``warmup`` untimed steps after the first, then ``steps`` timed ones (defaults: the
    shape's batch, 5 and 20 on a GPU; its ``cpu_batch``, 0 and ``cpu_steps`` on the CPU)."""
    on_cpu = device.type == "cpu"
    batch = batch or (shape.cpu_batch if on_cpu else shape.batch)
    steps = steps or (shape.cpu_steps if on_cpu else 20)
    warmup = (0 if on_cpu else 5) if warmup is None else warmup
    suite = shape_suite(shape)
    variant, cfg, ds = suite.variants[0], suite.config.pretrain, suite.config.dataset
    masking, losses = variant.build_masking(), variant.build_losses()
    with torch.device("meta"):
        counted = variant.build_model(ds.image_size, ds.channels)
    flops = step_flops(counted, masking, losses, PROGRESS)[1] * batch
    prepare(device)
    torch.manual_seed(0)
    model = variant.build_model(ds.image_size, ds.channels).to(device)
    model.train()
    net: torch.nn.Module = model
    if mode == "compiled":
        net = Compiled(model)
    optimizer = make_optimizer(model, cfg, device)
    feeder = ImageFeeder(ds.image_size, ds.channels, (0.5,) * 3, (0.25,) * 3, device)
    order, aug, masks = (torch.Generator().manual_seed(seed) for seed in (0, 1, 2))
    shape_ = (batch, ds.channels, ds.image_size, ds.image_size)
    images = torch.randint(0, 256, shape_, dtype=torch.uint8, generator=order)

    def step(timed: bool) -> tuple[float, float, float]:
        """train_step's phases, with the clock read between them when ``timed``."""
        now = (lambda: clock(device)) if timed else (lambda: 0.0)
        start = now()
        x = feeder(images[torch.randperm(batch, generator=order)], cfg.augment, aug)
        mask = draw_mask(masking, batch, model, PROGRESS, masks, full_check=False)
        fed = now()
        optimizer.zero_grad(set_to_none=True)
        loss, _ = forward_loss(model, x, mask, losses, forward=net)
        loss.backward()
        backward = now()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        return fed - start, backward - fed, now() - backward

    start = clock(device)
    step(timed=False)
    row = Row(shape.name, mode, batch, steps, flops, first_step_s=clock(device) - start)
    for _ in range(warmup):
        step(timed=False)
    phases = [step(timed=True) for _ in range(steps)]
    row.data_s, row.forward_backward_s, row.optimizer_s = (
        statistics.median(p[i] for p in phases) for i in range(3)
    )
    if device.type == "cuda":
        start = clock(device)
        for _ in range(steps):
            step(timed=False)
        row.pipelined_s = (clock(device) - start) / steps
    return row


def run_compiled_child(
    shape: BenchShape, device: torch.device, timeout_s: float, args: Sequence[str] = ()
) -> Row:
    """``shape``'s compiled row, timed in a child process given ``timeout_s`` seconds;
    unavailable (with the reason in ``note``) when compiling fails or takes longer."""
    command = [sys.executable, "-m", "mae_bench.bench", "--child", shape.name,
               "--device", str(device), *args]  # fmt: skip
    unavailable = Row(shape.name, "compiled", 0, 0, math.nan)
    # its own process group: a timeout ends the compiler's worker processes with it
    child = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        stdout, stderr = child.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        _end_group(child)
        unavailable.note = (
            f"unavailable: not compiled and timed within {timeout_s:g} s on this device "
            "(--compile-timeout to wait longer)"
        )
        return unavailable
    lines = stdout.strip().splitlines()
    if child.returncode != 0 or not lines:
        reason = (stderr.strip().splitlines() or ["no output"])[-1]
        unavailable.note = f"unavailable: {reason}"
        return unavailable
    return Row(**json.loads(lines[-1]))


def _end_group(child: subprocess.Popen[str]) -> None:
    """End ``child`` and the processes it started (its session's group), then reap it."""
    try:
        os.killpg(child.pid, signal.SIGKILL)
    except (AttributeError, ProcessLookupError):  # no process groups (Windows), or gone
        child.kill()
    child.communicate()


def _child(shape: BenchShape, device: torch.device, **options: Any) -> int:
    """The child process's part: print the compiled row as JSON, or its reason."""
    try:
        row = run_step(shape, device, "compiled", **options)
    except Exception as exc:  # a compiler that cannot run here: a reason, not a traceback
        row = Row(shape.name, "compiled", 0, 0, math.nan)
        row.note = f"unavailable: {exception_line(exc)}"
    print(json.dumps(asdict(row)))
    return 0


# ------------------------------------------------------------------ the table
HEADERS = ["shape", "mode", "batch", "images/s", "GFLOP/step", "TFLOP/s", "MFU",
           "data ms", "fwd+bwd ms", "optim ms", "step ms", "first step s", "note"]  # fmt: skip


def table(rows: Sequence[Row], peak: Peak) -> str:
    """The rows as a Markdown table, MFU against ``peak``."""

    def number(value: float, digits: int) -> str:
        return "—" if math.isnan(value) else f"{value:,.{digits}f}"

    lines = []
    for r in rows:
        if not r.batch:
            lines.append([r.shape, r.mode, "—", *["—"] * 9, r.note])
            continue
        lines.append([
            r.shape, r.mode, r.batch, number(r.images_per_s, 1),
            number(r.flops_per_step / 1e9, 1), number(r.tflops, 3),
            f"{100 * r.tflops / peak.tflops:.1f}%", number(1e3 * r.data_s, 1),
            number(1e3 * r.forward_backward_s, 1), number(1e3 * r.optimizer_s, 1),
            number(1e3 * r.step_s, 1), number(r.first_step_s, 1), r.note,
        ])  # fmt: skip
    return tabulate(lines, headers=HEADERS, tablefmt="github", disable_numparse=True)


def cpu_model() -> str:
    """The CPU's model name (Linux's ``/proc/cpuinfo``), or what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def header(device: torch.device, peak: Peak) -> str:
    """What ran where, and the peak the MFU is against."""
    where = device_name(device)
    if device.type == "cpu":
        threads = torch.get_num_threads()
        where = f"{cpu_model()}, {threads} thread{'s' if threads > 1 else ''}"
    return (
        f"device: {where}; torch {torch.__version__}\n"
        f"peak: {peak.tflops:,.3g} TFLOP/s {peak.precision} ({peak.source})\n"
        "FLOPs: forward, losses and backward as FlopCounterMode counts them (the optimizer's "
        "element-wise update is not counted)"
    )


def bench(
    device: torch.device,
    shapes: Sequence[BenchShape] = SHAPES,
    modes: Sequence[str] = ("eager", "compiled"),
    *,
    compile_timeout_s: float | None = None,
    echo: Callable[[str], None] = print,
    **options: Any,
) -> list[Row]:
    """Every shape in every mode on ``device``, printed (``echo``) as a table; the rows."""
    peak = device_peak(device)
    echo(header(device, peak))
    timeout = compile_timeout_s or (60.0 if device.type == "cpu" else 600.0)
    passed = [f"--{k}={v}" for k, v in options.items() if v is not None]
    rows = []
    for shape in shapes:
        for mode in modes:
            if mode == "compiled":
                rows.append(run_compiled_child(shape, device, timeout, passed))
            else:
                rows.append(run_step(shape, device, mode, **options))
                if device.type == "cuda":  # the next row's process gets the memory back
                    gc.collect()
                    torch.cuda.empty_cache()
    echo(table(rows, peak))
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m mae_bench.bench [--device D] [--shapes a,b] [--modes eager,compiled]``."""
    parser = argparse.ArgumentParser(
        prog="python -m mae_bench.bench",
        description="Time a pretraining step of the STL-10 suites' shapes on this device, "
        "eager and compiled: images/s, FLOPs, TFLOP/s, MFU against the device's peak, and "
        "its data / forward+backward / optimizer split (module mae_bench.bench says more).",
    )
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    names = [s.name for s in SHAPES]
    parser.add_argument("--shapes", default=",".join(names), help=f"of {', '.join(names)}")
    parser.add_argument("--modes", default="eager,compiled", help="of eager, compiled")
    parser.add_argument("--batch", type=_at_least(1), help="images per step (default: per shape)")
    parser.add_argument("--steps", type=_at_least(1), help="timed steps (default 20; CPU: 2-3)")
    parser.add_argument("--warmup", type=_at_least(0), help="untimed steps after the first")
    parser.add_argument(
        "--compile-timeout", type=_at_least(1, float), help="seconds (default: CPU 60, else 600)"
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)  # a compiled row's own process
    args = parser.parse_args(argv)
    options = {"batch": args.batch, "steps": args.steps, "warmup": args.warmup}
    by_name = {s.name: s for s in SHAPES}
    try:
        device = resolve_device(args.device)
        if args.child:
            return _child(by_name[args.child], device, **options)
        shapes = [by_name[n] for n in _names(args.shapes, by_name, "--shapes")]
        modes = _names(args.modes, {"eager": 0, "compiled": 1}, "--modes")
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    bench(device, shapes, modes, compile_timeout_s=args.compile_timeout, **options)
    return 0


def _at_least(low: float, kind: type = int) -> Callable[[str], Any]:
    """An argparse type: a number of ``kind`` no smaller than ``low``."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low} (got {text})")
        return value

    return parse


def _names(value: str, known: dict[str, Any], option: str) -> list[str]:
    """A comma-separated list of names, each one of ``known``."""
    names = [n.strip() for n in value.split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise UserError(f"{option}: unknown {', '.join(unknown) or 'empty list'} "
                        f"(known: {', '.join(known)})")  # fmt: skip
    return names


if __name__ == "__main__":
    sys.exit(main())
