"""Exact resume: training checkpoints written atomically, and the signals that ask for one.

A checkpoint holds everything a training loop needs to go on as if it had never stopped:
model, optimizer, gradient scaler, every random generator's state, epoch, step and the
running sums of the epoch. It is read back with ``torch.load(weights_only=True)``.

Signals: SIGTERM (what SLURM, ``kill`` and a preempting scheduler send) stops a training loop
at its next step boundary after saving a checkpoint; SIGUSR1 saves one and goes on. Outside a
training loop SIGTERM stops the process where it is (:class:`Terminated`). A scheduler's own
signal (submitit's SIGUSR2) is added with :func:`handle_signals`. Ctrl-C (SIGINT) stops at
once (:class:`Interrupted`). These two are the only exceptions that stop a suite
(:data:`STOPS`): anything else, even a ``SystemExit`` or ``KeyboardInterrupt`` a plugin
raises, fails the cell it was raised in.

A step that hangs (a plugin stuck in a loop, a collective waiting for a dead peer) never
reaches its boundary. So a stop signal in a training loop starts a grace period of
``MAE_BENCH_STOP_GRACE_S`` seconds (default 25, under SLURM's default 30 s between SIGTERM
and SIGKILL): if the loop has not stopped by then, :class:`Terminated` is raised where it
is, without a new checkpoint (the last one on disk is kept and resumed from). If that is
swallowed, or the loop is stuck where Python cannot raise, the process exits (code 128 +
the signal) after a second grace period, saying so.

Every loop ends its epochs through :func:`epoch_boundary` (the checkpoint policy, then the
signals); pretraining also acts on signals between steps (:func:`step_boundary`), where
fine-tuning waits for the end of the epoch.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mae_bench.errors import MaeBenchWarning, env_seconds
from mae_bench.files import atomic_write

AUTO_SHARE = 0.05  # "auto": saving takes at most this share of the training time
SAVED_AT_KEY = "saved_at"  # a checkpoint's record of when it was saved ("in epoch 3")
GRACE_ENV = "MAE_BENCH_STOP_GRACE_S"
DEFAULT_GRACE_S = 25.0


class Terminated(KeyboardInterrupt):
    """A stop signal, raised where it can be handled cleanly (after a checkpoint, if in a
    training loop): the process stops as on Ctrl-C and a re-run resumes."""

    def __init__(self, signum: int = signal.SIGTERM, detail: str = "") -> None:
        super().__init__(detail)
        self.signum = signum
        self.detail = detail


class Interrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT), raised by mae-bench's own handler: unlike a ``KeyboardInterrupt`` a
    plugin raises, which fails its cell, it stops the suite."""


STOPS = (Terminated, Interrupted)  # the exceptions that stop a suite; every other fails a cell

# training: nesting depth of training loops; stop: the pending stop signal; save: a checkpoint
# asked for; grace_s: the grace period; watch: the generation of the grace-period watchdog
# (a newer one, or none, makes an older one stand down); overdue: the watchdog's own signal
_state: dict[str, Any] = {
    "training": 0, "stop": None, "save": False, "grace_s": DEFAULT_GRACE_S, "watch": 0,
    "overdue": False,
}  # fmt: skip
Outside = Callable[[int, Any], None]


def stop_grace_s() -> float:
    """The grace period after a stop signal, from ``MAE_BENCH_STOP_GRACE_S`` (seconds);
    UserError naming the variable if it is not a positive number."""
    return env_seconds(GRACE_ENV, DEFAULT_GRACE_S)


def _raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated(signum)


def _raise_interrupted(signum: int, frame: Any) -> None:
    raise Interrupted()


def _on_stop(outside: Outside) -> Callable[[int, Any], None]:
    def handler(signum: int, frame: Any) -> None:
        overdue, _state["overdue"] = _state["overdue"], False
        if overdue:  # the watchdog's: the grace period is over
            if _state["training"] and _state["stop"] is not None:  # the step still runs
                _state["stop"] = None
                raise Terminated(
                    signum,
                    f"the step in training did not finish within {_state['grace_s']:g} s of "
                    f"the signal ({GRACE_ENV}): stopped there without a new checkpoint, the "
                    "cell resumes from its last checkpoint",
                )
        elif not _state["training"]:
            outside(signum, frame)
        elif _state["stop"] is None:
            _state["stop"] = signum  # the loop saves a checkpoint at its next step and stops
            _start_watchdog(signum)

    return handler


def _start_watchdog(signum: int) -> None:
    """After the grace period, raise :class:`Terminated` in the main thread if the loop has
    not taken the stop; after a second one, if it has not left the loop, exit at once."""
    _state["watch"] += 1
    watch, grace, main = _state["watch"], _state["grace_s"], threading.main_thread().ident

    def pending() -> bool:
        return _state["watch"] == watch and _state["training"] > 0

    def watchdog() -> None:
        time.sleep(grace)
        if not pending() or _state["stop"] is None:
            return
        _state["overdue"] = True
        signal.pthread_kill(main, signum)  # a real signal: it also ends a sleep or a wait
        time.sleep(grace)
        if pending():
            cursor = "\x1b[?25h" if sys.stderr.isatty() else ""  # shown again (a live display)
            sys.stderr.write(
                f"{cursor}\nterminated ({signal.Signals(signum).name}): the step in training "
                f"did not stop within {2 * grace:g} s of the signal ({GRACE_ENV}): exiting at "
                "once; the cell resumes from its last checkpoint\n"
            )
            sys.stderr.flush()
            os._exit(128 + signum)

    threading.Thread(target=watchdog, name="mae-bench-stop-grace", daemon=True).start()


def _on_save(signum: int, frame: Any) -> None:
    _state["save"] = True


@contextlib.contextmanager
def handle_signals(
    stop: tuple[int, ...] = (signal.SIGTERM,),
    save: tuple[int, ...] = (signal.SIGUSR1,),
    outside: Outside = _raise_terminated,
    interrupt: bool = True,
) -> Iterator[None]:
    """Install the checkpoint-aware handlers for the ``stop`` and ``save`` signals (main
    thread only); ``outside`` is what a stop signal does outside a training loop. With
    ``interrupt``, Ctrl-C raises :class:`Interrupted` (on the main thread, unless SIGINT is
    ignored, as in a background job). UserError if ``MAE_BENCH_STOP_GRACE_S`` is invalid."""
    grace = stop_grace_s() if stop else _state["grace_s"]
    previous = {}
    mask: set[signal.Signals] | None = None
    try:
        _state["grace_s"] = grace
        for sig in stop:
            previous[sig] = signal.signal(sig, _on_stop(outside))
        for sig in save:
            previous[sig] = signal.signal(sig, _on_save)
        if (
            interrupt
            and threading.current_thread() is threading.main_thread()
            and signal.getsignal(signal.SIGINT) is not signal.SIG_IGN
        ):
            previous[signal.SIGINT] = signal.signal(signal.SIGINT, _raise_interrupted)
        # a signal mask is inherited: a parent that blocked these (some CI runners and job
        # supervisors do) would leave them pending until exit, and a SIGTERM would never stop
        # the run; unblocked here, one already pending is handled now
        mask = signal.pthread_sigmask(signal.SIG_UNBLOCK, set(previous))
        yield
    finally:
        if mask is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def training() -> Iterator[None]:
    """Mark a training loop: stop signals now wait for its next step boundary (for the grace
    period at most)."""
    _state["training"] += 1
    stopped = False
    try:
        yield
    except STOPS:
        stopped = True
        raise
    finally:
        _state["training"] -= 1
        if not _state["training"]:
            _state["watch"] += 1  # the loop is left: a grace-period watchdog stands down
            _state["overdue"] = False
            signum, _state["stop"] = _state["stop"], None
            if signum is not None and not stopped:
                raise Terminated(signum)  # a stop that arrived after the last step boundary


def requested() -> tuple[int | None, bool]:
    """The pending stop signal (None: none) and whether a checkpoint was asked for; the
    save request is consumed."""
    save, _state["save"] = _state["save"], False
    return _state["stop"], save


def rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    """The global random generators' states (CPU, and CUDA on CUDA)."""
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def numpy_state(generator: np.random.RandomState) -> dict[str, Any]:
    """A numpy RandomState's state as tensors and numbers (loadable with weights_only)."""
    kind, keys, pos, has_gauss, gauss = generator.get_state()
    return {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos, "has_gauss": has_gauss,
            "gauss": gauss, "kind": kind}  # fmt: skip


def set_numpy_state(generator: np.random.RandomState, state: dict[str, Any]) -> None:
    """Restore what :func:`numpy_state` returned."""
    keys = state["keys"].numpy().astype(np.uint32)
    generator.set_state((state["kind"], keys, state["pos"], state["has_gauss"], state["gauss"]))


class Checkpoint:
    """The checkpoint file of one training run (e.g. a cell's pretraining), keyed by what
    determines the run, so a stale file is never resumed from.

    ``every``: save after every ``every`` epochs; 0 only on signals; ``"auto"`` after each
    epoch while saving stays under 5% of the time since the last save.
    """

    def __init__(self, path: Path, key: str, every: int | str = "auto", writer: bool = True):
        self.path = path
        self.key = key
        self.every = every
        self.writer = writer  # rank 0 writes; every rank reads
        # when the state :meth:`load` returned was saved, as the save said it ("in epoch 3",
        # "after epoch 2"): the resume message repeats it (None: not known)
        self.saved_at: str | None = None
        self._last_save_s = 0.0
        self._last_save_at = time.perf_counter()

    def load(self) -> dict[str, Any] | None:
        """The saved state, or None if there is none (or it is damaged or another run's:
        warned about and ignored, the run starts over)."""
        if not self.path.is_file():
            return None
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
            if not isinstance(state, dict) or state.get("key") != self.key:
                raise ValueError("written for other settings")
        except Exception as exc:
            warnings.warn(
                f"checkpoint {self.path} not used ({exc}): the run starts over",
                MaeBenchWarning,
                stacklevel=2,
            )
            return None
        saved_at = state.get(SAVED_AT_KEY)
        self.saved_at = saved_at if isinstance(saved_at, str) else None
        return state

    def due(self, epoch: int, epoch_end: bool) -> bool:
        """Whether to save after ``epoch`` (1-based) by the ``every`` policy."""
        if not epoch_end or self.every == 0:
            return False
        if self.every == "auto":
            elapsed = time.perf_counter() - self._last_save_at
            return elapsed * AUTO_SHARE >= self._last_save_s
        return epoch % int(self.every) == 0

    def save(self, state: dict[str, Any], saved_at: str | None = None) -> None:
        """Write ``state`` (tensors and plain data) atomically: temporary file, fsync, rename.
        ``saved_at``: when in the run, as the stop message says it (``"in epoch 3"``)."""
        start = time.perf_counter()
        if self.writer:
            full = {**state, "key": self.key, SAVED_AT_KEY: saved_at}
            atomic_write(self.path, lambda handle: torch.save(full, handle))
        self._last_save_at = time.perf_counter()
        self._last_save_s = self._last_save_at - start

    def epoch_end(self, epoch: int, state: Callable[[], dict[str, Any]], last: bool) -> None:
        """Call after each epoch of a loop run under :func:`training`: saves ``state()`` when
        the policy says so or a signal asked for it, and after a stop signal raises
        :class:`Terminated` (once saved). See :func:`epoch_boundary`."""
        epoch_boundary(self, epoch, state, last=last)

    def remove(self) -> None:
        """Delete the checkpoint (the run finished and its results are stored)."""
        if self.writer:
            self.path.unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                self.path.parent.rmdir()  # only if no other cell's checkpoint is there


# ------------------------------------------------ where a training loop acts on the signals
def epoch_boundary(
    checkpoint: Checkpoint | None,
    epoch: int,
    state: Callable[[], dict[str, Any]],
    *,
    last: bool,
    asked: tuple[int | None, bool] | None = None,
    then: Callable[[], None] | None = None,
) -> None:
    """The end of ``epoch`` (1-based) of a loop run under :func:`training`: the one epoch-end
    path of pretraining, fine-tuning and plugins' loops (:meth:`Checkpoint.epoch_end`).

    Saves ``state()`` to ``checkpoint`` when a signal asked for it or, unless this is the
    ``last`` epoch, when its policy says so (:meth:`Checkpoint.due`); then calls ``then()``
    (the epoch's report); after a stop signal raises :class:`Terminated`. ``asked``: the
    ``(stop, save)`` request the loop took at its last step (a data-parallel loop agrees on
    it across ranks first); by default :func:`requested` is asked here.
    """
    stop, save = requested() if asked is None else asked
    if checkpoint is not None and stop is None and not save and not last:
        save = checkpoint.due(epoch, epoch_end=True)
    step_boundary(checkpoint, state, stop, save, where=f"after epoch {epoch}", then=then)


def step_boundary(
    checkpoint: Checkpoint | None,
    state: Callable[[], dict[str, Any]],
    stop: int | None,
    save: bool,
    *,
    where: str,
    then: Callable[[], None] | None = None,
) -> None:
    """Act on a request at a step boundary: save ``state()`` to ``checkpoint`` (if any) when
    ``save`` or a ``stop`` signal asks, call ``then()``, and after ``stop`` raise
    :class:`Terminated` (``where``: when it was saved, for the message)."""
    if stop is not None:
        _state["stop"] = None  # taken: the loop stops here (the grace period ends)
        _state["watch"] += 1
    if checkpoint is not None and (stop is not None or save):
        checkpoint.save(state(), saved_at=where)
    if then is not None:
        then()
    if stop is not None:
        raise Terminated(stop, f"checkpoint saved {where}")
