"""Run loggers: TensorBoard event files per cell (as the official MAE code writes them) and
Weights & Biases runs (online, or offline with ``WANDB_MODE=offline``).

Both packages are optional (``pip install 'mae-bench[tensorboard]'`` / ``'mae-bench[wandb]'``):
a suite naming a logger whose package is missing fails validation with that command.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path
from typing import Any, Literal

from mae_bench import Logger, Params, hookimpl


def _require(package: str, extra: str) -> None:
    if importlib.util.find_spec(package) is None:
        raise ValueError(
            f"the {package!r} package is not installed: pip install 'mae-bench[{extra}]'"
        )


def _scalars(values: dict[str, Any]) -> dict[str, float]:
    return {
        k: float(v)
        for k, v in values.items()
        if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
    }


class TensorBoardParams(Params):
    """``log_dir``: where event files go (default: ``<results>/tensorboard``), one folder
    per cell."""

    log_dir: str | None = None


class TensorBoardLogger(Logger):
    """TensorBoard event files: pretraining curves per epoch and evaluation metrics per cell."""

    name = "tensorboard"
    Params = TensorBoardParams

    def __init__(self, params: TensorBoardParams) -> None:
        super().__init__(params)
        _require("tensorboard", "tensorboard")
        self.root = Path(".")
        self.writers: dict[str, Any] = {}
        self.epochs: dict[str, int] = {}

    def start_run(self, suite: str, root: Any, config: dict[str, Any]) -> None:
        self.root = Path(self.params.log_dir) if self.params.log_dir else Path(root) / "tensorboard"

    def start_cell(self, cell_id: str, config: dict[str, Any]) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writers[cell_id] = SummaryWriter(log_dir=str(self.root / cell_id))
        self.epochs[cell_id] = 0

    def log_epoch(self, cell_id: str, epoch: int, row: dict[str, float]) -> None:
        writer = self.writers[cell_id]
        for key, value in _scalars(row).items():
            if key != "epoch":
                writer.add_scalar(f"pretrain/{key}", value, epoch)
        self.epochs[cell_id] = epoch

    def log_evaluation(self, cell_id: str, evaluator: str, metrics: dict[str, float]) -> None:
        writer = self.writers[cell_id]
        for key, value in _scalars(metrics).items():
            writer.add_scalar(f"{evaluator}/{key}", value, self.epochs[cell_id])
        writer.flush()

    def end_cell(self, cell_id: str, metrics: dict[str, float]) -> None:
        self.writers.pop(cell_id).close()

    def end_run(self) -> None:
        for writer in self.writers.values():
            writer.close()
        self.writers.clear()


class WandbParams(Params):
    """One W&B run per cell, grouped by suite. ``mode``: ``online``, ``offline`` (no network:
    sync later with ``wandb sync``) or ``disabled``; unset, wandb's own default and
    ``WANDB_MODE`` apply. ``dir``: where runs go (default: the results folder)."""

    project: str = "mae-bench"
    entity: str | None = None
    mode: Literal["online", "offline", "disabled"] | None = None
    dir: str | None = None


class WandbLogger(Logger):
    """Weights & Biases: a run per cell with its config, epoch curves and metrics."""

    name = "wandb"
    Params = WandbParams

    def __init__(self, params: WandbParams) -> None:
        super().__init__(params)
        _require("wandb", "wandb")
        self.suite, self.root = "", Path(".")
        self.runs: dict[str, Any] = {}

    def start_run(self, suite: str, root: Any, config: dict[str, Any]) -> None:
        self.suite = suite
        self.root = Path(self.params.dir) if self.params.dir else Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def start_cell(self, cell_id: str, config: dict[str, Any]) -> None:
        import wandb

        p = self.params
        self.runs[cell_id] = wandb.init(
            project=p.project,
            entity=p.entity,
            mode=p.mode,
            dir=str(self.root),
            name=cell_id,
            group=self.suite,
            config=config,
            reinit="create_new",
        )

    def log_epoch(self, cell_id: str, epoch: int, row: dict[str, float]) -> None:
        self.runs[cell_id].log(
            {f"pretrain/{k}": v for k, v in _scalars(row).items() if k != "epoch"}, step=epoch
        )

    def log_evaluation(self, cell_id: str, evaluator: str, metrics: dict[str, float]) -> None:
        scores = {f"{evaluator}/{k}": v for k, v in _scalars(metrics).items()}
        self.runs[cell_id].summary.update(scores)

    def end_cell(self, cell_id: str, metrics: dict[str, float]) -> None:
        self.runs.pop(cell_id).finish()

    def end_run(self) -> None:
        for run in self.runs.values():
            run.finish(exit_code=1)
        self.runs.clear()


@hookimpl
def register_loggers(register):
    register(TensorBoardLogger)
    register(WandbLogger)
