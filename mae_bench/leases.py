"""Claims on cells, so that any number of processes can share one results folder.

A worker runs a cell only while it holds the cell's lease, ``leases/<cell id>.json``: created
atomically (written aside, then hard-linked into place, which fails if one is there), kept
alive by a heartbeat thread that touches it, and released when the cell is stored or failed.
A lease expires when its holder is gone: at once if the holder was a process of this host
that no longer exists (e.g. killed with ``kill -9``) or the same SLURM job (requeued after a
preemption); otherwise when its heartbeat is older than the time to live. A lease file that
cannot be read (damaged, unreadable, a folder) is stale: it is taken over at once, with a
warning (a live worker's lease is always readable: it is written whole, then linked into
place). Taking over an expired lease renames it away first, so that of two workers taking
it over, one wins.
The lease also says where the cell runs, since when, and its stage and epoch (for ``status``).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import threading
import time
import uuid
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from mae_bench.errors import MaeBenchWarning
from mae_bench.files import atomic_write

LEASES_DIR = "leases"
HEARTBEAT_S = float(os.environ.get("MAE_BENCH_HEARTBEAT_S", "30"))
TTL_S = float(os.environ.get("MAE_BENCH_LEASE_TTL_S", "300"))  # no heartbeat for this: expired


def host_name() -> str:
    """This machine's name, as leases and temporary files record it."""
    return socket.gethostname().replace(".", "_") or "host"


def process_alive(pid: int) -> bool:
    """Whether a process of this host with this pid exists."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def slurm_job() -> str:
    """This process's SLURM job (array job and task), or '' outside SLURM."""
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    return f"{array}_{task}" if array and task else os.environ.get("SLURM_JOB_ID", "")


@dataclass
class LeaseInfo:
    """Who holds a cell, where and since when, and how far it got."""

    cell_id: str
    token: str
    host: str
    pid: int
    job: str
    since: float
    stage: str = "starting"
    epoch: int = 0
    epochs: int = 0
    world_size: int = 1
    heartbeat: float = 0.0  # the lease file's modification time, when read

    def where(self) -> str:
        """``host pid N`` (and the SLURM job)."""
        job = f" job {self.job}" if self.job else ""
        return f"{self.host} pid {self.pid}{job}"


class Lease:
    """A held lease: a heartbeat thread keeps it alive until :meth:`release`."""

    def __init__(self, path: Path, info: LeaseInfo) -> None:
        self.path = path
        self.info = info
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="mae-bench-lease", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            if self.held():
                with contextlib.suppress(OSError):
                    os.utime(self.path)

    def held(self) -> bool:
        """Whether the lease file is still ours (not expired and taken over)."""
        found = _read(self.path)
        return found is not None and found.token == self.info.token

    def update(self, **progress: Any) -> None:
        """Record the cell's stage or epoch in the lease (if it is still ours)."""
        for key, value in progress.items():
            setattr(self.info, key, value)
        if self.held():
            with contextlib.suppress(OSError):
                _write(self.path, self.info, replace=True)

    def release(self) -> None:
        """Stop the heartbeat and remove the lease file (if it is still ours)."""
        self._stop.set()
        if self.held():
            with contextlib.suppress(OSError):
                self.path.unlink()


class Leases:
    """The leases of one results folder."""

    def __init__(self, root: Path) -> None:
        self.dir = root / LEASES_DIR

    def path(self, cell_id: str) -> Path:
        """The lease file of a cell."""
        return self.dir / f"{cell_id}.json"

    def read(self, cell_id: str) -> LeaseInfo | None:
        """The cell's lease if one is held and alive; None otherwise."""
        info = _read(self.path(cell_id))
        return info if info is not None and live(info) else None

    def claim(self, cell_id: str, world_size: int = 1) -> Lease | None:
        """Take the cell's lease; None if a live worker holds it."""
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.path(cell_id)
        info = LeaseInfo(
            cell_id=cell_id,
            token=uuid.uuid4().hex,
            host=host_name(),
            pid=os.getpid(),
            job=slurm_job(),
            since=time.time(),
            world_size=world_size,
        )
        for _ in range(3):
            if _write(path, info, replace=False):
                return Lease(path, info)
            try:
                held = _load(path)
            except FileNotFoundError:
                held = None  # released meanwhile: try again
            except UnreadableLease as exc:
                warnings.warn(
                    f"lease {path} cannot be read ({exc}): taken over as stale",
                    MaeBenchWarning,
                    stacklevel=2,
                )
                held = None
            else:
                if live(held) and not _same_job(held):
                    return None
            if not _take_over(path, held):
                return None
        return None


def live(info: LeaseInfo) -> bool:
    """Whether the lease's holder may still be working."""
    if info.host == host_name() and not process_alive(info.pid):
        return False
    return time.time() - info.heartbeat < TTL_S


def _same_job(info: LeaseInfo) -> bool:
    """The lease was taken by this SLURM job before it was requeued (it is gone)."""
    job = slurm_job()
    return bool(job) and info.job == job and info.pid != os.getpid()


def _take_over(path: Path, expired: LeaseInfo | None) -> bool:
    """Remove an expired (or unreadable: ``expired`` None) lease so a new one can be
    written; False if another worker took it over meanwhile (what we moved aside was its
    fresh lease: it is put back)."""
    aside = path.with_name(f".{path.name}.{host_name()}.{os.getpid()}.{uuid.uuid4().hex}.old")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return True  # gone already: try to write ours
    moved = _read(aside)
    if moved is not None and (expired is None or moved.token != expired.token):
        with contextlib.suppress(FileExistsError):
            os.link(aside, path)
        aside.unlink(missing_ok=True)
        return False
    if aside.is_dir() and not aside.is_symlink():
        shutil.rmtree(aside, ignore_errors=True)
    else:
        aside.unlink(missing_ok=True)
    return True


class UnreadableLease(Exception):
    """A lease file that exists but does not read as a lease (the reason)."""


def _load(path: Path) -> LeaseInfo:
    """The lease at ``path``; FileNotFoundError if there is none, UnreadableLease why it
    does not read."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        mtime = path.stat().st_mtime
        info = LeaseInfo(**{k: v for k, v in data.items() if k != "heartbeat"})
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise UnreadableLease(exc.strerror or str(exc)) from None
    except (ValueError, TypeError, AttributeError) as exc:
        raise UnreadableLease(f"not a lease: {exc}") from None
    info.heartbeat = mtime
    return info


def _read(path: Path) -> LeaseInfo | None:
    """The lease at ``path``, or None if there is none or it does not read."""
    try:
        return _load(path)
    except (FileNotFoundError, UnreadableLease):
        return None


def _write(path: Path, info: LeaseInfo, *, replace: bool) -> bool:
    """Write the lease; without ``replace``, only if there is none (False then)."""
    text = json.dumps({k: v for k, v in asdict(info).items() if k != "heartbeat"})
    return atomic_write(path, text, exclusive=not replace)
