"""The plugin contract: every hook a mae-bench plugin can implement.

Each hook receives a ``register`` callback; call it once per component class you provide::

    from mae_bench import hookimpl

    @hookimpl
    def register_losses(register):
        register(CharbonnierLoss)

A component class has a ``name`` (the string a suite uses) and a ``Params`` pydantic model
(its validated YAML parameters). See ``mae_bench.contract`` for the interface of each kind.
"""

from __future__ import annotations

from collections.abc import Callable

import pluggy

PROJECT_NAME = "mae_bench"
ENTRY_POINT_GROUP = "mae_bench"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)

Register = Callable[[type], None]


@hookspec
def register_encoders(register: Register) -> None:
    """Register masked-autoencoder models (subclasses of ``mae_bench.MaskedAutoencoder``)."""


@hookspec
def register_masking(register: Register) -> None:
    """Register masking strategies (subclasses of ``mae_bench.MaskingStrategy``)."""


@hookspec
def register_losses(register: Register) -> None:
    """Register reconstruction losses and regularizers (subclasses of ``mae_bench.Loss``)."""


@hookspec
def register_targets(register: Register) -> None:
    """Register prediction targets (subclasses of ``mae_bench.Target``): what a model
    predicts for a masked patch (normalised pixels, HOG, a teacher's features)."""


@hookspec
def register_datasets(register: Register) -> None:
    """Register datasets (subclasses of ``mae_bench.Dataset``)."""


@hookspec
def register_evaluators(register: Register) -> None:
    """Register evaluation protocols (subclasses of ``mae_bench.Evaluator``)."""


@hookspec
def register_loggers(register: Register) -> None:
    """Register run observers (subclasses of ``mae_bench.Logger``)."""


@hookspec
def register_launchers(register: Register) -> None:
    """Register ways to run a suite's cells (subclasses of ``mae_bench.Launcher``)."""
