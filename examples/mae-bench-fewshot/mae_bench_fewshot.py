"""An example third-party mae-bench evaluator: a few-shot nearest-centroid probe.

With only ``shots`` labelled images per class (drawn per seed), each class is the mean of
its images' normalised frozen features; a test image takes the class of the nearest
centroid (cosine). It reads the cell's shared feature cache, so it costs no encoder pass.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import PositiveFloat, PositiveInt

from mae_bench import EvalContext, EvalResult, Evaluator, Metric, Params, hookimpl


class FewShotParams(Params):
    """``shots`` labelled images per class; ``temperature`` turns similarities into scores."""

    shots: PositiveInt = 5
    temperature: PositiveFloat = 0.1
    pool: Literal["cls", "mean"] = "mean"


class FewShotEvaluator(Evaluator):
    """Nearest-centroid accuracy from a few labelled images per class (frozen features)."""

    name = "fewshot"
    Params = FewShotParams

    def metrics(self) -> dict[str, Metric]:
        k = self.params.shots
        return {
            "fewshot_acc": Metric(
                f"test accuracy of nearest class centroids, {k} shots per class", headline=True
            ),
            "fewshot_shots": Metric("labelled images per class used", fmt="{:.0f}", compare=False),
        }

    def evaluate(self, ctx: EvalContext) -> EvalResult:
        p = self.params
        train_x, test_x = ctx.features.get(p.pool)
        labels = ctx.data.train_labels.numpy()
        rng = np.random.default_rng(ctx.seed)
        centroids = []
        for c in range(ctx.data.num_classes):
            members = np.flatnonzero(labels == c)
            if len(members) == 0:
                raise ValueError(f"class {ctx.data.class_names[c]!r} has no training images")
            chosen = rng.choice(members, min(p.shots, len(members)), replace=False)
            centroids.append(F.normalize(train_x[torch.from_numpy(chosen)], dim=1).mean(0))
        sim = F.normalize(test_x, dim=1) @ F.normalize(torch.stack(centroids), dim=1).T
        predicted = (sim / p.temperature).softmax(dim=1).argmax(dim=1)
        accuracy = (predicted == ctx.data.test_labels).float().mean().item()
        return EvalResult({"fewshot_acc": accuracy, "fewshot_shots": float(p.shots)})


@hookimpl
def register_evaluators(register):
    register(FewShotEvaluator)
