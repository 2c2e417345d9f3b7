"""Device selection, the per-device training settings (autocast, fused optimizers), and the
provenance (versions, commit, device, date) stored beside every result."""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import platform
import subprocess
import sys
from functools import cache
from pathlib import Path

import timm
import torch

import mae_bench
from mae_bench.errors import UserError
from mae_bench.leases import host_name


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA, then MPS, then CPU; anything else must be available."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda", "mps"):
        raise UserError(
            f"--device: unknown or unsupported device {name!r} (use auto, cpu, cuda, cuda:N or mps)"
        )
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device: CUDA was requested but is not available on this machine")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError("--device: MPS was requested but is not available on this machine")
    return device


def device_name(device: torch.device) -> str:
    """A human-readable name of the device, for provenance."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "mps":
        return f"Apple MPS ({platform.machine()})"
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA; full precision elsewhere."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


class Compiled(torch.nn.Module):
    """``module`` (a model, or its DistributedDataParallel wrapper) run through
    ``torch.compile``: called as the module is, ``no_sync()`` passed on to a DDP wrapper.

    Shapes are dynamic on demand (``dynamic=None``, torch's automatic dynamic shapes): the
    first shape compiles a static graph, and a dimension seen to change (the visible tokens
    of a curriculum, a last smaller batch) is compiled once more as a symbolic size instead
    of once per value. The weights stay ``module``'s: checkpoints save the module itself."""

    def __init__(self, module: torch.nn.Module) -> None:
        super().__init__()
        self.module = module
        self.compiled = torch.compile(module, dynamic=None)

    def forward(self, *args: object, **kwargs: object) -> object:
        return self.compiled(*args, **kwargs)

    def no_sync(self) -> contextlib.AbstractContextManager:
        """DDP's ``no_sync`` (gradient accumulation); a no-op for a plain module."""
        inner = getattr(self.module, "no_sync", None)
        return inner() if inner is not None else contextlib.nullcontext()


def optimizer_options(device: torch.device) -> dict[str, bool]:
    """Fused AdamW on CUDA; the multi-tensor (foreach) step elsewhere (~13% faster on CPU)."""
    return {"fused": True} if device.type == "cuda" else {"foreach": True}


CLEAR_REFS = Path("/proc/self/clear_refs")  # Linux: writing "5" resets the peak RSS (VmHWM)
PROC_STATUS = Path("/proc/self/status")  # Linux: VmHWM, the peak RSS since the last reset


def reset_peak_memory(device: torch.device) -> bool:
    """Start a new peak-memory measurement: CUDA's allocator statistics, or on a Linux CPU
    the process's peak resident set (``/proc/self/clear_refs``). False where no new
    measurement can start (the CPU elsewhere): the peak so far would include earlier cells'."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return True
    if device.type != "cpu":
        return False
    try:
        CLEAR_REFS.write_text("5", encoding="ascii")
    except OSError:
        return False
    return _resident_peak_kib() is not None


def _resident_peak_kib() -> int | None:
    """The process's peak resident set since the last reset (VmHWM, KiB); None if unknown."""
    try:
        status = PROC_STATUS.read_text(encoding="ascii", errors="replace")
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return None


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory in MiB since :func:`reset_peak_memory`: allocated CUDA memory, or the
    process's peak resident set on a Linux CPU; NaN where it is not measured."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    peak = _resident_peak_kib() if device.type == "cpu" else None
    return float("nan") if peak is None else peak / 2**10


def prepare(device: torch.device) -> None:
    """Per-process settings for the device (TF32 matmuls on CUDA)."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


@cache
def git_commit() -> str:
    """The git commit of the mae-bench source tree ('+dirty' if modified), or 'unknown'."""
    source = Path(mae_bench.__file__).resolve().parent.parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=source, capture_output=True, text=True, timeout=5
        )
        if commit.returncode != 0:
            return "unknown"
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=source,
            capture_output=True,
            text=True,
            timeout=5,
        )
        return commit.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


@cache
def run_id() -> str:
    """This process's run: its host, process id and start time (UTC). Cells timed in one
    run on one host can be compared for speed; others cannot."""
    started = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return f"{host_name()}-{os.getpid()}-{started}"


def provenance(device_name: str) -> dict[str, str]:
    """Versions, commit, device, host, run (:func:`run_id`) and date to store beside every
    result (``device_name``: :func:`device_name` of where it ran)."""
    return {
        "mae_bench_version": mae_bench.__version__,
        "git_commit": git_commit(),
        "torch_version": torch.__version__,
        "timm_version": timm.__version__,
        "python_version": sys.version.split()[0],
        "platform": platform.platform(),
        "device": device_name,
        "host": host_name(),
        "run_id": run_id(),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
