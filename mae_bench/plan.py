"""The plan of a suite: its cells and their keys, the no-pretraining baselines, and which
cells (and evaluations) remain to be run in a results folder.

A cell is one variant pretrained with one seed, keyed by everything that determines its
weights; each evaluation is keyed by the cell's key plus what determines its result, so that
changing an evaluator re-runs only that evaluation, from the stored weights. Plugins enter
keys component by component (:func:`mae_bench.suite.component_identity`: the source of a
local or editable install, the version of a release, a component's own ``version``), so that
editing one component recomputes only the results it affects.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace
from typing import Any

from mae_bench.leaderboard import (
    default_reference,
    higher_is_better,
    metric_info,
    runs_table,
    scratch_name,
)
from mae_bench.results import CellStore
from mae_bench.stats import sequential_compare
from mae_bench.suite import Resolved, Suite, Variant

RESULT_FORMAT = 4  # 2: fixed metrics; 3: evaluator plugins; 4: the official mask count, macro
# averages over the test set's classes. Older cells are recomputed
# pretraining settings that change how a cell runs, not what it computes: not in its key
# (but a loss that is a statistic of the batch sees the micro-batch: see `loss_batch`;
# compiled kernels round differently from eager ones, as thread counts do: tested to 1e-4)
RUN_ONLY = {"accum_iter", "checkpoint_every", "compile"}


@dataclass(frozen=True)
class Evaluation:
    """One evaluator run on one cell's pretrained model, keyed by what determines it: the
    cell's pretraining key, the evaluator, its params and identity, the thresholds."""

    evaluator: Resolved
    config: dict[str, Any]
    config_hash: str

    @property
    def name(self) -> str:
        """The evaluator's name."""
        return self.evaluator.config["name"]

    @property
    def eval_id(self) -> str:
        """Folder name of the evaluation's results, under its cell's ``evals/``."""
        return f"{self.name}-{self.config_hash[:10]}"


@dataclass(frozen=True)
class Cell:
    """One unit of pretraining: a variant trained with one seed, keyed by what determines
    its weights (dataset, variant, pretraining settings, seed, result format and the
    identity of each of its components and of the dataset); then one evaluation per
    evaluator."""

    suite: str
    variant: Variant
    seed: int
    config: dict[str, Any]
    config_hash: str
    evaluations: tuple[Evaluation, ...] = ()

    @property
    def cell_id(self) -> str:
        """Folder name of the cell's results."""
        return f"{self.variant.name}-seed{self.seed}-{self.config_hash[:10]}"

    @property
    def result_ids(self) -> tuple[str, list[str]]:
        """``(cell_id, eval_ids)``: the folders that make the cell finished."""
        return self.cell_id, [e.eval_id for e in self.evaluations]

    def record(self) -> dict[str, Any]:
        """The cell as ``suite.json`` lists it."""
        return {
            "cell_id": self.cell_id,
            "variant": self.variant.name,
            "seed": self.seed,
            "config_hash": self.config_hash,
            "evaluations": [e.eval_id for e in self.evaluations],
        }


def config_hash(config: dict[str, Any]) -> str:
    """SHA-256 of the canonical JSON of a resolved config."""
    canonical = json.dumps(config, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def baseline_variants(suite: Suite) -> list[Variant]:
    """With ``eval.baselines``: one no-pretraining variant per distinct encoder config."""
    if not suite.config.eval.baselines:
        return []
    by_encoder: dict[str, Variant] = {}
    for v in suite.variants:
        by_encoder.setdefault(json.dumps(v.encoder.config, sort_keys=True), v)
    single = len(by_encoder) == 1
    families = [v.family for v in by_encoder.values()]

    def label(v: Variant) -> str:  # a sweep whose points share one encoder: by its name
        return v.family if v.family and families.count(v.family) == 1 else v.name

    return [
        replace(
            v,
            name="random-init" if single else f"random-init-{label(v)}",
            baseline=True,
            target=None,
            init_from=None,
            init_digest=None,
            family=None,
            sweep=(),
        )
        for v in by_encoder.values()
    ]


def loss_batch(suite: Suite) -> int:
    """The images one loss call sees: a step's batch split into ``accum_iter`` micro-batches
    (a data-parallel loss gathers the micro-batch over the processes:
    :func:`mae_bench.distributed.gather_batch`, so the process count does not enter)."""
    pretrain = suite.config.pretrain
    return pretrain.batch_size // pretrain.accum_iter


def pretrain_key(suite: Suite, variant: Variant) -> dict[str, Any]:
    """The pretraining settings in ``variant``'s key: all but :data:`RUN_ONLY`, plus
    ``loss_batch`` (:func:`loss_batch`) when one of its losses is a statistic of the batch,
    whose objective then depends on it (other variants' keys do not)."""
    settings = suite.config.pretrain.model_dump(mode="json", exclude=RUN_ONLY)
    if variant.depends_on_batch:
        settings["loss_batch"] = loss_batch(suite)
    return settings


def suite_cells(suite: Suite, seeds: dict[str, list[int]] | None = None) -> list[Cell]:
    """Every (variant, seed) cell of ``suite``, variant by variant, baselines last.

    ``seeds``: a variant's seeds where they differ from the suite's
    (:attr:`Suite.initial_seeds`): those adaptive seeds have added."""
    cells = []
    thresholds = suite.config.eval.thresholds.model_dump(mode="json")
    for variant in [*suite.variants, *baseline_variants(suite)]:
        for seed in (seeds or {}).get(variant.name, suite.initial_seeds):
            config = {
                "format": RESULT_FORMAT,
                "dataset": suite.dataset_config,
                "variant": variant.config,
                "seed": seed,
                "components": {"dataset": suite.dataset.identity, **variant.components()},
            }
            if not variant.baseline:
                config["pretrain"] = pretrain_key(suite, variant)
            key = config_hash(config)
            evaluations = []
            for evaluator in suite.evaluators:
                if variant.baseline and evaluator.cls.needs_pretraining:
                    continue
                run_only = getattr(evaluator.cls, "run_only", frozenset())
                eval_config = {
                    "format": RESULT_FORMAT,
                    "cell": key,
                    "evaluator": {k: v for k, v in evaluator.config.items() if k not in run_only},
                    "thresholds": thresholds,
                    "components": {"evaluator": evaluator.identity},
                }
                evaluations.append(Evaluation(evaluator, eval_config, config_hash(eval_config)))
            cells.append(Cell(suite.name, variant, seed, config, key, tuple(evaluations)))
    return cells


def suite_record(suite: Suite, cells: list[Cell]) -> dict[str, Any]:
    """The suite as its results folder records it (``suite.json``): name, source file,
    the resolved suite and its cells."""
    return {
        "name": suite.name,
        "source": suite.source,
        "resolved": suite.resolved,
        "cells": [c.record() for c in cells],
    }


CellPlan = tuple[dict[str, Any] | None, list[Evaluation]]
"""What remains of an unfinished cell: its stored pretraining record (None: pretrain it) and
the evaluations still to run."""


def remaining(store: CellStore, cells: list[Cell]) -> dict[str, CellPlan | None]:
    """Per cell: None if it is finished, else what remains of it (:data:`CellPlan`).
    Damaged records are set aside first, to be recomputed."""
    plan: dict[str, CellPlan | None] = {}
    for cell in cells:
        whole = store.finished([cell.result_ids], repair=True)
        if cell.cell_id in whole:
            plan[cell.cell_id] = None
            continue
        missing = [e for e in cell.evaluations if not store.is_done(cell.cell_id, e.eval_id)]
        plan[cell.cell_id] = (store.read(cell.cell_id), missing)  # damage was set aside above
    return plan


def recorded_seeds(record: dict[str, Any]) -> dict[str, list[int]]:
    """Each variant's seeds as a results folder's ``suite.json`` lists its cells (what
    adaptive seeds had added when it was written)."""
    seeds: dict[str, list[int]] = {}
    for cell in record.get("cells", []):
        seeds.setdefault(cell["variant"], []).append(cell["seed"])
    return seeds


@dataclass(frozen=True)
class SeedPlan:
    """Adaptive seeds after a look: the seeds each variant runs, per leaderboard row why it
    stopped (or that it goes on), and the reference they were compared with (None: none
    has results yet)."""

    seeds: dict[str, list[int]]
    reasons: dict[str, str]
    reference: str | None = None


def grow_seeds(suite: Suite, cells: list[Cell], records: list[dict[str, Any]]) -> SeedPlan:
    """The next look of adaptive seeds (``seeds: {min, max, until: conclusive}``): each
    variant of ``cells`` whose comparison with the reference on the primary metric (over the
    finished ``records`` of ``cells``) is still inconclusive gets its next seed, up to
    ``max``; the reference runs as many seeds as the longest. A suite with a seed list, or
    without a reference in ``records``, keeps its cells' seeds."""
    seeds: dict[str, list[int]] = {}
    for cell in cells:
        seeds.setdefault(cell.variant.name, []).append(cell.seed)
    adaptive = suite.adaptive
    reference = suite.reference or default_reference(records)
    runs = runs_table(records)
    primary = suite.config.primary_metric
    if adaptive is None or reference is None or runs.empty or primary not in runs:
        return SeedPlan(seeds, {}, reference)
    rows_of = {v: v for v in seeds}  # a leaderboard row -> the cells' variant
    rows_of.update({scratch_name(r["variant"]): r["variant"] for r in records if r.get("baseline")})
    better = higher_is_better(primary, metric_info(records))
    looks = sequential_compare(runs, primary, reference, better, adaptive.rule)
    measured = set(runs.loc[runs[primary].notna(), "variant"])  # the others are not compared
    grown = dict(seeds)
    reasons = {}
    for row in looks.itertuples():
        if row.variant not in measured:  # e.g. a random-init row: no fine-tuning accuracy
            continue
        variant = rows_of.get(row.variant, row.variant)
        reasons[row.variant] = row.reason
        have = len(seeds.get(variant, []))
        if row.more and have < adaptive.max:
            grown[variant] = adaptive.seeds(max(have + 1, len(grown.get(variant, []))))
    longest = max(len(v) for v in grown.values())
    grown[reference] = adaptive.seeds(max(longest, len(grown.get(reference, []))))
    reasons[reference] = f"reference: runs as many seeds as the longest variant ({longest})"
    return SeedPlan(grown, reasons, reference)
