"""mae-bench: a plugin-based benchmarking suite for Masked Autoencoder variants.

The public contract for plugin authors is re-exported here. The names are loaded on first
use, so that ``import mae_bench`` (and ``mae-bench --help``) does not import torch.
"""

from __future__ import annotations

from importlib import import_module
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

try:
    __version__ = version("mae-bench")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0+unknown"

# public name -> the module that defines it
_PUBLIC = {
    "Component": "mae_bench.contract",
    "Dataset": "mae_bench.contract",
    "EvalContext": "mae_bench.contract",
    "EvalResult": "mae_bench.contract",
    "Evaluator": "mae_bench.contract",
    "ImageData": "mae_bench.contract",
    "Logger": "mae_bench.contract",
    "Loss": "mae_bench.contract",
    "LossInputs": "mae_bench.contract",
    "MAEOutput": "mae_bench.contract",
    "Mask": "mae_bench.contract",
    "MaskedAutoencoder": "mae_bench.contract",
    "MaskingStrategy": "mae_bench.contract",
    "Metric": "mae_bench.contract",
    "Params": "mae_bench.contract",
    "TablePlot": "mae_bench.contract",
    "Target": "mae_bench.contract",
    "TrainingStep": "mae_bench.contract",
    "Launcher": "mae_bench.runner",
    "LaunchRequest": "mae_bench.runner",
    "ConfigError": "mae_bench.errors",
    "MaeBenchWarning": "mae_bench.errors",
    "UserError": "mae_bench.errors",
    "hookimpl": "mae_bench.hookspecs",
}

__all__ = [
    "Component",
    "ConfigError",
    "Dataset",
    "EvalContext",
    "EvalResult",
    "Evaluator",
    "ImageData",
    "LaunchRequest",
    "Launcher",
    "Logger",
    "Loss",
    "LossInputs",
    "MAEOutput",
    "MaeBenchWarning",
    "Mask",
    "MaskedAutoencoder",
    "MaskingStrategy",
    "Metric",
    "Params",
    "TablePlot",
    "Target",
    "TrainingStep",
    "UserError",
    "__version__",
    "hookimpl",
]

if TYPE_CHECKING:
    from mae_bench.contract import (
        Component,
        Dataset,
        EvalContext,
        EvalResult,
        Evaluator,
        ImageData,
        Logger,
        Loss,
        LossInputs,
        MAEOutput,
        Mask,
        MaskedAutoencoder,
        MaskingStrategy,
        Metric,
        Params,
        TablePlot,
        Target,
        TrainingStep,
    )
    from mae_bench.errors import ConfigError, MaeBenchWarning, UserError
    from mae_bench.hookspecs import hookimpl
    from mae_bench.runner import Launcher, LaunchRequest


def __getattr__(name: str) -> Any:
    """Load a public name from its module on first use (PEP 562)."""
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'mae_bench' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_PUBLIC})
