"""The results store: the folder layout, one folder per finished cell and evaluation written
atomically, ``suite.json`` (read and write), and each cell's status.

Layout under ``<out>/<suite>/`` (the names are this module's constants)::

    suite.json                      resolved suite, its cells and their evaluations
    cells/<variant>-seed<k>-<hash>/ pretrain.json, history.csv, encoder/decoder.safetensors
        evals/<evaluator>-<hash>/   result.json and the evaluator's tables (<name>.csv)
    cells/.damaged/                 records that did not load, kept for inspection
    failed/<cell id>.log            why a cell failed (removed once it succeeds)
    leases/<cell id>.json           which worker runs a cell (mae_bench.leases)
    checkpoints/<cell id>[.<eval id>].pt   training checkpoints (mae_bench.resume)
    logs/, submitit/, tensorboard/  workers' and loggers' own files (their plugins)
    runs.csv, leaderboard.csv, leaderboard.md, comparisons.csv   (mae_bench.leaderboard)
    thresholds/<variant>-seed<k>.csv   every cell's threshold table
    plots/<name>.png, report.html   figures and the results page (mae_bench.plots, .report)

Pretraining and evaluation are cached apart: a cell's key covers what determines its
weights (dataset, variant, pretraining settings, seed, result format, the versions of the
plugins providing its components); an evaluation's key is the cell's key plus the
evaluator's name, params and plugin version. Changing an evaluator re-runs only that
evaluation, from the stored weights.

Every folder is assembled under a temporary name (holding this host and process id), its
files flushed to disk, and renamed into place, so it exists complete or not at all (also
after a power loss), and a finished one is never
replaced. A re-run skips every record that loads and validates; one that does not (a
folder without its record, JSON that is not strict, e.g. a bare ``NaN``, or a cell whose
weights are missing or truncated) is moved to ``cells/.damaged/``, said in one warning,
and recomputed in the same run. Nothing is moved through a ``cells/.damaged`` that is a
symbolic link leaving the results folder. Temporary folders left by a killed run
are removed by the next. Files and folders get the permissions the umask allows (not
0600/0700), so a teammate or a job under another account can read them.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import json
import math
import os
import shutil
import struct
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from mae_bench.errors import MaeBenchWarning, UserError
from mae_bench.files import atomic_write, grant_umask
from mae_bench.leases import Leases, host_name, process_alive

PRETRAIN_FILE = "pretrain.json"  # a cell's pretraining record
RESULT_FILE = "result.json"  # an evaluation's record
HISTORY_FILE = "history.csv"  # a cell's pretraining loss terms per epoch
EVALS_DIR = "evals"
FAILED_DIR = "failed"  # <cell id>.log: why a cell failed
CHECKPOINT_DIR = "checkpoints"  # <cell id>[.<eval id>].pt: training checkpoints (resume.py)
RUNS_FILE = "runs.csv"  # one row per cell
LEADERBOARD_CSV = "leaderboard.csv"  # one row per variant over seeds
LEADERBOARD_MD = "leaderboard.md"
COMPARISONS_FILE = "comparisons.csv"  # paired comparisons with the reference, every metric
THRESHOLDS_DIR = "thresholds"  # <variant>-seed<k>.csv: every cell's threshold table
PLOTS_DIR = "plots"  # <name>.png
REPORT_FILE = "report.html"  # the self-contained results page
SUITE_FILE = "suite.json"
WEIGHT_FILES = ("encoder.safetensors", "decoder.safetensors")  # a cell's weights
DAMAGED_DIR = ".damaged"
LEADERBOARD_LOCK = ".leaderboard.lock"  # held while the leaderboard is rebuilt
PRETRAIN_KEYS = {
    "cell_id": str,
    "variant": str,
    "seed": int,
    "config_hash": str,
    "config": dict,
    "components": dict,
    "metrics": dict,
    "provenance": dict,
}
EVAL_KEYS = {
    "evaluator": str,
    "eval_id": str,
    "config_hash": str,
    "config": dict,
    "metrics": dict,
    "info": dict,
    "metric_order": list,
    "tables": list,
    "trains_encoder": bool,
    "summary_priority": int,
    "provenance": dict,
}
STALE_FOREIGN_TMP_S = 24 * 3600  # another host's temporary folder older than this is stale


def strict_json(data: Any) -> Any:
    """``data`` with every NaN or infinite float replaced by None (JSON has no NaN)."""
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {k: strict_json(v) for k, v in data.items()}
    if isinstance(data, list | tuple):
        return [strict_json(v) for v in data]
    return data


def write_json(path: Path, data: Any) -> None:
    """Atomically write pretty, strict JSON (NaN and infinities as null)."""
    text = json.dumps(strict_json(data), indent=2, sort_keys=True, allow_nan=False)
    atomic_write(path, text + "\n")


def _refuse_constant(constant: str) -> Any:
    raise ValueError(f"not strict JSON (a bare {constant})")


def read_json(path: Path) -> Any:
    """Parse a JSON file strictly (a bare ``NaN`` or ``Infinity`` is refused, as
    :func:`write_json` never writes one); ``ValueError`` naming the problem otherwise."""
    try:
        return json.loads(path.read_text(encoding="utf-8"), parse_constant=_refuse_constant)
    except UnicodeDecodeError as exc:
        raise ValueError(f"not UTF-8 text ({exc.reason})") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"not valid JSON ({exc})") from None


def check_safetensors(path: Path) -> None:
    """Cheaply check that a safetensors file is whole (its header parses and the file is as
    long as the header says, as loading it requires), without reading its tensors;
    ``ValueError`` naming the problem otherwise."""
    with path.open("rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        head = handle.read(8)
        if len(head) < 8:
            raise ValueError(f"{size} bytes: truncated (no safetensors header)")
        (header_size,) = struct.unpack("<Q", head)
        if header_size > size - 8:
            raise ValueError(f"{size} bytes: truncated within its header")
        try:
            header = json.loads(handle.read(header_size), parse_constant=_refuse_constant)
            ends = [t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"]
            expected = 8 + header_size + max(ends, default=0)
        except (ValueError, TypeError, KeyError, IndexError, AttributeError) as exc:
            raise ValueError(f"not a safetensors file (its header does not parse: {exc})") from None
    if size != expected:
        raise ValueError(f"{size} bytes where its header describes {expected}: truncated")


def evaluations(record: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """A cell's evaluations as ``(evaluator, evaluation)`` in suite order, each evaluation's
    ``info`` in the order its evaluator declared the metrics (JSON keys are stored sorted)."""
    stored = record.get("evaluations", {})
    out = []
    for name in record.get("evaluation_order", sorted(stored)):
        evaluation = dict(stored[name])
        order = evaluation.get("metric_order", list(evaluation["info"]))
        evaluation["info"] = {m: evaluation["info"][m] for m in order}
        out.append((name, evaluation))
    return out


def combine(pretrain: dict[str, Any], evaluated: list[dict[str, Any]]) -> dict[str, Any]:
    """A cell's whole record: its pretraining record with its evaluations' metrics merged
    in, the evaluations by evaluator (in suite order) and their confusion matrices."""
    record = dict(pretrain)
    record["metrics"] = dict(pretrain["metrics"])
    for evaluation in evaluated:
        record["metrics"].update(evaluation["metrics"])
    record["evaluations"] = {e["evaluator"]: e for e in evaluated}
    record["evaluation_order"] = [e["evaluator"] for e in evaluated]
    record["confusion"] = {e["evaluator"]: e["confusion"] for e in evaluated if e.get("confusion")}
    return record


class DamagedCell(Exception):
    """A cell or evaluation folder whose record does not load or validate."""


def validate_record(record: Any, record_id: str, keys: dict[str, type], id_key: str) -> Any:
    """``record`` if it is a complete record of ``record_id``, else ``ValueError`` why."""
    if not isinstance(record, dict):
        raise ValueError("not a JSON object")
    for key, kind in keys.items():
        if not isinstance(record.get(key), kind):
            raise ValueError(f"field {key!r} is missing or not a {kind.__name__}")
    if record[id_key] != record_id:
        raise ValueError(f"it is the record of {record[id_key]!r}")
    numbers = int | float | None
    bad = [k for k, v in record["metrics"].items() if not isinstance(v, numbers)]
    if bad:
        raise ValueError(f"metrics {', '.join(bad)} are not numbers")
    return record


class CellStore:
    """The cells of one suite's results folder: per cell its pretraining (weights, history,
    ``pretrain.json``) and, under ``evals/``, one folder per evaluation (``result.json`` and
    the evaluator's tables), each written atomically and keyed by what determines it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.cells_dir = root / "cells"

    def path(self, cell_id: str) -> Path:
        """Folder of a cell."""
        return self.cells_dir / cell_id

    def eval_path(self, cell_id: str, eval_id: str) -> Path:
        """Folder of one evaluation of a cell."""
        return self.path(cell_id) / EVALS_DIR / eval_id

    @staticmethod
    def _read(path: Path, record_id: str, keys: dict[str, type], id_key: str) -> Any:
        """The record at ``path``; None if its folder does not exist (not stored yet). A
        folder is renamed into place whole, so one without its record is damaged."""
        if not os.path.lexists(path.parent):
            return None
        if not path.is_file():
            problem = "missing" if not os.path.lexists(path) else "not a file"
            raise DamagedCell(f"{path}: {problem}")
        try:
            return validate_record(read_json(path), record_id, keys, id_key)
        except (ValueError, OSError) as exc:
            raise DamagedCell(f"{path}: {exc}") from None

    def read(self, cell_id: str) -> dict[str, Any] | None:
        """The cell's validated pretraining record; None if it has none; ``DamagedCell`` if
        it, or one of its weight files (:func:`check_safetensors`), does not load or
        validate."""
        folder = self.path(cell_id)
        record = self._read(folder / PRETRAIN_FILE, cell_id, PRETRAIN_KEYS, "cell_id")
        if record is not None:
            for weights in (folder / name for name in WEIGHT_FILES):
                try:
                    check_safetensors(weights)
                except FileNotFoundError:
                    raise DamagedCell(f"{weights}: missing") from None
                except (ValueError, OSError) as exc:
                    raise DamagedCell(f"{weights}: {exc}") from None
        return record

    def read_eval(self, cell_id: str, eval_id: str) -> dict[str, Any] | None:
        """An evaluation's validated record, as :meth:`read`."""
        path = self.eval_path(cell_id, eval_id) / RESULT_FILE
        return self._read(path, eval_id, EVAL_KEYS, "eval_id")

    def is_done(self, cell_id: str, eval_id: str | None = None) -> bool:
        """True when the cell's pretraining (or one of its evaluations) is stored and valid."""
        try:
            found = self.read(cell_id) if eval_id is None else self.read_eval(cell_id, eval_id)
        except DamagedCell:
            return False
        return found is not None

    def damage(self, cell_id: str, eval_ids: Iterable[str]) -> str | None:
        """Why the cell's stored pretraining or one of its evaluations is damaged (the
        file and the problem), or None if nothing stored is damaged."""
        try:
            if self.read(cell_id) is not None:
                for eval_id in eval_ids:
                    self.read_eval(cell_id, eval_id)
        except DamagedCell as exc:
            return str(exc)
        return None

    def finished(
        self, cells: Iterable[tuple[str, list[str]]], *, repair: bool
    ) -> dict[str, dict[str, Any]]:
        """Whole records (:func:`combine`) of the cells ``(cell_id, eval_ids)`` whose
        pretraining and evaluations are all stored, in order.

        A damaged record is warned about, naming its file; with ``repair`` (a run) its folder
        is also moved to ``cells/.damaged/`` so that it is recomputed.
        """
        out = {}
        for cell_id, eval_ids in cells:
            pretrain = self._checked(self.read, self.path(cell_id), repair, cell_id)
            if pretrain is None:
                continue
            evaluated = [
                self._checked(self.read_eval, self.eval_path(cell_id, e), repair, cell_id, e)
                for e in eval_ids
            ]
            if all(e is not None for e in evaluated):
                out[cell_id] = combine(pretrain, evaluated)
        return out

    def _checked(self, read: Callable[..., Any], folder: Path, repair: bool, *ids: str) -> Any:
        try:
            return read(*ids)
        except DamagedCell as exc:
            action = "skipped"
            if repair:
                what = _contents(folder)
                target = self.set_aside(folder)
                action = f"{what} moved to {target} and recomputed" if target else "recomputed"
            warnings.warn(f"damaged result {exc}: {action}", MaeBenchWarning, stacklevel=3)
            return None

    def table_path(self, record: dict[str, Any], table: str) -> Path | None:
        """Where the evaluation of ``record`` that wrote ``table`` stored it, if one did."""
        for _, evaluation in evaluations(record):
            if table in evaluation["tables"]:
                return self.eval_path(record["cell_id"], evaluation["eval_id"]) / f"{table}.csv"
        return None

    def set_aside(self, folder: Path) -> Path | None:
        """Move a cell or evaluation folder to ``cells/.damaged/`` (kept for inspection);
        where it went, or None if it was gone already (another worker moved it)."""
        name = folder.relative_to(self.cells_dir).as_posix().replace("/", "__")
        damaged = self._damaged_dir()
        target = damaged / f"{name}.{time.strftime('%Y%m%d-%H%M%S')}"
        while True:
            while os.path.lexists(target):
                target = target.with_name(target.name + "_")
            try:
                os.rename(folder, target)
                return target
            except FileNotFoundError:
                if os.path.lexists(folder):
                    raise
                return None  # another worker moved it
            except OSError as exc:  # another worker took this name meanwhile
                if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                    raise

    def _damaged_dir(self) -> Path:
        """``cells/.damaged``, a real folder: a symbolic link leaving the results folder is
        replaced (said in a warning; its target is left as it is), so that nothing is moved
        through it; anything else in the way is moved into the new folder."""
        damaged = self.cells_dir / DAMAGED_DIR
        if damaged.is_symlink():
            target = damaged.resolve()
            if not target.is_dir() or not target.is_relative_to(self.root.resolve()):
                damaged.unlink(missing_ok=True)
                warnings.warn(
                    f"{damaged} is a symbolic link to {target}, not a folder in the results "
                    "folder: replaced by a folder (nothing is moved out of the results folder)",
                    MaeBenchWarning,
                    stacklevel=4,
                )
        elif os.path.lexists(damaged) and not damaged.is_dir():
            in_the_way = damaged.with_name(f"{DAMAGED_DIR}.{os.getpid()}.in-the-way")
            os.rename(damaged, in_the_way)
            damaged.mkdir()
            os.rename(in_the_way, damaged / in_the_way.name)
        damaged.mkdir(parents=True, exist_ok=True)
        return damaged

    def clean_stale_tmp(self) -> list[Path]:
        """Remove temporary folders whose writer is gone: this host's dead processes,
        another host's after a day, and those of unknown origin; returns what it removed."""
        removed = []
        if not self.cells_dir.is_dir():
            return removed
        host, now = host_name(), time.time()
        candidates = [*self.cells_dir.glob(".*.tmp"), *self.cells_dir.glob(f"*/{EVALS_DIR}/.*.tmp")]
        for tmp in candidates:
            parts = tmp.name[1:-4].rsplit(".", 3)
            owner_host, pid = (parts[1], parts[2]) if len(parts) == 4 else ("", "")
            if owner_host == host and pid.isdigit():
                stale = not process_alive(int(pid))
            elif owner_host and pid.isdigit():
                stale = now - tmp.stat().st_mtime > STALE_FOREIGN_TMP_S
            else:
                stale = True
            if stale:
                shutil.rmtree(tmp, ignore_errors=True)
                removed.append(tmp)
        return removed

    def write(self, cell_id: str, write_files: Callable[[Path], None]) -> Path:
        """Store a cell's pretraining: ``write_files`` fills a temporary folder that must end
        with ``pretrain.json``; see :meth:`_write_folder`."""
        return self._write_folder(
            self.path(cell_id), PRETRAIN_FILE, write_files, lambda: self.is_done(cell_id)
        )

    def write_eval(self, cell_id: str, eval_id: str, write_files: Callable[[Path], None]) -> Path:
        """Store one evaluation of a stored cell (its folder must end with ``result.json``)."""
        return self._write_folder(
            self.eval_path(cell_id, eval_id),
            RESULT_FILE,
            write_files,
            lambda: self.is_done(cell_id, eval_id),
        )

    def _write_folder(
        self,
        final: Path,
        marker: str,
        write_files: Callable[[Path], None],
        done: Callable[[], bool],
    ) -> Path:
        """Fill a temporary folder beside ``final`` (named with this host and process id),
        then rename it into place. A finished folder is never replaced (if another writer
        finished first, ours is dropped); an unfinished or damaged one in the way is moved
        to ``cells/.damaged/``."""
        final.parent.mkdir(parents=True, exist_ok=True)
        prefix = f".{final.name}.{host_name()}.{os.getpid()}."
        tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=prefix, suffix=".tmp"))
        try:
            grant_umask(tmp, folder=True)
            write_files(tmp)
            if not (tmp / marker).is_file():
                raise RuntimeError(f"{final.name} wrote no {marker}")
            _sync_folder(tmp)
            if final.exists() and not done():
                self.set_aside(final)
            try:
                os.rename(tmp, final)  # fails if a finished folder is there: never replaced
            except OSError:
                if not done():
                    raise
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        return final

    def check_writable(self, needed_bytes: int) -> None:
        """Fail now, not after hours of training, if results cannot be written here: the
        folder must be creatable and writable, and its disk must have ``needed_bytes`` free."""
        where = self.cells_dir
        try:
            where.mkdir(parents=True, exist_ok=True)
            fd, probe = tempfile.mkstemp(dir=where, prefix=".write-probe.", suffix=".tmp")
            try:
                with os.fdopen(fd, "wb") as handle:
                    handle.write(b"\0" * (1 << 20))
                    handle.flush()
                    os.fsync(handle.fileno())
            finally:
                Path(probe).unlink(missing_ok=True)
        except OSError as exc:
            for folder in (self.cells_dir, self.root):  # leave nothing behind
                with contextlib.suppress(OSError):
                    folder.rmdir()  # only if empty
            raise UserError(
                f"--out: cannot write results under {self.root} ({exc.strerror or exc}); "
                "choose another --out"
            ) from None
        free = shutil.disk_usage(where).free
        if free < needed_bytes:
            raise UserError(
                f"--out: {self.root} is on a disk with {free / 2**20:.0f} MiB free; the "
                f"results of this run need about {needed_bytes / 2**20:.0f} MiB"
            )


def _contents(folder: Path) -> str:
    """What a cell or evaluation folder holds, for the warning that sets it aside."""
    if folder.parent.name == EVALS_DIR:
        return "the evaluation"
    evals = folder / EVALS_DIR
    count = sum(not p.name.startswith(".") for p in evals.iterdir()) if evals.is_dir() else 0
    return f"the cell (its pretraining and {count} evaluations)"


def _sync_folder(folder: Path) -> None:
    """Flush a folder's files and the folder itself to disk (before it is renamed into place)."""
    for path in [*folder.rglob("*"), folder]:
        if path.is_dir():
            flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0)
        elif path.is_file():
            flags = os.O_RDONLY
        else:
            continue
        fd = os.open(path, flags)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class OlderResults(UserError):
    """A results folder written by an older mae-bench, in a layout this one does not read."""


def read_suite_record(root: Path) -> dict[str, Any]:
    """The ``suite.json`` of a results folder, or a UserError naming the file and the problem."""
    path = root / SUITE_FILE
    if not path.is_file():
        raise UserError(f"{root} is not a mae-bench results folder: {path} is missing")
    try:
        record = read_json(path)
        if not isinstance(record, dict):
            raise ValueError("not a JSON object")
        if not isinstance(record.get("name"), str) or not isinstance(record.get("resolved"), dict):
            raise ValueError("no suite 'name' and 'resolved' suite")
        cells = record.get("cells")
        if not isinstance(cells, list) or not all(
            isinstance(c, dict) and isinstance(c.get("cell_id"), str) for c in cells
        ):
            raise ValueError("'cells' is not a list of cells with a 'cell_id'")
    except (ValueError, OSError) as exc:
        raise UserError(f"{path}: damaged or not a mae-bench suite record: {exc}") from None
    if not all(isinstance(c.get("evaluations"), list) for c in cells):
        raise OlderResults(
            f"{path}: results of an older mae-bench (one record per cell, before pretraining "
            "and evaluation were stored apart): run the suite again with --replace (the old "
            "results are moved aside) or with another --out to recompute them"
        )
    return record


def recorded_cells(record: dict[str, Any]) -> list[tuple[str, list[str]]]:
    """``(cell_id, eval_ids)`` of every cell a ``suite.json`` lists."""
    return [(c["cell_id"], list(c["evaluations"])) for c in record["cells"]]


def write_suite_record(root: Path, record: dict[str, Any]) -> None:
    """Write ``suite.json`` (:func:`mae_bench.plan.suite_record`: the resolved suite and its
    cells), from which any worker can re-create the suite and run any of its cells."""
    write_json(root / SUITE_FILE, record)


def cell_status(root: Path) -> list[dict[str, Any]]:
    """Per cell of a results folder: ``state`` (done, running, damaged, failed, pending) and
    a ``detail`` line: where and since when it runs and its stage and epoch, which file is
    damaged and why, the path of its traceback, or the checkpoint it would resume from."""
    record = read_suite_record(root)
    store, leases = CellStore(root), Leases(root)
    rows = []
    for cell_id, eval_ids in recorded_cells(record):
        row: dict[str, Any] = {"cell_id": cell_id}
        lease = leases.read(cell_id)
        log = root / FAILED_DIR / f"{cell_id}.log"
        checkpoints = list((root / CHECKPOINT_DIR).glob(f"{cell_id}*.pt"))
        damage = store.damage(cell_id, eval_ids)
        if damage is None and store.finished([(cell_id, eval_ids)], repair=False):
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
        elif damage is not None:
            row.update(
                state="damaged",
                detail=f"{damage} (the next run sets it aside and recomputes it)",
                reason=damage,
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
