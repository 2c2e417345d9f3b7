"""One cell, stage by stage: pretraining (checkpointed, data-parallel), loading stored weights,
evaluations, and storing each stage's result or the cell's failure.
"""

from __future__ import annotations

import csv
import errno
import io
import traceback
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from safetensors.torch import save_file

from mae_bench.checkpoints import load_weights
from mae_bench.contract import (
    EvalContext,
    ImageData,
    Logger,
    Loss,
    MaskedAutoencoder,
    MaskingStrategy,
)
from mae_bench.data import ImageFeeder
from mae_bench.device import (
    device_name,
    peak_memory_mb,
    reset_peak_memory,
)
from mae_bench.distributed import SINGLE, Dist
from mae_bench.errors import MaeBenchWarning
from mae_bench.evaluate import FeatureCache
from mae_bench.results import (
    FAILED_DIR,
    PRETRAIN_FILE,
    RESULT_FILE,
    CellStore,
    atomic_write_text,
    evaluations,
    provenance,
    write_json,
)
from mae_bench.resume import Checkpoint
from mae_bench.suite import Cell, Evaluation, Suite
from mae_bench.train import EpochCallback, PretrainResult, pretrain


@dataclass
class Pretrained:
    """A cell's pretrained model (on the device) and its pretraining record and history."""

    record: dict[str, Any]
    model: MaskedAutoencoder
    history: list[dict[str, float]]
    reused: bool = False  # loaded from the results folder, not trained now


@dataclass
class Evaluated:
    """One evaluation of a cell: its record and the evaluator's tables."""

    evaluation: Evaluation
    record: dict[str, Any]
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)  # <name>.csv


def describe(
    model: MaskedAutoencoder, masking: MaskingStrategy, losses: list[tuple[Loss, float]]
) -> dict[str, str]:
    """Short descriptions of a variant's components, for leaderboard columns."""
    terms = [
        loss.summary() if weight == 1 else f"{weight:g}*{loss.summary()}" for loss, weight in losses
    ]
    return {"encoder": model.summary(), "masking": masking.summary(), "loss": " + ".join(terms)}


def count_params(module: torch.nn.Module) -> float:
    """Trainable parameters, in millions."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad) / 1e6


def _history_csv(history: list[dict[str, float]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(history[0]) if history else ["epoch"])
    writer.writeheader()
    writer.writerows(history)
    return buffer.getvalue()


def _save_weights(module: torch.nn.Module, path: Path, metadata: dict[str, str]) -> None:
    tensors = {k: v.detach().cpu().clone().contiguous() for k, v in module.state_dict().items()}
    save_file(tensors, str(path), metadata=metadata)


class CellDisplay:
    """A rich progress display: cells done, and the current cell's epoch and loss."""

    def __init__(self, console: Console, total_cells: int) -> None:
        self.console = console
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[status]}"),
            TimeElapsedColumn(),
            console=console,
            transient=True,
        )
        self.cells = self.progress.add_task("cells", total=total_cells, status="")
        self.epochs = self.progress.add_task("epoch", total=1, status="", visible=False)

    @contextmanager
    def shown(self) -> Iterator[CellDisplay]:
        with self.progress:
            yield self

    def start_cell(self, cell: Cell, epochs: int) -> None:
        self.progress.update(self.cells, status=f"{cell.variant.name} seed {cell.seed}")
        self.progress.reset(
            self.epochs,
            total=epochs,
            visible=True,
            status="",
            description=f"{cell.variant.name}/seed{cell.seed} epoch",
        )

    def epoch(self, epoch: int, row: dict[str, float]) -> None:
        status = f"loss {row['loss']:.4f}  mask {row['mask_ratio']:.2f}"
        self.progress.update(self.epochs, completed=epoch, status=status)

    def evaluating(self) -> None:
        self.progress.update(self.epochs, status="evaluating")

    def end_cell(self, message: str) -> None:
        self.progress.advance(self.cells)
        self.console.print(message, highlight=False)


def pretrain_cell(
    cell: Cell,
    suite: Suite,
    data: ImageData,
    feeder: ImageFeeder,
    display: CellDisplay,
    on_epoch: EpochCallback | None = None,
    *,
    checkpoint: Checkpoint | None = None,
    world: Dist = SINGLE,
    on_resume: Callable[[int], None] | None = None,
) -> Pretrained:
    """Pretrain one cell (a baseline stays at its seeded random init).

    The model is built on the CPU, loaded from ``init_from`` if the variant says so, and
    moved to ``feeder.device`` here, once: every later stage (pretraining, probes,
    fine-tuning, reconstruction) runs it where it is.
    """
    cfg = suite.config
    reset_peak_memory(feeder.device)
    torch.manual_seed(cell.seed)
    model: MaskedAutoencoder = cell.variant.build_model(feeder.image_size, feeder.channels)
    if cell.variant.init_from:
        load_weights(model, Path(cell.variant.init_from))
    model.to(feeder.device)
    masking = cell.variant.build_masking()
    losses = cell.variant.build_losses()
    baseline = cell.variant.baseline
    display.start_cell(cell, 0 if baseline else cfg.pretrain.epochs)
    metrics: dict[str, float] = {
        "params_m": count_params(model.encoder),
        "params_total_m": count_params(model),
    }
    trained = PretrainResult()
    if not baseline:
        trained = pretrain(
            model,
            data.pretrain,
            feeder,
            masking,
            losses,
            cfg.pretrain,
            seed=cell.seed,
            on_epoch=on_epoch or display.epoch,
            checkpoint=checkpoint,
            world=world,
            on_resume=on_resume,
        )
        metrics.update(
            pretrain_s=trained.seconds,
            imgs_per_s=trained.images_per_second,
            final_loss=trained.history[-1]["loss"],
        )
    metrics["peak_mem_mb"] = peak_memory_mb(feeder.device)
    record = {
        "cell_id": cell.cell_id,
        "suite": cell.suite,
        "variant": cell.variant.name,
        "seed": cell.seed,
        "config_hash": cell.config_hash,
        "config": cell.config,
        "components": (
            {"encoder": model.summary(), "masking": "none", "loss": "none (no pretraining)"}
            if baseline
            else describe(model, masking, losses)
        ),
        "baseline": baseline,
        "metrics": metrics,
        "data": {
            "mean": feeder.mean,
            "std": feeder.std,
            "num_classes": data.num_classes,
            "pretrain_sees_test": suite.build_dataset().pretrain_sees_test,
        },
        "provenance": {
            **provenance(device_name(feeder.device)),
            "plugins": suite.plugin_versions(),
            "world_size": world.world_size,
        },
    }
    return Pretrained(record, model, trained.history)


def load_pretrained(
    cell: Cell, record: dict[str, Any], store: CellStore, feeder: ImageFeeder
) -> Pretrained:
    """A stored cell's model, rebuilt and loaded from its weights, on the device."""
    model = cell.variant.build_model(feeder.image_size, feeder.channels)
    load_weights(model, store.path(cell.cell_id))
    return Pretrained(record, model.to(feeder.device), [], reused=True)


def evaluate_cell(
    cell: Cell,
    suite: Suite,
    data: ImageData,
    feeder: ImageFeeder,
    model: MaskedAutoencoder,
    mean_image: torch.Tensor,
    evaluations_to_run: list[Evaluation],
    checkpoints: Callable[[Evaluation], Checkpoint | None] | None = None,
) -> Iterator[Evaluated]:
    """Run the given evaluations on a cell's model, sharing one frozen-feature cache, and
    yield each as it ends (so it can be stored before the next starts).

    ``checkpoints`` gives each evaluation its checkpoint file (``EvalContext.checkpoint``).

    Each record holds the evaluator's metrics, how to show them (so tables render without
    the plugin) and its tables' names. A metric an evaluator did not declare, or a table name
    taken twice, is that plugin's bug.
    """
    ctx = EvalContext(
        model=model.eval(),
        data=data,
        feeder=feeder,
        features=FeatureCache(model, data, feeder),
        seed=cell.seed,
        baseline=cell.variant.baseline,
        decoder_loss=cell.variant.decoder_loss(),
        masking=None if cell.variant.baseline else cell.variant.build_masking(),
        mean_image=mean_image,
        thresholds=suite.config.eval.thresholds.values(),
    )
    for evaluation in evaluations_to_run:
        evaluator = evaluation.evaluator.cls(evaluation.evaluator.params)
        declared = evaluator.metrics()
        ctx.checkpoint = checkpoints(evaluation) if checkpoints else None
        result = evaluator.evaluate(ctx)
        undeclared = sorted(set(result.metrics) - set(declared))
        reserved = sorted(name for name in result.tables if not name.isidentifier())
        if undeclared or reserved:
            raise RuntimeError(
                f"evaluator {evaluator.name!r} returned undeclared metrics {undeclared} or "
                f"table names that are not plain names {reserved}: a bug in its plugin"
            )
        record = {
            "evaluator": evaluator.name,
            "eval_id": evaluation.eval_id,
            "cell_id": cell.cell_id,
            "config_hash": evaluation.config_hash,
            "config": evaluation.config,
            "metrics": {k: float(v) for k, v in result.metrics.items()},
            "info": {k: declared[k].as_dict() for k in result.metrics},
            "metric_order": [k for k in declared if k in result.metrics],
            "tables": sorted(result.tables),
            "trains_encoder": evaluator.trains_encoder,
            "summary_priority": evaluator.summary_priority,
            "confusion": result.confusion,
            "provenance": provenance(device_name(feeder.device)),
        }
        model.eval()
        yield Evaluated(evaluation, record, result.tables)


@dataclass(frozen=True)
class CellFailure:
    """Why a cell failed, and where its traceback is (None if it could not be written)."""

    reason: str
    log: Path | None


def failure_line(exc: BaseException) -> str:
    """One line saying why a cell failed, with a hint for the failures that have one."""
    message = str(exc).strip()
    line = f"{type(exc).__name__}: {message.splitlines()[0] if message else ''}"
    if isinstance(exc, torch.OutOfMemoryError):
        line += (
            " (hint: lower pretrain.batch_size or eval.finetune.batch_size with --set, or use a "
            "smaller encoder)"
        )
    elif isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        line += " (the disk holding the results is full: free space, then run again)"
    return line


def headline(record: dict[str, Any]) -> list[str]:
    """``name value`` of each evaluator's headline metrics, formatted as it declares."""
    return [
        f"{name} {info['fmt'].format(evaluation['metrics'][name])}"
        for _, evaluation in evaluations(record)
        for name, info in evaluation["info"].items()
        if info["headline"]
    ]


def record_failure(root: Path, cell: Cell, exc: BaseException) -> CellFailure:
    """Write the cell's traceback to ``failed/<cell id>.log`` (a re-run retries the cell)."""
    reason = failure_line(exc)
    path = root / FAILED_DIR / f"{cell.cell_id}.log"
    text = "".join(traceback.format_exception(exc))
    try:
        atomic_write_text(path, f"{reason}\n\n{text}")
    except OSError:  # e.g. the disk is full: the reason is still reported
        return CellFailure(reason, None)
    return CellFailure(reason, path)


def store_pretrained(store: CellStore, cell: Cell, pre: Pretrained) -> None:
    meta = {"cell_id": cell.cell_id, "config_hash": cell.config_hash}

    def write_files(folder: Path) -> None:
        _save_weights(pre.model.encoder, folder / "encoder.safetensors", meta)
        _save_weights(pre.model.decoder, folder / "decoder.safetensors", meta)
        (folder / "history.csv").write_text(_history_csv(pre.history), encoding="utf-8")
        write_json(folder / PRETRAIN_FILE, pre.record)  # last: its presence marks it done

    store.write(cell.cell_id, write_files)


def store_evaluation(store: CellStore, cell: Cell, out: Evaluated) -> None:
    def write_files(folder: Path) -> None:
        for name, table in out.tables.items():
            table.to_csv(folder / f"{name}.csv", index=False)
        write_json(folder / RESULT_FILE, out.record)  # last: its presence marks it done

    store.write_eval(cell.cell_id, out.record["eval_id"], write_files)


def result_ids(cell: Cell) -> tuple[str, list[str]]:
    return cell.cell_id, [e.eval_id for e in cell.evaluations]


def plan_cells(
    store: CellStore, cells: list[Cell]
) -> dict[str, tuple[dict[str, Any] | None, list[Evaluation]] | None]:
    """Per cell: None if it is finished, else its stored pretraining record (None: pretrain
    it) and the evaluations still to run. Damaged records are set aside first."""
    plan: dict[str, tuple[dict[str, Any] | None, list[Evaluation]] | None] = {}
    for cell in cells:
        whole = store.finished([result_ids(cell)], repair=True)
        if cell.cell_id in whole:
            plan[cell.cell_id] = None
            continue
        missing = [e for e in cell.evaluations if not store.is_done(cell.cell_id, e.eval_id)]
        plan[cell.cell_id] = (store.read(cell.cell_id), missing)  # damage was set aside above
    return plan


class LoggerSet:
    """The suite's loggers, each guarded: one that fails is reported once and switched off,
    and the run goes on."""

    def __init__(self, loggers: list[Logger]) -> None:
        self.active = list(loggers)

    def call(self, method: str, *args: Any) -> None:
        """Call ``method`` on every active logger."""
        for logger in list(self.active):
            try:
                getattr(logger, method)(*args)
            except Exception as exc:
                self.active.remove(logger)
                warnings.warn(
                    f"logger {logger.name!r} failed in {method} ({type(exc).__name__}: {exc}): "
                    "switched off for the rest of the run",
                    MaeBenchWarning,
                    stacklevel=2,
                )
