"""The suite runner: plans a suite's cells, hands the unfinished ones to a launcher, then
writes the leaderboard. Launching lives here: the :class:`Launcher` interface (the
``register_launchers`` hook's components) and the :class:`LaunchRequest` it receives.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from dataclasses import replace as replace_dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from pydantic import ValidationError
from rich.console import Console

from mae_bench.cell import CellFailure
from mae_bench.contract import Component
from mae_bench.device import resolve_device
from mae_bench.distributed import Dist, cell_device, env_world
from mae_bench.distributed import start as start_world
from mae_bench.errors import ConfigError, MaeBenchWarning, UserError
from mae_bench.leaderboard import plural
from mae_bench.plan import Cell, grow_seeds, remaining, suite_cells, suite_record
from mae_bench.plugins import Registry, load_registry
from mae_bench.results import (
    SUITE_FILE,
    CellStore,
    OlderResults,
    cell_status,
    read_suite_record,
    recorded_cells,
    write_suite_record,
)
from mae_bench.suite import Suite, config_error, lookup_component
from mae_bench.worker import (
    InProcess,
    RunSummary,
    WorkerContext,
    run_cells,
    suite_leaderboard,
)


@dataclass(frozen=True)
class LaunchRequest:
    """The cells a launcher must run, and how a worker runs them.

    A worker is ``mae-bench run-cell ROOT [CELL_ID ...]``: it reads the suite from
    ``ROOT/suite.json``, claims each cell's lease (so two workers never run the same cell;
    without ids it runs any pending cell until none is left), resumes from a checkpoint and
    stores the result. :meth:`command` gives that command line; :meth:`run` (picklable, as a
    bound method) runs it in the calling process. Workers on other machines need the results
    folder on a shared filesystem.
    """

    root: Path  # the suite's results folder
    cell_ids: tuple[str, ...]  # unfinished cells, in suite order
    device: str  # the --device every worker uses (auto: each picks its own)
    # an in-process launch's shared state (the inline launcher); dropped when pickled
    local: InProcess | None = field(default=None, compare=False, repr=False)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "local": None}

    def run(self, cell_ids: Sequence[str] = (), stop_signal: tuple[int, Any] | None = None) -> bool:
        """Run ``cell_ids`` (or any pending cell) in this process, as the worker command does.

        ``stop_signal``: ``(signum, handler)`` of a scheduler's own preemption signal: in a
        training loop it saves a checkpoint and stops (this returns False: call ``handler``
        then, e.g. to requeue); elsewhere ``handler`` is called at once. True when done.
        """
        return run_cells(
            self.root, list(cell_ids), self.device, stop_signal=stop_signal, local=self.local
        )

    def finished(self) -> int:
        """How many of the request's cells are stored, pretrained and evaluated (for progress)."""
        wanted = set(self.cell_ids)
        ids = [c for c in recorded_cells(read_suite_record(self.root)) if c[0] in wanted]
        return len(CellStore(self.root).finished(ids, repair=False))

    def command(self, cell_ids: Sequence[str] = ()) -> list[str]:
        """The worker command line (running ``cell_ids``, or any pending cell)."""
        return [
            sys.executable,
            "-m",
            "mae_bench",
            "run-cell",
            str(self.root),
            *cell_ids,
            "--device",
            self.device,
        ]


class Launcher(Component):
    """Runs a suite's cells as jobs: in this process, in worker processes, on a cluster.

    :meth:`launch` returns when every cell it started has ended (finished or failed); the
    runner then reads their states from the results folder and rebuilds the leaderboard.
    ``Params`` are the launcher options (``--launcher-opt key=value``), validated like suite
    fields. A launcher that runs the cells in the calling process (``in_process``) gets the
    runner's loaded data and summary through ``request.run``, and every data-parallel rank
    started by torchrun takes part in it.
    """

    kind: ClassVar[str] = "launcher"
    in_process: ClassVar[bool] = False

    def launch(self, request: LaunchRequest, console: Any) -> None:
        """Run the cells of ``request``; ``console`` is a ``rich.console.Console`` for progress."""
        raise NotImplementedError


def resolve_launcher(registry: Registry, name: str, options: dict[str, Any]) -> Launcher:
    """The launcher ``name`` with its options validated; ConfigError naming the option."""
    info = lookup_component(registry, "launcher", name, "--launcher", "command line")
    try:
        params = info.cls.Params.model_validate(options)
    except ValidationError as exc:
        error = config_error(exc, "", "command line")
        raise ConfigError(f"--launcher-opt {error.field}", error.message, "command line") from None
    return info.cls(params)


def run_suite(
    suite: Suite,
    out_dir: Path,
    device: str | torch.device = "auto",
    console: Console | None = None,
    *,
    replace: bool = False,
    launcher: Launcher | None = None,
) -> RunSummary:
    """Run every unfinished cell of ``suite`` and write the leaderboard; resumable.

    Before any training: a results folder holding another suite's finished cells is refused
    (``replace`` moves it aside instead), damaged cells are set aside to be recomputed,
    stale temporary folders are removed, and the output is probed for writing and free space.
    The cells run as jobs of ``launcher`` (default: ``inline``, in this process, as one rank
    of a ``torchrun`` world if started so), whose workers use ``--device device``.
    ``device`` is the ``--device`` option, or this process's device as :func:`local_device`
    resolved it (used as it is: a rank's ``cuda:LOCAL_RANK`` is never resolved again).
    Cells another process holds are left to it; whichever process ends last writes the
    complete leaderboard.
    """
    console = console or Console(stderr=True)
    launcher = launcher or resolve_launcher(load_registry(), "inline", {})
    world = env_world()
    resolved = device if isinstance(device, torch.device) else None
    device_option = str(device) if resolved is None else _device_option(resolved, world)
    root = out_dir / suite.name
    cells = suite_cells(suite)
    summary = RunSummary(root=root)
    pending: list[Cell] = []
    if world.is_main:
        _claim_folder(root, suite, cells, replace)
        store = CellStore(root)
        store.clean_stale_tmp()
        plan = remaining(store, cells)
        pending = [c for c in cells if plan[c.cell_id] is not None]
        summary.skipped = [c.cell_id for c in cells if plan[c.cell_id] is None]
        if summary.skipped:
            console.print(f"{len(summary.skipped)} of {len(cells)} cells already finished: skipped")
        reused = [c for c in pending if plan[c.cell_id][0] is not None]
        if reused:
            todo = sorted({e.name for c in reused for e in plan[c.cell_id][1]})
            does = (
                "reuses its stored pretraining and only runs"
                if len(reused) == 1
                else ("reuse their stored pretraining and only run")
            )
            console.print(
                f"{plural(len(reused), 'cell')} {does}: {', '.join(todo)}", highlight=False
            )
    local = None
    # the probe's folders are removed again if the dataset then fails: nothing is left
    with _removed_on_failure(CellStore(root).cells_dir, root, out_dir):
        if world.is_main and pending:  # before anything is loaded
            _check_room(store, suite, plan, pending)
        if launcher.in_process:
            torch_device = resolved if resolved is not None else local_device(device_option)
            start_world(world, torch_device)
            local = InProcess(suite, console, summary, device=torch_device)
            if world.is_main and pending:  # a missing dataset fails here, before any write
                local.context = WorkerContext.load(suite, root, torch_device, world, console)
    if world.is_main and pending:
        write_suite_record(root, suite_record(suite, cells))
    ids = tuple(c.cell_id for c in pending)
    if launcher.in_process:  # every rank of a data-parallel launch runs the same request
        ids = world.broadcast(ids)
    request = LaunchRequest(root.resolve(), (), device_option, local)
    _launch(launcher, request, ids, suite, console)
    if world.is_main and ids:
        _collect(root, pending, summary)
    while suite.adaptive is not None:  # seeds until the answer is clear: a look per round
        grown = _next_look(root, suite, cells, summary, console) if world.is_main else None
        if launcher.in_process:
            grown = world.broadcast(grown)
        if grown is None:
            break
        planned = {c.cell_id for c in cells}
        cells = suite_cells(suite, grown)
        ids = ()
        if world.is_main:  # the look's new cells (a cell that failed this run is not retried)
            added = [c for c in cells if c.cell_id not in planned]
            plan = remaining(store, added)
            pending = [c for c in added if plan[c.cell_id] is not None]
            if pending:
                _check_room(store, suite, plan, pending)
            write_suite_record(root, suite_record(suite, cells))
            ids = tuple(c.cell_id for c in pending)
        if launcher.in_process:
            ids = world.broadcast(ids)
        _launch(launcher, request, ids, suite, console)
        if world.is_main and ids:
            _collect(root, pending, summary)
    if world.is_main:
        write_suite_record(root, suite_record(suite, cells))
        summary.markdown = suite_leaderboard(root, suite, cells)
    return summary


def _check_room(store: CellStore, suite: Suite, plan: dict[str, Any], pending: list[Cell]) -> None:
    """Refuse (naming the folder) unless the results of ``pending`` fit: the weights of those
    to pretrain, plus 1 MiB."""
    fresh = [c for c in pending if plan[c.cell_id][0] is None]
    store.check_writable(sum(_result_bytes(c, suite) for c in fresh) + (1 << 20))


def _launch(
    launcher: Launcher, request: LaunchRequest, ids: tuple[str, ...], suite: Suite, console: Console
) -> None:
    """Hand ``ids`` (if any) to ``launcher`` as ``request``'s cells."""
    if not ids:
        return
    if not launcher.in_process:
        console.print(
            f"launching {plural(len(ids), 'cell')} of suite {suite.name!r} with "
            f"{launcher.summary()}",
            highlight=False,
        )
    launcher.launch(replace_dataclass(request, cell_ids=ids), console)


def _next_look(
    root: Path, suite: Suite, cells: list[Cell], summary: RunSummary, console: Console
) -> dict[str, list[int]] | None:
    """Adaptive seeds after every cell of ``cells`` has ended: each variant's seeds for the
    next round, or None when no variant gets another (or a cell still runs elsewhere, whose
    result the look needs: a later run goes on from there)."""
    if summary.elsewhere:
        console.print(
            "adaptive seeds: some cells still run in another process; run again once they "
            "end to add the seeds their verdicts need",
            highlight=False,
        )
        return None
    records = list(CellStore(root).finished([c.result_ids for c in cells], repair=False).values())
    look = grow_seeds(suite, cells, records)
    had = Counter(c.variant.name for c in cells)
    more = [name for name, seeds in look.seeds.items() if len(seeds) > had[name]]
    if not more:
        return None
    console.print(
        "adaptive seeds: another seed for "
        + ", ".join(
            f"{name} ({len(look.seeds[name])} seeds: "
            f"{'the reference' if name == look.reference else 'still inconclusive'})"
            for name in more
        ),
        highlight=False,
    )
    return look.seeds


@contextlib.contextmanager
def _removed_on_failure(*folders: Path) -> Iterator[None]:
    """Remove those of ``folders`` (given deepest first) that the block created, if it fails
    and they are still empty."""
    created = [folder for folder in folders if not folder.exists()]
    try:
        yield
    except BaseException:
        for folder in created:
            with contextlib.suppress(OSError):
                folder.rmdir()  # only if empty
        raise


def local_device(device_option: str) -> torch.device:
    """This process's device for ``device_option`` (``cuda:LOCAL_RANK`` under torchrun)."""
    return cell_device(resolve_device(device_option), env_world())


def _device_option(device: torch.device, world: Dist) -> str:
    """The ``--device`` option that gives every rank of ``world`` the device that
    :func:`local_device` resolved to ``device`` on this one: ``cuda`` under torchrun (each
    rank takes ``cuda:LOCAL_RANK``), the device itself in one process."""
    return "cuda" if world.active and device.type == "cuda" else str(device)


def _collect(root: Path, cells: list[Cell], summary: RunSummary) -> None:
    """After a launcher returns: which of ``cells`` finished, failed or still run elsewhere
    (an in-process launch has told the summary of the cells it ran)."""
    states = {row["cell_id"]: row for row in cell_status(root)}
    told = {*summary.finished, *summary.failed, *summary.elsewhere}
    for cell in cells:
        if cell.cell_id in told:
            continue
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
    """Refuse to write into a results folder of another suite: one of another name, or from
    another file with none of this suite's cells finished (the leaderboard would silently
    lose them). The same file, edited in place or run with other ``--set`` or ``--sweep``, is
    the same suite: its finished cells stay, and come back whenever their settings do.
    ``replace`` moves another suite's folder aside."""
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
    if old["name"] == suite.name and (
        not finished or ours & set(finished) or _same_file(old.get("source"), suite.source)
    ):
        return
    if replace:
        _move_aside(root, aside)
        return
    raise UserError(
        f"--out: {root} holds the results of another suite ({old['name']!r} from "
        f"{old.get('source', '?')}: {plural(len(finished), 'finished cell')}, none of them "
        "part of this suite); writing here would orphan them. Use another "
        f"--out, or --replace to move them aside to {aside.name}"
    )


def _same_file(recorded: str | None, source: str) -> bool:
    """Whether a results folder's suite came from the file ``source``: the same suite,
    edited in place or run with other ``--set``/``--sweep`` (its other cells stay reusable)."""
    if not recorded:
        return False
    try:
        return Path(recorded).resolve() == Path(source).resolve()
    except OSError:
        return recorded == source


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
