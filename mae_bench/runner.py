"""The suite runner: for every (variant, seed) cell, pretrain, evaluate and store the result."""

from __future__ import annotations

import contextlib
import csv
import datetime as dt
import errno
import io
import os
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from filelock import FileLock
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from safetensors.torch import save_file

from mae_bench import resume
from mae_bench.checkpoints import load_weights
from mae_bench.contract import (
    EvalContext,
    ImageData,
    Launcher,
    LaunchRequest,
    Logger,
    Loss,
    MaskedAutoencoder,
    MaskingStrategy,
)
from mae_bench.data import ImageFeeder
from mae_bench.device import (
    device_name,
    peak_memory_mb,
    prepare,
    reset_peak_memory,
    resolve_device,
)
from mae_bench.distributed import SINGLE, Dist, cell_device, env_world
from mae_bench.distributed import start as start_world
from mae_bench.errors import MaeBenchWarning, UserError
from mae_bench.evaluate import FeatureCache
from mae_bench.leaderboard import write_leaderboard
from mae_bench.leases import Lease, Leases
from mae_bench.results import (
    FAILED_DIR,
    LEADERBOARD_LOCK,
    PRETRAIN_FILE,
    RESULT_FILE,
    SUITE_FILE,
    CellStore,
    OlderResults,
    atomic_write_text,
    evaluations,
    provenance,
    read_suite_record,
    suite_cells,
    write_json,
)
from mae_bench.resume import CHECKPOINT_DIR, Checkpoint
from mae_bench.suite import Cell, Evaluation, Suite
from mae_bench.train import EpochCallback, PretrainResult, pretrain


@dataclass
class RunSummary:
    """What a suite run did."""

    root: Path
    finished: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, CellFailure] = field(default_factory=dict)
    elsewhere: list[str] = field(default_factory=list)  # held by another live worker
    resumed: dict[str, int] = field(default_factory=dict)  # cell -> epoch resumed from
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


def run_suite(
    suite: Suite,
    out_dir: Path,
    device: torch.device,
    console: Console | None = None,
    *,
    replace: bool = False,
    launcher: Launcher | None = None,
    device_option: str = "auto",
) -> RunSummary:
    """Run every unfinished cell of ``suite`` and write the leaderboard; resumable.

    Before any training: a results folder holding another suite's finished cells is refused
    (``replace`` moves it aside instead), damaged cells are set aside to be recomputed,
    stale temporary folders are removed, and the output is probed for writing and free space.
    Cells run in this process (one rank of a ``torchrun`` world, if started so), or as jobs of
    ``launcher`` (whose workers are started with ``--device device_option``).
    Cells another process holds are left to it; whichever process ends last writes the
    complete leaderboard.
    """
    console = console or Console(stderr=True)
    root = out_dir / suite.name
    cells = suite.cells()
    world = env_world()
    summary = RunSummary(root=root)
    pending: list[Cell] = []
    if world.is_main:
        _claim_folder(root, suite, cells, replace)
        store = CellStore(root)
        store.clean_stale_tmp()
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
    context = None
    if launcher is None:
        start_world(world, cell_device(device, world))
        if world.is_main and pending:  # a missing dataset fails here, before any write
            context = _Context.load(suite, root, device, world, console)
    if world.is_main and pending:
        fresh = [c for c in pending if plan[c.cell_id][0] is None]
        store.check_writable(sum(_result_bytes(c, suite) for c in fresh) + (1 << 20))
    if launcher is None:
        _work(suite, root, device, cells, world, console, summary, context)
    elif pending:
        _write_suite_record(root, suite, cells)
        ids = tuple(c.cell_id for c in pending)
        console.print(
            f"launching {len(ids)} cells of suite {suite.name!r} with {launcher.summary()}",
            highlight=False,
        )
        launcher.launch(LaunchRequest(root, ids, device_option), console)
        _collect(root, pending, summary)
    if world.is_main:
        _write_suite_record(root, suite, cells)
        summary.leaderboard, summary.markdown = _suite_leaderboard(root, suite, cells)
    return summary


def rebuild_leaderboard(
    root: Path,
    cells: list[tuple[str, list[str]]],
    title: str,
    primary: str,
    reference: str | None,
) -> tuple[pd.DataFrame, str, int]:
    """Write the leaderboard from every finished one of ``cells`` (``(cell_id, eval_ids)``)
    under a lock: of processes sharing the folder, the one that ends last writes one that
    holds every cell. Returns the table, its Markdown and the number of finished cells."""
    with FileLock(root / LEADERBOARD_LOCK):
        records = list(CellStore(root).finished(cells, repair=False).values())
        table, markdown = write_leaderboard(root, records, title, primary, reference)
    return table, markdown, len(records)


def _suite_leaderboard(root: Path, suite: Suite, cells: list[Cell]) -> tuple[pd.DataFrame, str]:
    cfg = suite.config
    table, markdown, _ = rebuild_leaderboard(
        root, [_ids(c) for c in cells], suite.name, cfg.primary_metric, cfg.reference
    )
    return table, markdown


def run_cells(
    root: Path,
    cell_ids: list[str],
    device_option: str = "auto",
    console: Console | None = None,
    stop_signal: tuple[int, Any] | None = None,
    summary: RunSummary | None = None,
) -> bool:
    """A worker: run the given cells (all pending ones if none are given) of the suite whose
    results folder is ``root``, claiming each; rebuild the leaderboard at the end.

    Returns False if a stop signal ended it (the cell in training saved a checkpoint).
    """
    from mae_bench.plugins import load_registry
    from mae_bench.suite import resolve_suite

    console = console or Console(stderr=True)
    record = read_suite_record(root)
    suite = resolve_suite(record["resolved"], load_registry(), source=record["source"])
    cells = suite.cells()
    known = {c.cell_id: c for c in cells}
    unknown = [i for i in cell_ids if i not in known]
    if unknown:
        raise UserError(f"{root}: no cell {', '.join(unknown)} in suite {suite.name!r}")
    chosen = [known[i] for i in cell_ids] if cell_ids else cells
    world = env_world()
    device = cell_device(resolve_device(device_option), world)
    summary = summary if summary is not None else RunSummary(root=root)
    stop, outside = stop_signal if stop_signal else (None, None)
    signals = (
        resume.handle_signals(stop=(stop,), save=(), outside=outside)
        if stop is not None
        else contextlib.nullcontext()  # the command line installed the handlers
    )
    try:
        with signals:
            start_world(world, device)
            _work(suite, root, device, chosen, world, console, summary)
    except resume.Terminated as exc:
        if stop is None:
            raise
        console.print(f"stopped by signal {exc.signum}: {exc.detail or 'no cell in training'}")
        return False
    if world.is_main:
        _suite_leaderboard(root, suite, cells)
    return True


def _work(
    suite: Suite,
    root: Path,
    device: torch.device,
    cells: list[Cell],
    world: Dist,
    console: Console,
    summary: RunSummary,
    context: _Context | None = None,
) -> None:
    """Claim and run ``cells`` one by one in this process (rank 0 claims; in a data-parallel
    world every rank pretrains each cell, and rank 0 evaluates and stores it)."""
    store, leases = CellStore(root), Leases(root)
    by_id = {c.cell_id: c for c in cells}
    queue = list(cells)
    console = console if world.is_main else Console(quiet=True)  # rank 0 reports
    display = _Display(console, len(cells))
    with display.shown(), contextlib.ExitStack() as stack:
        while True:
            claimed = _claim_next(store, leases, queue, world, summary) if world.is_main else None
            shared = world.broadcast(
                (claimed[0].cell_id, claimed[2][0] is None) if claimed else None
            )
            if shared is None:
                break
            cell, needs_pretraining = by_id[shared[0]], shared[1]
            if context is None:
                context = _Context.load(suite, root, device, world, console)
            if not context.started:
                context.start(suite, root, world, console)
                stack.callback(context.loggers.call, "end_run")
            if not world.is_main:
                if needs_pretraining:
                    _pretrain_on_rank(cell, suite, context, display, world)
                world.barrier()  # rank 0 evaluates and stores
                continue
            _, lease, (stored, missing) = claimed
            try:
                _run_one(cell, suite, context, display, world, lease, stored, missing, summary)
            finally:
                lease.release()
            world.barrier()
    if summary.elsewhere and world.is_main:
        console.print(
            f"{len(summary.elsewhere)} cells are running in other processes (see mae-bench "
            f"status {root}); the one that ends last writes the complete leaderboard",
            highlight=False,
        )


def _claim_next(
    store: CellStore, leases: Leases, queue: list[Cell], world: Dist, summary: RunSummary
) -> tuple[Cell, Lease, tuple[dict[str, Any] | None, list[Evaluation]]] | None:
    """The next unfinished cell of ``queue`` this process could claim, with its lease and
    plan; cells finished or held by a live worker are passed over."""
    while queue:
        cell = queue.pop(0)
        if _plan(store, [cell])[cell.cell_id] is None:
            continue
        lease = leases.claim(cell.cell_id, world.world_size)
        if lease is None:
            summary.elsewhere.append(cell.cell_id)
            continue
        entry = _plan(store, [cell])[cell.cell_id]  # finished just before we claimed it?
        if entry is None:
            lease.release()
            continue
        return cell, lease, entry
    return None


class LeaseLost(Exception):
    """This worker's lease on a cell expired and another worker took the cell over."""


@dataclass
class _Context:
    """What every cell of a suite shares in one process: data, feeder, loggers."""

    root: Path
    data: ImageData
    feeder: ImageFeeder
    mean_image: torch.Tensor
    loggers: LoggerSet
    store: CellStore
    started: bool = False

    @classmethod
    def load(
        cls, suite: Suite, root: Path, device: torch.device, world: Dist, console: Console
    ) -> _Context:
        prepare(device)
        ds = suite.config.dataset
        console.print(f"loading dataset {ds.name} ...", highlight=False)
        data = suite.build_dataset().load()  # a missing dataset fails here, before any write
        feeder = ImageFeeder.fit(
            data.pretrain, image_size=ds.image_size, channels=ds.channels, device=device
        )
        loggers = LoggerSet(suite.build_loggers() if world.is_main else [])
        return cls(root, data, feeder, feeder.mean_image(data.pretrain), loggers, CellStore(root))

    def start(self, suite: Suite, root: Path, world: Dist, console: Console) -> None:
        """Before the first cell: record the suite, start the loggers, say where it runs."""
        self.started = True
        if world.is_main:
            _write_suite_record(root, suite, suite.cells())
            self.loggers.call("start_run", suite.name, root, suite.resolved)
            procs = f" x {world.world_size} processes" if world.active else ""
            device = device_name(self.feeder.device)
            console.print(f"running on {device}{procs}", highlight=False)

    def checkpoint(
        self, cell: Cell, suite: Suite, world: Dist, evaluation: Evaluation | None = None
    ) -> Checkpoint:
        """The checkpoint of the cell's pretraining, or of one of its evaluations (rank 0
        writes it)."""
        name, key = cell.cell_id, cell.config_hash
        if evaluation is not None:
            name, key = f"{name}.{evaluation.eval_id}", evaluation.config_hash
        return Checkpoint(
            self.root / CHECKPOINT_DIR / f"{name}.pt",
            key,
            suite.config.pretrain.checkpoint_every,
            writer=world.is_main,
        )


def _pretrain_on_rank(
    cell: Cell, suite: Suite, ctx: _Context, display: _Display, world: Dist
) -> None:
    """A non-zero rank's part of a cell: its share of the data-parallel pretraining."""
    try:
        pretrain_cell(
            cell,
            suite,
            ctx.data,
            ctx.feeder,
            display,
            checkpoint=ctx.checkpoint(cell, suite, world),
            world=world,
        )
    except Exception as exc:  # rank 0 records the cell's failure
        print(f"rank {world.rank}: {cell.cell_id}: {failure_line(exc)}", file=sys.stderr)


def _run_one(
    cell: Cell,
    suite: Suite,
    ctx: _Context,
    display: _Display,
    world: Dist,
    lease: Lease,
    stored: dict[str, Any] | None,
    missing: list[Evaluation],
    summary: RunSummary,
) -> None:
    """Run one claimed cell on rank 0: pretrain (resuming a checkpoint) or load it, evaluate,
    store; a failure is the cell's, recorded in ``failed/``."""
    start = time.perf_counter()
    store, root = ctx.store, ctx.root
    ctx.loggers.call("start_cell", cell.cell_id, cell.config)

    def on_epoch(epoch: int, row: dict[str, float]) -> None:
        display.epoch(epoch, row)
        if not world.active and not lease.held():  # (all ranks would have to stop at once)
            raise LeaseLost(cell.cell_id)
        lease.update(epoch=epoch)
        ctx.loggers.call("log_epoch", cell.cell_id, epoch, row)

    def on_resume(epoch: int) -> None:
        summary.resumed[cell.cell_id] = epoch
        display.console.print(f"resumed {cell.cell_id} from epoch {epoch}", highlight=False)

    try:
        if stored is None:
            checkpoint = ctx.checkpoint(cell, suite, world)
            lease.update(stage="pretraining", epochs=suite.config.pretrain.epochs)
            pre = pretrain_cell(
                cell,
                suite,
                ctx.data,
                ctx.feeder,
                display,
                on_epoch,
                checkpoint=checkpoint,
                world=world,
                on_resume=on_resume,
            )
            _store_pretrained(store, cell, pre)
            checkpoint.remove()
        else:
            display.start_cell(cell, 0)
            pre = load_pretrained(cell, stored, store, ctx.feeder)
        display.evaluating()
        lease.update(stage="evaluating")
        for out in evaluate_cell(
            cell,
            suite,
            ctx.data,
            ctx.feeder,
            pre.model,
            ctx.mean_image,
            missing,
            checkpoints=lambda evaluation: ctx.checkpoint(cell, suite, world, evaluation),
        ):
            _store_evaluation(store, cell, out)
            ctx.checkpoint(cell, suite, world, out.evaluation).remove()
            ctx.loggers.call(
                "log_evaluation", cell.cell_id, out.record["evaluator"], out.record["metrics"]
            )
    except LeaseLost:
        summary.elsewhere.append(cell.cell_id)
        display.end_cell(
            f"[yellow]stopped[/yellow] {cell.cell_id}: its lease expired (no heartbeat for "
            "too long) and another worker took the cell over"
        )
        return
    except Exception as exc:  # one cell's failure is that cell's, not the suite's
        failure = _record_failure(root, cell, exc)
        summary.failed[cell.cell_id] = failure
        display.end_cell(f"[red]FAILED[/red] {cell.cell_id}: {failure.reason}")
        del exc  # drop the traceback's frames (and the cell's tensors) now
        if ctx.feeder.device.type == "cuda":  # give a failed cell's memory back
            torch.cuda.empty_cache()
        return
    (root / FAILED_DIR / f"{cell.cell_id}.log").unlink(missing_ok=True)
    for leftover in (root / CHECKPOINT_DIR).glob(f"{cell.cell_id}*.pt"):  # killed after storing
        leftover.unlink(missing_ok=True)
    summary.finished.append(cell.cell_id)
    whole = store.finished([_ids(cell)], repair=False).get(cell.cell_id, {})
    ctx.loggers.call("end_cell", cell.cell_id, whole.get("metrics", {}))
    shown = "  ".join(_headline(whole)[:4]) if whole else ""
    reuse = " (pretraining reused)" if pre.reused else ""
    display.end_cell(
        f"done {cell.variant.name} seed {cell.seed}{reuse}: {shown}  "
        f"({time.perf_counter() - start:.0f} s)"
    )


def _collect(root: Path, cells: list[Cell], summary: RunSummary) -> None:
    """After a launcher returns: which of ``cells`` finished, failed or still run elsewhere."""
    store, leases = CellStore(root), Leases(root)
    done = store.finished([_ids(c) for c in cells], repair=False)
    for cell in cells:
        log = root / FAILED_DIR / f"{cell.cell_id}.log"
        if cell.cell_id in done:
            summary.finished.append(cell.cell_id)
        elif log.is_file():
            reason = log.read_text(encoding="utf-8", errors="replace").split("\n", 1)[0]
            summary.failed[cell.cell_id] = CellFailure(reason, log)
        elif leases.read(cell.cell_id):
            summary.elsewhere.append(cell.cell_id)
        else:
            summary.failed[cell.cell_id] = CellFailure(
                "its job ended without a result or a failure log (see the launcher's logs)", None
            )


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


def cell_status(root: Path) -> list[dict[str, Any]]:
    """Per cell of a results folder: ``state`` (done, running, failed, pending) and a
    ``detail`` line: where and since when it runs and its stage and epoch, the path of its
    traceback, or the checkpoint it would resume from."""
    record = read_suite_record(root)
    store, leases = CellStore(root), Leases(root)
    rows = []
    for cell_id, eval_ids in suite_cells(record):
        row: dict[str, Any] = {"cell_id": cell_id}
        lease = leases.read(cell_id)
        log = root / FAILED_DIR / f"{cell_id}.log"
        checkpoints = list((root / CHECKPOINT_DIR).glob(f"{cell_id}*.pt"))
        if store.finished([(cell_id, eval_ids)], repair=False):
            row.update(state="done", detail="")
        elif lease is not None:
            since = dt.datetime.fromtimestamp(lease.since).astimezone()
            progress = f" epoch {lease.epoch}/{lease.epochs}" if lease.epochs else ""
            procs = f" x{lease.world_size} processes" if lease.world_size > 1 else ""
            row.update(
                state="running",
                detail=f"on {lease.where()}{procs} since {since:%Y-%m-%d %H:%M:%S}: "
                f"{lease.stage}{progress}",
                host=lease.host,
                pid=lease.pid,
                since=lease.since,
                stage=lease.stage,
                epoch=lease.epoch,
            )
        elif log.is_file():
            reason = log.read_text(encoding="utf-8", errors="replace").split("\n", 1)[0]
            row.update(state="failed", detail=f"{reason} (traceback: {log})", log=str(log))
        else:
            resumable = "(will resume from its checkpoint)" if checkpoints else ""
            row.update(state="pending", detail=resumable)
        rows.append(row)
    return rows
