"""The suite runner: plans a suite's cells, runs them in this process or through a launcher,
then writes the leaderboard; and reports each cell's state (``status``).
"""

from __future__ import annotations

import datetime as dt
import os
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from mae_bench.cell import CellFailure, plan_cells
from mae_bench.contract import (
    Launcher,
    LaunchRequest,
)
from mae_bench.distributed import cell_device, env_world
from mae_bench.distributed import start as start_world
from mae_bench.errors import MaeBenchWarning, UserError
from mae_bench.leases import Leases
from mae_bench.results import (
    FAILED_DIR,
    SUITE_FILE,
    CellStore,
    OlderResults,
    read_suite_record,
    suite_cells,
)
from mae_bench.resume import CHECKPOINT_DIR
from mae_bench.suite import Cell, Suite
from mae_bench.worker import RunSummary, WorkerContext, suite_leaderboard, work, write_suite_record


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
        plan = plan_cells(store, cells)
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
            context = WorkerContext.load(suite, root, device, world, console)
    if world.is_main and pending:
        fresh = [c for c in pending if plan[c.cell_id][0] is None]
        store.check_writable(sum(_result_bytes(c, suite) for c in fresh) + (1 << 20))
    if launcher is None:
        work(suite, root, device, cells, world, console, summary, context)
    elif pending:
        write_suite_record(root, suite, cells)
        ids = tuple(c.cell_id for c in pending)
        console.print(
            f"launching {len(ids)} cells of suite {suite.name!r} with {launcher.summary()}",
            highlight=False,
        )
        launcher.launch(LaunchRequest(root.resolve(), ids, device_option), console)
        _collect(root, pending, summary)
    if world.is_main:
        write_suite_record(root, suite, cells)
        summary.leaderboard, summary.markdown = suite_leaderboard(root, suite, cells)
    return summary


def _collect(root: Path, cells: list[Cell], summary: RunSummary) -> None:
    """After a launcher returns: which of ``cells`` finished, failed or still run elsewhere."""
    states = {row["cell_id"]: row for row in cell_status(root)}
    for cell in cells:
        row = states[cell.cell_id]
        if row["state"] == "done":
            summary.finished.append(cell.cell_id)
        elif row["state"] == "failed":
            summary.failed[cell.cell_id] = CellFailure(row["reason"], Path(row["log"]))
        elif row["state"] == "running":
            summary.elsewhere.append(cell.cell_id)
        else:
            summary.failed[cell.cell_id] = CellFailure(
                "its job ended without a result or a failure log (see the launcher's logs)", None
            )


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
            row.update(
                state="failed", detail=f"{reason} (traceback: {log})", reason=reason, log=str(log)
            )
        else:
            resumable = "(will resume from its checkpoint)" if checkpoints else ""
            row.update(state="pending", detail=resumable)
        rows.append(row)
    return rows
