"""A worker: claims the cells of a results folder one by one (leases) and runs each, showing
its progress and telling the loggers. The same loop runs every cell: in the runner's own
process (the inline launcher, also under torchrun) and in every launcher's jobs
(``mae-bench run-cell``).
"""

from __future__ import annotations

import contextlib
import sys
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from mae_bench import resume
from mae_bench.cell import (
    CellFailure,
    evaluate_cell,
    failure_line,
    load_pretrained,
    pretrain_cell,
    record_failure,
    store_evaluation,
    store_pretrained,
)
from mae_bench.contract import ImageData, Logger
from mae_bench.data import ImageFeeder
from mae_bench.device import device_name, prepare, resolve_device
from mae_bench.distributed import Dist, cell_device, env_world
from mae_bench.distributed import start as start_world
from mae_bench.errors import MaeBenchWarning, UserError
from mae_bench.leaderboard import format_metric, plural, rebuild_leaderboard
from mae_bench.leases import Lease, Leases
from mae_bench.plan import Cell, CellPlan, Evaluation, recorded_seeds, remaining, suite_cells
from mae_bench.plugins import load_registry
from mae_bench.results import (
    CHECKPOINT_DIR,
    FAILED_DIR,
    CellStore,
    evaluations,
    read_suite_record,
)
from mae_bench.resume import Checkpoint
from mae_bench.suite import Suite, resolve_suite


@dataclass
class RunSummary:
    """What a suite run did."""

    root: Path
    finished: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, CellFailure] = field(default_factory=dict)
    elsewhere: list[str] = field(default_factory=list)  # held by another live worker
    markdown: str = ""  # the leaderboard as printed


@dataclass
class InProcess:
    """What a launch in the runner's own process shares with it (the inline launcher): the
    resolved suite, the console, the run's summary, and the data already loaded (so that a
    missing dataset fails before anything is written). Never leaves the process."""

    suite: Suite
    console: Console
    summary: RunSummary
    context: WorkerContext | None = None
    device: torch.device | None = None  # this process's device, resolved once by the runner


def run_cells(
    root: Path,
    cell_ids: list[str],
    device_option: str = "auto",
    console: Console | None = None,
    stop_signal: tuple[int, Any] | None = None,
    summary: RunSummary | None = None,
    *,
    local: InProcess | None = None,
) -> bool:
    """A worker: run the given cells (all pending ones if none are given) of the suite whose
    results folder is ``root``, claiming each; rebuild the leaderboard at the end (unless
    ``local``: then the runner that started it does).

    The suite comes from ``root/suite.json``; in the runner's own process, ``local`` gives
    it, with the console and the summary to fill (``console`` and ``summary`` are then
    not used).
    Returns False if a stop signal ended it (the cell in training saved a checkpoint).
    """
    record = None
    if local is not None:
        suite, console, summary = local.suite, local.console, local.summary
    else:
        record = read_suite_record(root)
        suite = resolve_suite(record["resolved"], load_registry(), source=record["source"])
    console = console or Console(stderr=True)
    seeds = None
    if suite.adaptive:  # the seeds the runner has added so far: those its record lists
        seeds = recorded_seeds(record or read_suite_record(root))
    cells = suite_cells(suite, seeds=seeds)
    known = {c.cell_id: c for c in cells}
    unknown = [i for i in cell_ids if i not in known]
    if unknown:
        raise UserError(f"{root}: no cell {', '.join(unknown)} in suite {suite.name!r}")
    chosen = [known[i] for i in cell_ids] if cell_ids else cells
    world = env_world()
    if local is not None and local.device is not None:
        device = local.device
    else:
        device = cell_device(resolve_device(device_option), world)
    summary = summary if summary is not None else RunSummary(root=root)
    stop, outside = stop_signal if stop_signal else (None, None)
    signals = (
        resume.handle_signals(stop=(stop,), save=(), outside=outside)
        if stop is not None
        else resume.handle_signals(stop=(), save=())  # the command line installed the others
    )  # a real Ctrl-C stops the suite; a KeyboardInterrupt a plugin raises fails its cell
    context = local.context if local is not None else None
    try:
        with signals:
            start_world(world, device)
            work(suite, root, device, chosen, world, console, summary, context)
    except resume.Terminated as exc:
        if stop is None:
            raise
        console.print(f"stopped by signal {exc.signum}: {exc.detail or 'no cell in training'}")
        return False
    if world.is_main and local is None:
        suite_leaderboard(root, suite, cells)
    return True


def suite_leaderboard(root: Path, suite: Suite, cells: list[Cell]) -> str:
    """Rebuild the leaderboard of ``cells`` from the results folder; its Markdown."""
    cfg = suite.config
    _, markdown, _ = rebuild_leaderboard(
        root,
        [c.result_ids for c in cells],
        suite.name,
        cfg.primary_metric,
        suite.reference,
        suite.adaptive.rule if suite.adaptive else None,
    )
    return markdown


def work(
    suite: Suite,
    root: Path,
    device: torch.device,
    cells: list[Cell],
    world: Dist,
    console: Console,
    summary: RunSummary,
    context: WorkerContext | None = None,
) -> None:
    """Claim and run ``cells`` one by one in this process (rank 0 claims; in a data-parallel
    world every rank pretrains each cell, and rank 0 evaluates and stores it)."""
    store, leases = CellStore(root), Leases(root)
    by_id = {c.cell_id: c for c in cells}
    queue = list(cells)
    console = console if world.is_main else Console(quiet=True)  # rank 0 reports
    display = CellDisplay(console, len(cells))
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
                context = WorkerContext.load(suite, root, device, world, console)
            if not context.started:
                context.start(suite, root, world, console)
                stack.callback(context.loggers.call, "end_run")
            if not world.is_main:
                if needs_pretraining:
                    _pretrain_on_rank(cell, suite, context, world)
                world.barrier()  # rank 0 evaluates and stores
                continue
            _, lease, (stored, missing) = claimed
            try:
                _run_one(cell, suite, context, display, world, lease, stored, missing, summary)
            finally:
                lease.release()
            world.barrier()
    if summary.elsewhere and world.is_main:
        one = len(summary.elsewhere) == 1
        where = "is running in another process" if one else "are running in other processes"
        console.print(
            f"{plural(len(summary.elsewhere), 'cell')} {where} (see mae-bench status {root}); "
            "the one that ends last writes the complete leaderboard",
            highlight=False,
        )


def _claim_next(
    store: CellStore, leases: Leases, queue: list[Cell], world: Dist, summary: RunSummary
) -> tuple[Cell, Lease, CellPlan] | None:
    """The next unfinished cell of ``queue`` this process could claim, with its lease and
    plan; cells finished or held by a live worker are passed over."""
    while queue:
        cell = queue.pop(0)
        if remaining(store, [cell])[cell.cell_id] is None:
            continue
        lease = leases.claim(cell.cell_id, world.world_size)
        if lease is None:
            summary.elsewhere.append(cell.cell_id)
            continue
        entry = remaining(store, [cell])[cell.cell_id]  # finished just before we claimed it?
        if entry is None:
            lease.release()
            continue
        return cell, lease, entry
    return None


class LeaseLost(Exception):
    """This worker's lease on a cell expired and another worker took the cell over."""


@dataclass
class WorkerContext:
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
    ) -> WorkerContext:
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
        """Before the first cell (``suite.json`` is written by then): start the loggers, say
        where it runs."""
        self.started = True
        if world.is_main:
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


def _pretrain_on_rank(cell: Cell, suite: Suite, ctx: WorkerContext, world: Dist) -> None:
    """A non-zero rank's part of a cell: its share of the data-parallel pretraining (a
    failure on any rank fails it on every rank, at once: :meth:`Dist.stage`)."""
    try:
        with world.stage(ctx.feeder.device, describe=failure_line):
            pretrain_cell(
                cell,
                suite,
                ctx.data,
                ctx.feeder,
                checkpoint=ctx.checkpoint(cell, suite, world),
                world=world,
            )
    except resume.STOPS:
        raise
    except BaseException as exc:  # rank 0 records the cell's failure
        print(f"rank {world.rank}: {cell.cell_id}: {failure_line(exc)}", file=sys.stderr)
        del exc  # drop the traceback's frames (and the cell's tensors) now
        if ctx.feeder.device.type == "cuda":
            torch.cuda.empty_cache()


def _run_one(
    cell: Cell,
    suite: Suite,
    ctx: WorkerContext,
    display: CellDisplay,
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

    checkpoint = ctx.checkpoint(cell, suite, world)

    def on_resume(epochs_done: int) -> None:
        # the words the stop message used when it saved ("checkpoint saved in epoch 3")
        where = (
            f"saved {checkpoint.saved_at}"
            if checkpoint.saved_at
            else f"({plural(epochs_done, 'epoch')} complete)"  # saved before it was recorded
        )
        display.console.print(
            f"resumed {cell.cell_id} from its checkpoint {where}", highlight=False
        )

    try:
        if stored is None:
            lease.update(stage="pretraining", epochs=suite.config.pretrain.epochs)
            display.start_cell(cell, 0 if cell.variant.baseline else suite.config.pretrain.epochs)
            with world.stage(ctx.feeder.device, describe=failure_line):  # all ranks together
                pre = pretrain_cell(
                    cell,
                    suite,
                    ctx.data,
                    ctx.feeder,
                    on_epoch,
                    checkpoint=checkpoint,
                    world=world,
                    on_resume=on_resume,
                )
            store_pretrained(store, cell, pre)
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
            store_evaluation(store, cell, out)
            ctx.checkpoint(cell, suite, world, out.evaluation).remove()
            ctx.loggers.call(
                "log_evaluation", cell.cell_id, out.record["evaluator"], out.record["metrics"]
            )
    except resume.STOPS:  # a real signal: the suite stops (a checkpoint is kept)
        raise
    except LeaseLost:
        summary.elsewhere.append(cell.cell_id)
        display.end_cell(
            f"[yellow]stopped[/yellow] {cell.cell_id}: its lease expired (no heartbeat for "
            "too long) and another worker took the cell over"
        )
        return
    except BaseException as exc:  # whatever a plugin raises (even SystemExit) fails its cell
        failure = record_failure(root, cell, exc)
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
    whole = store.finished([cell.result_ids], repair=False).get(cell.cell_id, {})
    ctx.loggers.call("end_cell", cell.cell_id, whole.get("metrics", {}))
    shown = "  ".join(headline(whole)[:4]) if whole else ""
    reuse = " (pretraining reused)" if pre.reused else ""
    display.end_cell(
        f"done {cell.variant.name} seed {cell.seed}{reuse}: {shown}  "
        f"({time.perf_counter() - start:.0f} s)"
    )


def headline(record: dict[str, Any]) -> list[str]:
    """``name value`` of each evaluator's headline metrics, formatted as it declares."""
    return [
        f"{name} {format_metric(info['fmt'], evaluation['metrics'][name])}"
        for _, evaluation in evaluations(record)
        for name, info in evaluation["info"].items()
        if info["headline"]
    ]


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


class LoggerSet:
    """The suite's loggers, each guarded: one that fails (whatever it raises, even
    ``SystemExit``) is reported once and switched off, and the run goes on."""

    def __init__(self, loggers: list[Logger]) -> None:
        self.active = list(loggers)

    def call(self, method: str, *args: Any) -> None:
        """Call ``method`` on every active logger."""
        for logger in list(self.active):
            try:
                getattr(logger, method)(*args)
            except resume.STOPS:
                raise
            except BaseException as exc:
                self.active.remove(logger)
                warnings.warn(
                    f"logger {logger.name!r} failed in {method} ({type(exc).__name__}: {exc}): "
                    "switched off for the rest of the run",
                    MaeBenchWarning,
                    stacklevel=2,
                )
