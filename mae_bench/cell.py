"""One cell, stage by stage: pretraining (checkpointed, data-parallel), loading stored weights,
evaluations, and storing each stage's result or the cell's failure. Claiming cells, the
progress display and the loggers are the worker's (:mod:`mae_bench.worker`).
"""

from __future__ import annotations

import csv
import errno
import io
import math
import traceback
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch.utils.flop_counter import FlopCounterMode

from mae_bench.contract import (
    EvalContext,
    ImageData,
    Loss,
    MaskedAutoencoder,
    MaskingStrategy,
    Target,
)
from mae_bench.data import ImageFeeder
from mae_bench.device import device_name, peak_memory_mb, provenance, reset_peak_memory
from mae_bench.distributed import SINGLE, Dist
from mae_bench.errors import MaeBenchWarning, exception_line
from mae_bench.evaluate import FeatureCache
from mae_bench.files import atomic_write
from mae_bench.plan import Cell, Evaluation
from mae_bench.results import (
    FAILED_DIR,
    HISTORY_FILE,
    PRETRAIN_FILE,
    RESULT_FILE,
    CellStore,
    write_json,
)
from mae_bench.resume import Checkpoint
from mae_bench.suite import Suite, Variant
from mae_bench.train import EpochCallback, PretrainResult, forward_loss, meta_masks, pretrain
from mae_bench.weights import load_weights, rebuild_model, save_weights


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
    model: MaskedAutoencoder,
    masking: MaskingStrategy,
    losses: list[tuple[Loss, float]],
    target: Target | None = None,
) -> dict[str, str]:
    """Short descriptions of a variant's components, for leaderboard columns (a target is
    part of the loss column: ``mse on hog``)."""
    terms = [
        loss.summary() if weight == 1 else f"{weight:g}*{loss.summary()}" for loss, weight in losses
    ]
    loss = " + ".join(terms) + (f" on {target.summary()}" if target is not None else "")
    return {"encoder": model.summary(), "masking": masking.summary(), "loss": loss}


def count_params(module: torch.nn.Module) -> float:
    """Trainable parameters, in millions."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad) / 1e6


FLOP_COUNT_IMAGES = 2
"""Images of the pretraining step whose FLOPs are counted (then divided per image)."""
SCHEDULE_POINTS = 8
"""Points of the masking schedule (midpoints of equal parts of training) counted and averaged."""


def step_flops(
    model: MaskedAutoencoder,
    masking: MaskingStrategy,
    losses: list[tuple[Loss, float]],
    progress: float,
    target: Target | None = None,
) -> tuple[int, float]:
    """FLOPs per image of one pretraining step of ``model`` (on the meta device) at training
    ``progress``: the forward pass, the losses and the backward pass, as
    :class:`~torch.utils.flop_counter.FlopCounterMode` counts them (matrix products,
    convolutions, attention; the optimizer's element-wise update is not counted). Returns
    the visible patches of the mask drawn (on the CPU, as training draws it) and the FLOPs."""
    mask = meta_masks(masking, model, FLOP_COUNT_IMAGES, progress)
    size = model.image_size
    images = torch.empty(FLOP_COUNT_IMAGES, model.in_chans, size, size, device="meta")
    with FlopCounterMode(display=False) as counter:  # a target's compute (a teacher) counts
        loss, _ = forward_loss(model, images, mask, losses, target=target)
        loss.backward()
    return mask.ids_keep.shape[1], counter.get_total_flops() / FLOP_COUNT_IMAGES


def pretrain_flops_per_image(variant: Variant, image_size: int, channels: int) -> float:
    """FLOPs per image of one pretraining step of ``variant``, averaged over its masking
    schedule: counted (:func:`step_flops`) at the midpoints of ``SCHEDULE_POINTS`` equal
    parts of training, once per number of visible patches (a fixed ratio is counted once).

    The model is built on the meta device (no memory, no data) and the random streams the
    cell draws from are left where they were. A variant whose plugins cannot run there is
    warned about (naming it and the reason) and gets NaN: its cell runs uncounted."""
    counted: dict[int, float] = {}
    per_point = []
    with torch.random.fork_rng(devices=[]):
        try:
            with torch.device("meta"):
                model = variant.build_model(image_size, channels)
            masking, losses = variant.build_masking(), variant.build_losses()
            target = variant.build_target()
            if target is not None:
                with torch.device("meta"):
                    target.setup(model)
            for point in range(SCHEDULE_POINTS):
                progress = (point + 0.5) / SCHEDULE_POINTS
                visible, flops = step_flops(model, masking, losses, progress, target)
                per_point.append(counted.setdefault(visible, flops))
        except Exception as exc:  # a plugin that cannot run on the meta device
            warnings.warn(
                f"variant {variant.name!r}: its pretraining FLOPs could not be counted on the "
                f"meta device ({exception_line(exc)}); its pretrain_tflops is left empty",
                MaeBenchWarning,
                stacklevel=2,
            )
            return math.nan
    return sum(per_point) / len(per_point)


def _history_csv(history: list[dict[str, float]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(history[0]) if history else ["epoch"])
    writer.writeheader()
    writer.writerows(history)
    return buffer.getvalue()


def pretrain_cell(
    cell: Cell,
    suite: Suite,
    data: ImageData,
    feeder: ImageFeeder,
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
    measures_memory = reset_peak_memory(feeder.device)  # this cell's peak, not the process's
    torch.manual_seed(cell.seed)
    model: MaskedAutoencoder = cell.variant.build_model(feeder.image_size, feeder.channels)
    if cell.variant.init_from:
        load_weights(model, Path(cell.variant.init_from))
    model.to(feeder.device)
    masking = cell.variant.build_masking()
    losses = cell.variant.build_losses()
    target = cell.variant.build_target()
    baseline = cell.variant.baseline
    metrics: dict[str, float] = {
        "params_m": count_params(model.encoder),
        "params_total_m": count_params(model),
    }
    trained = PretrainResult()
    if not baseline:
        flops_per_image = pretrain_flops_per_image(cell.variant, feeder.image_size, feeder.channels)
        trained = pretrain(
            model,
            data.pretrain,
            feeder,
            masking,
            losses,
            cfg.pretrain,
            seed=cell.seed,
            on_epoch=on_epoch,
            checkpoint=checkpoint,
            world=world,
            on_resume=on_resume,
            target=target,
        )
        metrics.update(
            pretrain_s=trained.seconds,
            imgs_per_s=trained.images_per_second,
            final_loss=trained.history[-1]["loss"],
            flops_per_image=flops_per_image / 1e9,
            pretrain_tflops=flops_per_image * trained.images_seen / 1e12,
        )
    metrics["peak_mem_mb"] = peak_memory_mb(feeder.device) if measures_memory else float("nan")
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
            else describe(model, masking, losses, target)
        ),
        "baseline": baseline,
        **({"sweep": cell.variant.sweep_record} if cell.variant.family else {}),
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
    path = store.path(cell.cell_id)
    model = rebuild_model(path, cell.variant.build_model, record=record, device=feeder.device)
    return Pretrained(record, model, [], reused=True)


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
        target=None if cell.variant.baseline else cell.variant.build_target(),
    )
    for evaluation in evaluations_to_run:
        evaluator = evaluation.evaluator.cls(evaluation.evaluator.params)
        declared = {**evaluator.metrics(), **(ctx.target.metrics() if ctx.target else {})}
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
            "sanity": result.sanity,
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
    elif isinstance(exc, SystemExit | KeyboardInterrupt):
        line = f"{line.rstrip()} (raised by a plugin, not a signal: it fails the cell only)"
    return line


def record_failure(root: Path, cell: Cell, exc: BaseException) -> CellFailure:
    """Write the cell's traceback to ``failed/<cell id>.log`` (a re-run retries the cell)."""
    reason = failure_line(exc)
    path = root / FAILED_DIR / f"{cell.cell_id}.log"
    text = "".join(traceback.format_exception(exc))
    try:
        atomic_write(path, f"{reason}\n\n{text}")
    except OSError:  # e.g. the disk is full: the reason is still reported
        return CellFailure(reason, None)
    return CellFailure(reason, path)


def store_pretrained(store: CellStore, cell: Cell, pre: Pretrained) -> None:
    meta = {"cell_id": cell.cell_id, "config_hash": cell.config_hash}

    def write_files(folder: Path) -> None:
        save_weights(pre.model, folder, meta)
        (folder / HISTORY_FILE).write_text(_history_csv(pre.history), encoding="utf-8")
        write_json(folder / PRETRAIN_FILE, pre.record)  # last: its presence marks it done

    store.write(cell.cell_id, write_files)


def store_evaluation(store: CellStore, cell: Cell, out: Evaluated) -> None:
    def write_files(folder: Path) -> None:
        for name, table in out.tables.items():
            table.to_csv(folder / f"{name}.csv", index=False)
        write_json(folder / RESULT_FILE, out.record)  # last: its presence marks it done

    store.write_eval(cell.cell_id, out.record["eval_id"], write_files)
