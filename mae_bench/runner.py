"""The suite runner: for every (variant, seed) cell, pretrain, evaluate and store the result."""

from __future__ import annotations

import contextlib
import csv
import errno
import io
import os
import time
import traceback
import warnings
from collections.abc import Iterator
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
from mae_bench.device import device_name, peak_memory_mb, prepare, reset_peak_memory
from mae_bench.errors import MaeBenchWarning, UserError
from mae_bench.evaluate import FeatureCache
from mae_bench.leaderboard import write_leaderboard
from mae_bench.results import (
    FAILED_DIR,
    PRETRAIN_FILE,
    RESULT_FILE,
    SUITE_FILE,
    CellStore,
    OlderResults,
    atomic_write_text,
    evaluations,
    provenance,
    read_suite_record,
    write_json,
)
from mae_bench.suite import Cell, Evaluation, Suite
from mae_bench.train import EpochCallback, PretrainResult, pretrain


@dataclass
class RunSummary:
    """What a suite run did."""

    root: Path
    finished: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, CellFailure] = field(default_factory=dict)
    leaderboard: pd.DataFrame | None = None
    markdown: str = ""  # the leaderboard as printed


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


class _Display:
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
    def shown(self) -> Iterator[_Display]:
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
    display: _Display,
    on_epoch: EpochCallback | None = None,
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
) -> list[Evaluated]:
    """Run the given evaluations on a cell's model, sharing one frozen-feature cache.

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
    out = []
    for evaluation in evaluations_to_run:
        evaluator = evaluation.evaluator.cls(evaluation.evaluator.params)
        declared = evaluator.metrics()
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
        out.append(Evaluated(record, result.tables))
        model.eval()
    return out


def run_suite(
    suite: Suite,
    out_dir: Path,
    device: torch.device,
    console: Console | None = None,
    *,
    replace: bool = False,
) -> RunSummary:
    """Run every unfinished cell of ``suite`` and write the leaderboard; resumable.

    Before any training: a results folder holding another suite's finished cells is refused
    (``replace`` moves it aside instead), damaged cells are set aside to be recomputed,
    stale temporary folders are removed, and the output is probed for writing and free space.
    """
    console = console or Console(stderr=True)
    root = out_dir / suite.name
    cells = suite.cells()
    _claim_folder(root, suite, cells, replace)
    store = CellStore(root)
    store.clean_stale_tmp()
    summary = RunSummary(root=root)
    plan = _plan(store, cells)
    pending = [c for c in cells if plan[c.cell_id] is not None]
    summary.skipped = [c.cell_id for c in cells if plan[c.cell_id] is None]
    if summary.skipped:
        console.print(f"{len(summary.skipped)} of {len(cells)} cells already finished: skipped")
    reused = [c for c in pending if plan[c.cell_id][0] is not None]
    if reused:
        todo = sorted({e.name for c in reused for e in plan[c.cell_id][1]})
        console.print(
            f"{len(reused)} cells reuse their stored pretraining and only run: "
            f"{', '.join(todo)}",
            highlight=False,
        )
    if pending:
        prepare(device)
        ds = suite.config.dataset
        console.print(f"loading dataset {ds.name} ...", highlight=False)
        data = suite.build_dataset().load()  # a missing dataset fails here, before any write
        fresh = [c for c in pending if plan[c.cell_id][0] is None]
        store.check_writable(sum(_result_bytes(c, suite) for c in fresh) + (1 << 20))
        feeder = ImageFeeder.fit(
            data.pretrain, image_size=ds.image_size, channels=ds.channels, device=device
        )
        mean_image = feeder.mean_image(data.pretrain)
        _write_suite_record(root, suite, cells)
        loggers = LoggerSet(suite.build_loggers())
        loggers.call("start_run", suite.name, root, suite.resolved)
        console.print(
            f"running {len(pending)} cells of suite {suite.name!r} on {device_name(device)}",
            highlight=False,
        )
        display = _Display(console, len(pending))
        with display.shown(), contextlib.ExitStack() as stack:
            stack.callback(loggers.call, "end_run")
            for cell in pending:
                start = time.perf_counter()
                stored, missing = plan[cell.cell_id]
                loggers.call("start_cell", cell.cell_id, cell.config)

                def on_epoch(epoch: int, row: dict[str, float], cell_id: str = cell.cell_id):
                    display.epoch(epoch, row)
                    loggers.call("log_epoch", cell_id, epoch, row)

                try:
                    if stored is None:
                        pre = pretrain_cell(cell, suite, data, feeder, display, on_epoch)
                        _store_pretrained(store, cell, pre)
                    else:
                        display.start_cell(cell, 0)
                        pre = load_pretrained(cell, stored, store, feeder)
                    display.evaluating()
                    for out in evaluate_cell(
                        cell, suite, data, feeder, pre.model, mean_image, missing
                    ):
                        _store_evaluation(store, cell, out)
                        loggers.call(
                            "log_evaluation",
                            cell.cell_id,
                            out.record["evaluator"],
                            out.record["metrics"],
                        )
                except Exception as exc:  # one cell's failure is that cell's, not the suite's
                    failure = _record_failure(root, cell, exc)
                    summary.failed[cell.cell_id] = failure
                    display.end_cell(f"[red]FAILED[/red] {cell.cell_id}: {failure.reason}")
                    del exc  # drop the traceback's frames (and the cell's tensors) now
                    if device.type == "cuda":  # give a failed cell's memory back
                        torch.cuda.empty_cache()
                    continue
                (root / FAILED_DIR / f"{cell.cell_id}.log").unlink(missing_ok=True)
                summary.finished.append(cell.cell_id)
                whole = store.finished([_ids(cell)], repair=False).get(cell.cell_id, {})
                loggers.call("end_cell", cell.cell_id, whole.get("metrics", {}))
                shown = "  ".join(_headline(whole)[:4]) if whole else ""
                reuse = " (pretraining reused)" if pre.reused else ""
                display.end_cell(
                    f"done {cell.variant.name} seed {cell.seed}{reuse}: {shown}  "
                    f"({time.perf_counter() - start:.0f} s)"
                )
    _write_suite_record(root, suite, cells)
    records = list(store.finished([_ids(c) for c in cells], repair=False).values())
    summary.leaderboard, summary.markdown = write_leaderboard(
        root,
        records,
        title=suite.name,
        primary=suite.config.primary_metric,
        reference=suite.config.reference,
    )
    return summary


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


def _ids(cell: Cell) -> tuple[str, list[str]]:
    return cell.cell_id, [e.eval_id for e in cell.evaluations]


def _plan(
    store: CellStore, cells: list[Cell]
) -> dict[str, tuple[dict[str, Any] | None, list[Evaluation]] | None]:
    """Per cell: None if it is finished, else its stored pretraining record (None: pretrain
    it) and the evaluations still to run. Damaged records are set aside first."""
    plan: dict[str, tuple[dict[str, Any] | None, list[Evaluation]] | None] = {}
    for cell in cells:
        whole = store.finished([_ids(cell)], repair=True)
        if cell.cell_id in whole:
            plan[cell.cell_id] = None
            continue
        missing = [e for e in cell.evaluations if not store.is_done(cell.cell_id, e.eval_id)]
        plan[cell.cell_id] = (store.read(cell.cell_id), missing)  # damage was set aside above
    return plan


def _claim_folder(root: Path, suite: Suite, cells: list[Cell], replace: bool) -> None:
    """Refuse to write into a results folder whose finished cells all belong to another
    suite (another suite of the same name, or this one with every setting changed): the
    leaderboard would silently lose them. ``replace`` moves such a folder aside."""
    if not (root / SUITE_FILE).exists():
        return
    aside = root.with_name(f"{root.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
    try:
        old = read_suite_record(root)
    except OlderResults:
        if not replace:
            raise
        _move_aside(root, aside)
        return
    except UserError as exc:
        warnings.warn(f"{exc}: it is rewritten", MaeBenchWarning, stacklevel=2)
        return
    store = CellStore(root)
    finished = [c["cell_id"] for c in old["cells"] if store.path(c["cell_id"]).is_dir()]
    ours = {c.cell_id for c in cells}
    if old["name"] == suite.name and (not finished or ours & set(finished)):
        return
    if replace:
        _move_aside(root, aside)
        return
    raise UserError(
        f"--out: {root} holds the results of another suite ({old['name']!r} from "
        f"{old.get('source', '?')}: {len(finished)} finished cells, none of them part of this "
        "suite, e.g. every setting changed); writing here would orphan them. Use another "
        f"--out, or --replace to move them aside to {aside.name}"
    )


def _move_aside(root: Path, aside: Path) -> None:
    os.replace(root, aside)
    warnings.warn(f"moved the previous results {root} to {aside}", MaeBenchWarning, 3)


def _result_bytes(cell: Cell, suite: Suite) -> int:
    """About what a cell's folder takes on disk: its weights, plus 1 MiB of tables."""
    ds = suite.config.dataset
    with torch.device("meta"):
        model = cell.variant.build_model(ds.image_size, ds.channels)
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    return weights + (1 << 20)


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


def _headline(record: dict[str, Any]) -> list[str]:
    """``name value`` of each evaluator's headline metrics, formatted as it declares."""
    return [
        f"{name} {info['fmt'].format(evaluation['metrics'][name])}"
        for _, evaluation in evaluations(record)
        for name, info in evaluation["info"].items()
        if info["headline"]
    ]


def _record_failure(root: Path, cell: Cell, exc: BaseException) -> CellFailure:
    """Write the cell's traceback to ``failed/<cell id>.log`` (a re-run retries the cell)."""
    reason = failure_line(exc)
    path = root / FAILED_DIR / f"{cell.cell_id}.log"
    text = "".join(traceback.format_exception(exc))
    try:
        atomic_write_text(path, f"{reason}\n\n{text}")
    except OSError:  # e.g. the disk is full: the reason is still reported
        return CellFailure(reason, None)
    return CellFailure(reason, path)


def _store_pretrained(store: CellStore, cell: Cell, pre: Pretrained) -> None:
    meta = {"cell_id": cell.cell_id, "config_hash": cell.config_hash}

    def write_files(folder: Path) -> None:
        _save_weights(pre.model.encoder, folder / "encoder.safetensors", meta)
        _save_weights(pre.model.decoder, folder / "decoder.safetensors", meta)
        (folder / "history.csv").write_text(_history_csv(pre.history), encoding="utf-8")
        write_json(folder / PRETRAIN_FILE, pre.record)  # last: its presence marks it done

    store.write(cell.cell_id, write_files)


def _store_evaluation(store: CellStore, cell: Cell, out: Evaluated) -> None:
    def write_files(folder: Path) -> None:
        for name, table in out.tables.items():
            table.to_csv(folder / f"{name}.csv", index=False)
        write_json(folder / RESULT_FILE, out.record)  # last: its presence marks it done

    store.write_eval(cell.cell_id, out.record["eval_id"], write_files)


def _write_suite_record(root: Path, suite: Suite, cells: list[Cell]) -> None:
    cell_ids = [
        {
            "cell_id": c.cell_id,
            "variant": c.variant.name,
            "seed": c.seed,
            "config_hash": c.config_hash,
            "evaluations": [e.eval_id for e in c.evaluations],
        }
        for c in cells
    ]
    record = {
        "name": suite.name,
        "source": suite.source,
        "resolved": suite.resolved,
        "cells": cell_ids,
    }
    write_json(root / SUITE_FILE, record)
