"""Launchers: run a suite's cells in this process, in local worker processes, or on SLURM.

Every launcher starts workers (``mae-bench run-cell``, or ``LaunchRequest.run`` in a job) that
claim cells through the results folder's leases, so workers can be added, killed and
restarted freely: a cell is never computed twice, and a killed one resumes from its checkpoint.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, BinaryIO, Literal

import torch
from pydantic import Field, NonNegativeInt, PositiveInt
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from mae_bench import Launcher, LaunchRequest, Params, UserError, hookimpl
from mae_bench.device import resolve_device
from mae_bench.files import WriteError, open_inside

POLL_S = 2.0


class _CellProgress:
    """A progress bar of the request's cells that are stored, read from the results folder."""

    def __init__(self, request: LaunchRequest, console: Console, what: str) -> None:
        self.request = request
        self.progress = Progress(
            TextColumn(f"[bold]{what}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
            transient=True,
        )
        self.task = self.progress.add_task("cells", total=len(request.cell_ids))

    def __enter__(self) -> _CellProgress:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.__exit__(*exc)

    def refresh(self) -> None:
        self.progress.update(self.task, completed=self.request.finished())


class InlineLauncher(Launcher):
    """Runs every cell in this process, one after another (the default; under torchrun,
    every process takes part in each cell)."""

    name = "inline"
    in_process = True

    def launch(self, request: LaunchRequest, console: Any) -> None:
        request.run(request.cell_ids)


class LocalParams(Params):
    workers: PositiveInt = Field(2, description="worker processes")  # may share GPUs
    procs_per_cell: PositiveInt = Field(
        1,
        description="data-parallel processes per cell (torchrun; on CUDA one GPU each, never "
        "shared within a cell)",
    )
    threads: PositiveInt | None = Field(
        None, description="CPU threads per process (default: the cores split between them)"
    )


class LocalLauncher(Launcher):
    """N worker processes on this machine, each claiming cells until none is left. With
    GPUs each worker gets a ``CUDA_VISIBLE_DEVICES`` slice of ``procs_per_cell`` GPUs and is
    told ``cuda``; more workers than slices share them round-robin (``--workers 8`` on 2
    GPUs: 4 per GPU), for cells too small to fill a GPU. Workers on one GPU share its memory
    as separate processes (each its own CUDA context and caching allocator, first come first
    served; the memory check sizes one cell against the whole GPU): a cell that runs out
    fails alone with the hint. On the CPU the cores are split between workers. Logs:
    ``<results>/logs/worker-<i>.log``."""

    name = "local"
    Params = LocalParams

    def launch(self, request: LaunchRequest, console: Any) -> None:
        p: LocalParams = self.params
        slices = device_slices(request.device, p.workers, p.procs_per_cell)
        if slices is not None and request.device.startswith("cuda:"):
            # the worker sees only its slice: the pinned GPU is its cuda (cuda:0)
            request = dataclasses.replace(request, device="cuda")
        if slices is not None and len(set(slices)) < len(slices):
            console.print(sharing_note(slices), highlight=False)
        threads = p.threads or max(1, (os.cpu_count() or 1) // (p.workers * p.procs_per_cell))
        logs = request.root / "logs"
        try:
            logs.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise WriteError.of(logs, exc) from exc
        workers: list[tuple[subprocess.Popen, Path]] = []
        try:
            for i in range(p.workers):
                env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
                if slices is not None:
                    env["CUDA_VISIBLE_DEVICES"] = slices[i]
                command = request.command()
                if p.procs_per_cell > 1:
                    command = [
                        sys.executable,
                        "-m",
                        "torch.distributed.run",
                        "--standalone",
                        f"--nproc-per-node={p.procs_per_cell}",
                        *command[1:],  # -m mae_bench run-cell ...
                    ]
                log = logs / f"worker-{i}.log"
                with _open_log(request.root, log) as out:
                    proc = subprocess.Popen(
                        command,
                        env=env,
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )
                workers.append((proc, log))
            what = f"{p.workers} workers"
            with _CellProgress(request, console, what) as progress:
                while any(proc.poll() is None for proc, _ in workers):
                    progress.refresh()
                    time.sleep(POLL_S)
                progress.refresh()
        except BaseException:
            for proc, _ in workers:  # stop the workers as this process stops: they checkpoint
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
            for proc, _ in workers:
                proc.wait()
            raise
        for proc, log in workers:
            if proc.returncode not in (0, 1):  # 1: a cell failed, reported by the runner
                console.print(
                    f"[yellow]warning:[/yellow] a worker exited with {proc.returncode} (log: {log})"
                )


def _open_log(root: Path, log: Path) -> BinaryIO:
    """A worker's log under the results folder ``root``, opened for appending, never through
    a symlink that leads outside ``root`` (one there is replaced, with a warning)."""
    return os.fdopen(open_inside(root, log, os.O_WRONLY | os.O_CREAT | os.O_APPEND), "ab")


def device_slices(device: str, workers: int, procs_per_cell: int) -> list[str] | None:
    """``CUDA_VISIBLE_DEVICES`` for each worker; None on CPU. The visible GPUs are cut into
    slices of ``procs_per_cell`` and given round-robin: worker i gets slice i mod the number
    of slices, so workers beyond the slices share them. ``cuda:N`` gives every worker the
    visible GPU N (each worker then sees it as ``cuda``, its only GPU).

    UserError where a cell's processes would share a GPU (NCCL refuses two ranks of one
    group on one device): ``procs_per_cell`` above the visible GPUs, or above 1 with
    ``cuda:N``."""
    if device == "cpu" or device == "mps" or not torch.cuda.is_available():
        if device.startswith("cuda"):
            raise UserError("--device: CUDA was requested but is not available on this machine")
        return None
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = (
        [d for d in visible.split(",") if d]
        if visible
        else [str(i) for i in range(torch.cuda.device_count())]
    )
    pinned = resolve_device(device).index
    if pinned is not None:
        if procs_per_cell > 1:
            raise UserError(
                f"--device {device} names one GPU; procs_per_cell {procs_per_cell} runs each "
                f"cell on {procs_per_cell} GPUs, one process each: use --device cuda"
            )
        if pinned >= len(ids):
            raise UserError(f"--device {device}: {len(ids)} GPUs are visible")
        return [ids[pinned]] * workers
    if procs_per_cell > len(ids):
        raise UserError(
            f"--launcher-opt procs_per_cell={procs_per_cell}: each cell runs one process per "
            f"GPU and {len(ids)} GPUs are visible"
        )
    slices = [
        ",".join(ids[i * procs_per_cell : (i + 1) * procs_per_cell])
        for i in range(len(ids) // procs_per_cell)
    ]
    return [slices[i % len(slices)] for i in range(workers)]


def sharing_note(slices: list[str]) -> str:
    """A line saying how many workers share each GPU slice (for the launch's console)."""
    counts = Counter(slices)
    shares = ", ".join(
        f"{n} on GPU{'s' if ',' in gpus else ''} {gpus}" for gpus, n in counts.items()
    )
    return (
        f"{len(slices)} workers share the GPUs ({shares}): workers on one GPU share its "
        "memory, and the memory check sized one cell against the whole GPU"
    )


class SubmititParams(Params):
    cluster: Literal["slurm", "local", "debug"] | None = Field(
        None, description="submitit executor: slurm, local or debug (default: slurm if found)"
    )
    folder: str | None = Field(None, description="submitit's logs (default <results>/submitit)")
    partition: str | None = Field(None, description="SLURM partition")
    timeout_min: PositiveInt = Field(24 * 60, description="time limit per task, minutes")
    gpus_per_task: NonNegativeInt | None = Field(
        None,
        description="GPUs per task (default: 1, or 0 with --device cpu or mps; 0 with "
        "--device auto runs on CPU nodes, with --device cuda is refused)",
    )
    tasks_per_node: PositiveInt = Field(1, description="data-parallel processes per cell")
    cpus_per_task: PositiveInt | None = Field(None, description="CPU cores per task")
    mem_gb: PositiveInt | None = Field(None, description="memory per node, GiB")
    array_parallelism: PositiveInt = Field(64, description="array tasks running at once")
    max_requeues: NonNegativeInt = Field(3, description="requeues after time-outs")
    sbatch: dict[str, Any] = Field(
        default_factory=dict, description="extra sbatch options, e.g. {account: abc, qos: high}"
    )
    setup: list[str] = Field(
        default_factory=list, description="shell lines run before each task (module load ...)"
    )


class CellTask:
    """One array task: run one cell; on preemption or time-out (submitit's signal) the cell
    saves a checkpoint and submitit requeues the task, which resumes from it."""

    def __call__(self, request: LaunchRequest, cell_id: str) -> bool:
        import submitit
        from submitit.core.job_environment import JobEnvironment

        env = submitit.JobEnvironment()
        if env.num_tasks > 1:  # data-parallel cell: RANK, WORLD_SIZE, MASTER_ADDR, ...
            submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        signum = JobEnvironment._usr_sig()
        requeue = signal.getsignal(signum)
        if not callable(requeue):  # the debug executor: no scheduler, nothing to requeue
            return request.run([cell_id])
        if not request.run([cell_id], stop_signal=(signum, requeue)):
            requeue(signum, None)  # checkpoint saved: submitit requeues the task and exits
        return True

    def checkpoint(self, request: LaunchRequest, cell_id: str) -> Any:
        """What submitit requeues: the same task (it resumes from the cell's checkpoint)."""
        import submitit

        return submitit.helpers.DelayedSubmission(self, request, cell_id)


class SubmititLauncher(Launcher):
    """One SLURM job-array task per cell through submitit (``cluster=local`` or ``debug``
    runs the same path on this machine). Preempted and timed-out tasks are requeued and
    resume from the cell's last checkpoint."""

    name = "submitit"
    Params = SubmititParams

    def __init__(self, params: SubmititParams) -> None:
        super().__init__(params)
        try:
            import submitit  # noqa: F401
        except ImportError:
            raise ValueError(
                "the submitit launcher needs submitit: pip install 'mae-bench[slurm]'"
            ) from None

    def gpus_per_task(self, device: str) -> int:
        """The GPUs each task requests for workers using ``--device device``: the
        ``gpus_per_task`` option, by default 1 (none for ``cpu`` and ``mps``). UserError for
        ``cuda`` devices on tasks given none."""
        p: SubmititParams = self.params
        if p.gpus_per_task is None:
            return 0 if device in ("cpu", "mps") else 1
        if p.gpus_per_task == 0 and device.startswith("cuda"):
            raise UserError(
                f"--device {device}: the submitit launcher's gpus_per_task=0 gives its tasks "
                "no GPU; leave gpus_per_task out (1 per task) or use --device cpu"
            )
        return p.gpus_per_task

    def executor(self, folder: Path, device: str = "auto") -> Any:
        """The configured submitit executor, its tasks' GPUs chosen for ``--device device``
        (:meth:`gpus_per_task`)."""
        import submitit

        p: SubmititParams = self.params
        gpus = self.gpus_per_task(device)
        executor = submitit.AutoExecutor(
            folder=folder, cluster=p.cluster, slurm_max_num_timeout=p.max_requeues
        )
        options: dict[str, Any] = {
            "timeout_min": p.timeout_min,
            "tasks_per_node": p.tasks_per_node,
            "gpus_per_node": gpus * p.tasks_per_node,
            "slurm_array_parallelism": p.array_parallelism,
            "slurm_additional_parameters": dict(p.sbatch),
            "slurm_setup": list(p.setup),
            "name": "mae-bench",
        }
        if p.partition:
            options["slurm_partition"] = p.partition
        if p.cpus_per_task:
            options["cpus_per_task"] = p.cpus_per_task
        if p.mem_gb:
            options["mem_gb"] = p.mem_gb
        if executor.cluster == "local":
            options = {k: v for k, v in options.items() if not k.startswith("slurm_")}
            options.pop("name")
        executor.update_parameters(**options)
        return executor

    def launch(self, request: LaunchRequest, console: Any) -> None:
        p: SubmititParams = self.params
        folder = Path(p.folder) if p.folder else request.root / "submitit"
        executor = self.executor(folder / "%j", request.device)
        if executor.cluster == "debug":  # in this process, one after another
            for cell_id in request.cell_ids:
                executor.submit(CellTask(), request, cell_id).result()
            return
        jobs = executor.map_array(CellTask(), [request] * len(request.cell_ids), request.cell_ids)
        console.print(
            f"submitted {len(jobs)} tasks to {executor.cluster} "
            f"(job {jobs[0].job_id.split('_')[0]}; logs in {folder})",
            highlight=False,
        )
        with _CellProgress(request, console, f"{executor.cluster} tasks") as progress:
            while not all(job.done() for job in jobs):
                progress.refresh()
                time.sleep(POLL_S)
            progress.refresh()
        for job in jobs:
            error = job.exception()
            if error is not None:
                console.print(
                    f"[yellow]warning:[/yellow] task {job.job_id} ended with "
                    f"{type(error).__name__}: {str(error).strip().splitlines()[-1][:200]} "
                    f"(log: {job.paths.stderr})"
                )


@hookimpl
def register_launchers(register):
    register(InlineLauncher)
    register(LocalLauncher)
    register(SubmititLauncher)
