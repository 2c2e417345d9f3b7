"""mae-bench: a plugin-based benchmarking suite for Masked Autoencoder variants.

The public contract for plugin authors is re-exported here.
"""

from importlib.metadata import PackageNotFoundError, version

from mae_bench.contract import (
    Dataset,
    EvalContext,
    EvalResult,
    Evaluator,
    ImageData,
    Launcher,
    LaunchRequest,
    Logger,
    Loss,
    LossInputs,
    MAEOutput,
    Mask,
    MaskedAutoencoder,
    MaskingStrategy,
    Metric,
    Params,
)
from mae_bench.errors import ConfigError, MaeBenchWarning, UserError
from mae_bench.hookspecs import hookimpl

try:
    __version__ = version("mae-bench")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0+unknown"

__all__ = [
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
    "UserError",
    "__version__",
    "hookimpl",
]
