"""Suite files: schema, loading, ``--set`` overrides and resolution against the plugins.

A suite is validated in two steps, both before anything runs: the YAML against the schema
below (unknown keys are errors), then every component against its plugin's ``Params``.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.metadata
import inspect
import json
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from functools import cache, partial
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Literal, TypeVar, Union, get_args, get_origin

import torch
import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

from mae_bench.contract import (
    Dataset,
    Evaluator,
    ImageData,
    Logger,
    Loss,
    MaskedAutoencoder,
    MaskingStrategy,
    Metric,
    Params,
    Seed,
    Target,
    prediction_loss,
)
from mae_bench.errors import ConfigError, UserError
from mae_bench.metrics import CORE_METRICS, DEFAULT_PRIMARY_METRIC
from mae_bench.plugins import Registry
from mae_bench.stats import SequentialRule
from mae_bench.sweeps import (
    MAX_NAME,
    PathError,
    expand,
    get_path,
    list_index,
    set_path,
    sweep_axes,
)
from mae_bench.weights import load_weights, weights_digest

SafeName = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$", max_length=MAX_NAME)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class ComponentRef(BaseModel):
    """``{name: ..., <plugin params>...}``: the plugin validates the extra keys."""

    model_config = ConfigDict(extra="allow", frozen=True, allow_inf_nan=False)
    name: str

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        """``encoder: vit`` is short for ``encoder: {name: vit}``."""
        return {"name": value} if isinstance(value, str) else value

    @property
    def params(self) -> dict[str, Any]:
        """The keys meant for the plugin's ``Params``."""
        return dict(self.model_extra or {})


class EncoderRef(ComponentRef):
    """The encoder plugin, optionally starting from a checkpoint instead of a random init."""

    init_from: str | None = Field(
        default=None,
        description="a mae-bench cell folder, a .safetensors or a .pth checkpoint "
        "(official MAE releases included) or a Hugging Face ViTMAE folder to initialise the "
        "model from",
    )


class DatasetRef(ComponentRef):
    """The dataset plugin plus how the core feeds its images to models."""

    image_size: PositiveInt = 32
    channels: Literal[1, 3] = 3


class LossRef(ComponentRef):
    """A loss term and its weight in the variant's objective: a positive, finite number (the
    objective is minimised, so a negative weight would maximise its term)."""

    weight: float = 1.0

    @field_validator("weight")
    @classmethod
    def _positive(cls, value: float) -> float:
        if not math.isfinite(value) or value <= 0:
            raise ValueError(
                "must be a positive, finite number (the objective is minimised: a negative "
                "weight would maximise its term)"
            )
        return value


class AugmentConfig(_Strict):
    """Batched on-device augmentation of pretraining images (MAE: crop scale (0.2, 1), flip)."""

    crop_scale: (
        tuple[Annotated[float, Field(gt=0, le=1)], Annotated[float, Field(gt=0, le=1)]] | None
    ) = None
    crop_ratio: tuple[PositiveFloat, PositiveFloat] = (3 / 4, 4 / 3)
    hflip: bool = False

    @model_validator(mode="after")
    def _ordered(self) -> AugmentConfig:
        if self.crop_scale and self.crop_scale[0] > self.crop_scale[1]:
            raise ValueError("crop_scale must be (min, max)")
        if self.crop_ratio[0] > self.crop_ratio[1]:
            raise ValueError("crop_ratio must be (min, max)")
        return self


class PretrainConfig(_Strict):
    """Pretraining budget and optimizer (AdamW, linear warmup then cosine decay).

    ``batch_size`` is the effective batch of one optimizer step, whatever runs it: it is split
    over data-parallel processes and ``accum_iter`` accumulated micro-batches. ``blr`` sets
    the learning rate by the MAE paper's rule, lr = blr x batch_size / 256.
    """

    epochs: PositiveInt
    batch_size: PositiveInt = 64
    lr: PositiveFloat = 1.5e-3
    blr: PositiveFloat | None = None
    accum_iter: PositiveInt = 1
    checkpoint_every: NonNegativeInt | Literal["auto"] = "auto"
    min_lr: NonNegativeFloat = 0.0
    weight_decay: NonNegativeFloat = 0.05
    warmup_epochs: NonNegativeFloat = 0.0
    betas: tuple[Annotated[float, Field(gt=0, lt=1)], Annotated[float, Field(gt=0, lt=1)]] = (
        0.9,
        0.95,
    )
    grad_clip: PositiveFloat | None = None
    augment: AugmentConfig = AugmentConfig()
    compile: bool = Field(
        default=False,
        description="run the training step through torch.compile (dynamic shapes where the "
        "token count changes); how a cell runs, not what it computes: not in its key",
    )

    @model_validator(mode="before")
    @classmethod
    def _lr_rule(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("blr") is not None:
            if data.get("lr") is not None:
                lr_rule = data["blr"] * data.get("batch_size", 64) / 256
                if not math.isclose(float(data["lr"]), lr_rule):
                    raise ValueError("set lr or blr (lr = blr x batch_size / 256), not both")
            data = {**data, "lr": data["blr"] * data.get("batch_size", 64) / 256}
        return data

    @model_validator(mode="after")
    def _micro_batches(self) -> PretrainConfig:
        if self.batch_size % self.accum_iter:
            raise ValueError(
                f"batch_size {self.batch_size} does not split into accum_iter={self.accum_iter} "
                "equal micro-batches"
            )
        return self


class ThresholdConfig(_Strict):
    """Decision thresholds swept for the binary (or one-vs-rest) threshold analysis."""

    start: Annotated[float, Field(ge=0, le=1)] = 0.15
    stop: Annotated[float, Field(ge=0, le=1)] = 0.85
    step: Annotated[float, Field(gt=0, le=1)] = 0.05

    @model_validator(mode="after")
    def _ordered(self) -> ThresholdConfig:
        if self.start > self.stop:
            raise ValueError("start must not exceed stop")
        return self

    def values(self) -> list[float]:
        """The thresholds, start to stop inclusive."""
        n = round((self.stop - self.start) / self.step)
        return [round(self.start + i * self.step, 10) for i in range(n + 1)]


class EvalConfig(BaseModel):
    """``eval:``: the core's settings, and one key per evaluator plugin (its params, plus
    ``enabled``); evaluators enabled by default run unless ``enabled: false``."""

    model_config = ConfigDict(extra="allow", frozen=True, allow_inf_nan=False)
    baselines: bool = Field(
        default=False,
        description="add a no-pretraining cell per encoder: random-init (frozen) and scratch (FT)",
    )
    thresholds: ThresholdConfig = ThresholdConfig()

    @property
    def evaluators(self) -> dict[str, Any]:
        """The keys naming evaluators, with their raw settings."""
        return dict(self.model_extra or {})


class VariantConfig(_Strict):
    """One MAE variant: encoder x masking x loss (x target)."""

    name: SafeName
    encoder: EncoderRef
    masking: ComponentRef = ComponentRef(name="random")
    loss: list[LossRef] = Field(default_factory=lambda: [LossRef(name="mse")], min_length=1)
    target: ComponentRef | None = Field(
        default=None,
        description="what the model predicts for a masked patch (a target plugin: norm_pix, "
        "hog, data2vec, ...); none: the input's pixels",
    )
    sweep: dict[str, Any] | None = Field(
        default=None,
        description="fields to sweep, e.g. {masking.ratio: [0.5, 0.75]}: one variant per "
        "point of the product of the lists (`zip: {path: [...], path: [...]}` for lists "
        "that move together), named from its values",
    )

    @field_validator("loss", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, dict | str) else value

    @field_validator("sweep")
    @classmethod
    def _valid_sweep(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None:
            sweep_axes(value)  # raises ValueError naming the problem
        return value


class AdaptiveSeeds(_Strict):
    """Seeds until the answer is clear: every variant runs ``min`` seeds; then, one seed at
    a time, those whose paired comparison with the reference on the primary metric is still
    inconclusive run another, up to ``max`` (a group-sequential test that keeps each
    variant's error rate at 5%: :class:`mae_bench.stats.SequentialRule`). The reference runs
    as many seeds as the longest of them. Seeds are ``first``, ``first + 1``, ..."""

    min: int = Field(default=3, ge=2, description="seeds every variant runs")
    max: int = Field(default=10, ge=2, description="seeds a variant runs at most")
    until: Literal["conclusive"] = Field(
        default="conclusive", description="stop a variant once its verdict is better or worse"
    )
    first: Seed = Field(default=0, description="the first seed")

    @model_validator(mode="after")
    def _ordered(self) -> AdaptiveSeeds:
        if self.max < self.min:
            raise ValueError(f"max ({self.max}) must be at least min ({self.min})")
        return self

    @property
    def rule(self) -> SequentialRule:
        """The stopping rule."""
        return SequentialRule(min_seeds=self.min, max_seeds=self.max)

    def seeds(self, count: int) -> list[int]:
        """The first ``count`` seeds."""
        return list(range(self.first, self.first + count))


class SuiteConfig(_Strict):
    """The whole suite file."""

    name: SafeName
    description: str = ""
    dataset: DatasetRef
    pretrain: PretrainConfig
    variants: list[VariantConfig] = Field(min_length=1)
    eval: EvalConfig = EvalConfig()
    seeds: Annotated[
        Annotated[list[Seed], Tag("~list")] | Annotated[AdaptiveSeeds, Tag("~adaptive")],
        Discriminator(lambda v: "~adaptive" if isinstance(v, dict | AdaptiveSeeds) else "~list"),
    ] = Field(
        default_factory=lambda: [0],
        description="a list of seeds, or {min: 3, max: 10, until: conclusive} (AdaptiveSeeds)",
    )
    primary_metric: str = DEFAULT_PRIMARY_METRIC
    loggers: list[ComponentRef] = Field(default_factory=list)
    reference: SafeName | None = Field(
        default=None,
        description="the variant every other is compared with (default: the first one)",
    )

    @field_validator("variants")
    @classmethod
    def _unique_variants(cls, variants: list[VariantConfig]) -> list[VariantConfig]:
        names = [v.name for v in variants]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"duplicate variant names: {', '.join(duplicates)}")
        return variants

    @field_validator("seeds")
    @classmethod
    def _unique_seeds(cls, seeds: list[int] | AdaptiveSeeds) -> list[int] | AdaptiveSeeds:
        if isinstance(seeds, list) and not seeds:
            raise ValueError("at least one seed")
        if isinstance(seeds, list) and len(set(seeds)) != len(seeds):
            raise ValueError("seeds must be unique")
        return seeds


# --------------------------------------------------------------------------- resolution
SITE_FOLDERS = frozenset({"site-packages", "dist-packages"})  # where installers put releases


def _own_modules(cls: type) -> list[str]:
    """The modules defining ``cls``, its ``Params`` and their bases within ``cls``'s own
    top-level package (not the core's base classes, not pydantic's or torch's)."""
    package = cls.__module__.split(".")[0]
    params = getattr(cls, "Params", object)
    classes = (*cls.__mro__, *(params.__mro__ if isinstance(params, type) else ()))
    return sorted({k.__module__ for k in classes if k.__module__.split(".")[0] == package})


def _source_file(module_name: str) -> Path | None:
    """The source file of a loaded module, or None (no such module, or no source)."""
    module = sys.modules.get(module_name)
    try:
        source = inspect.getsourcefile(module) if module is not None else None
    except TypeError:  # a built-in module
        return None
    return Path(source) if source else None


def _from_local_directory(distribution: str) -> bool:
    """True if pip installed ``distribution`` from a local folder (``pip install -e DIR`` or
    ``pip install DIR``: its ``direct_url.json`` has ``dir_info``), whatever its version says."""
    try:
        direct_url = importlib.metadata.distribution(distribution).read_text("direct_url.json")
        return "dir_info" in json.loads(direct_url or "{}")
    except (importlib.metadata.PackageNotFoundError, ValueError, OSError):
        return False


def _source_digests(cls: type) -> tuple[dict[str, str], bool] | None:
    """SHA-256 of the source of each of ``cls``'s own modules, by module name, and whether
    every one lies in a site-packages folder; None if a source cannot be read."""
    digests, in_site = {}, True
    for name in _own_modules(cls):
        path = _source_file(name)
        if path is None:
            return None
        try:
            digests[name] = hashlib.sha256(path.read_bytes()).hexdigest()
        except OSError:
            return None
        in_site = in_site and bool(SITE_FOLDERS & set(path.parts))
    return (digests, in_site) if digests else None


@cache
def component_identity(cls: type, distribution: str, distribution_version: str) -> dict[str, Any]:
    """What determines the behaviour of the component ``cls`` (beyond its params), for the
    keys of the results it affects: its distribution, its own declared ``version`` if any,
    and either

    - ``source_sha256``: the SHA-256 of each of its own modules' source, by module name, for
      a local or editable install (whose version metadata stays as installed while its
      source changes), or
    - ``plugin_version``: the distribution's version, for a release installed into
      site-packages (or a component whose source cannot be read).

    Read once per class and process, so that every plan of one process agrees with the
    code it runs."""
    identity: dict[str, Any] = {"plugin": distribution}
    declared = getattr(cls, "version", None)
    if isinstance(declared, str | int | float):  # not an unrelated property or method
        identity["version"] = str(declared)
    sources = _source_digests(cls)
    released = sources is None or (sources[1] and not _from_local_directory(distribution))
    if released:
        identity["plugin_version"] = distribution_version
    else:
        identity["source_sha256"] = sources[0]
    return identity


@dataclass(frozen=True)
class Resolved:
    """A component reference checked against its plugin: class, validated params, config."""

    cls: type
    params: Params
    config: dict[str, Any]  # {"name": ..., **params}, every default filled in
    plugin: str  # distribution that provides it
    version: str = "unknown"  # of that distribution (see ``identity``)

    def describe(self) -> str:
        """The component and where it comes from, e.g. ``'vit' (mae-bench 0.1.0)``."""
        return f"{self.config['name']!r} ({self.plugin} {self.version})"

    @property
    def identity(self) -> dict[str, Any]:
        """What determines its behaviour beyond its params, part of every key it affects
        (see :func:`component_identity`)."""
        return copy.deepcopy(component_identity(self.cls, self.plugin, self.version))


@dataclass(frozen=True)
class ResolvedLoss:
    """A loss term with its weight."""

    component: Resolved
    weight: float


@dataclass(frozen=True)
class Variant:
    """A variant whose components are all resolved."""

    name: str
    encoder: Resolved
    masking: Resolved
    losses: tuple[ResolvedLoss, ...]
    target: Resolved | None = None  # what the model predicts (None: the input's pixels)
    baseline: bool = False  # no pretraining: the encoder stays at its random init
    init_from: str | None = None  # checkpoint the model starts from
    init_digest: str | None = None  # SHA-256 of that checkpoint's files
    family: str | None = None  # a sweep's point: the swept variant's name in the suite
    sweep: tuple[tuple[str, Any], ...] = ()  # a sweep's point: (path, value) per swept path

    @property
    def sweep_record(self) -> dict[str, Any] | None:
        """A sweep point's family and values, as its cell records them (None otherwise)."""
        if self.family is None:
            return None
        return {"family": self.family, "values": dict(self.sweep)}

    @property
    def config(self) -> dict[str, Any]:
        """The resolved variant as plain data."""
        if self.baseline:
            return {"name": self.name, "encoder": self.encoder.config, "baseline": "random-init"}
        encoder = dict(self.encoder.config)
        if self.init_from:
            encoder.update(init_from=self.init_from, init_sha256=self.init_digest)
        config = {
            "name": self.name,
            "encoder": encoder,
            "masking": self.masking.config,
            "loss": [{**t.component.config, "weight": t.weight} for t in self.losses],
        }
        if self.target is not None:  # (absent by default: pixel variants keep their keys)
            config["target"] = self.target.config
        return config

    def build_model(self, image_size: int, in_chans: int) -> MaskedAutoencoder:
        """A fresh model (initialised from the current torch seed; not from ``init_from``),
        its head predicting the target's width when the variant has a target."""
        model = self.encoder.cls(self.encoder.params, image_size=image_size, in_chans=in_chans)
        target = self.build_target()
        if target is not None and not self.baseline:
            model.size_head(target)
        return model

    def build_target(self) -> Target | None:
        """The target (None: the model predicts the input's pixels)."""
        return None if self.target is None else self.target.cls(self.target.params)

    def decoder_loss(self) -> Loss | None:
        """The loss that says what the model's predictions mean (see ``prediction_loss``)."""
        return prediction_loss([loss for loss, _ in self.build_losses()])

    def build_masking(self) -> MaskingStrategy:
        """The masking strategy."""
        return self.masking.cls(self.masking.params)

    @property
    def depends_on_batch(self) -> bool:
        """True if a loss term is a statistic of the batch it sees (``Loss.depends_on_batch``):
        what splits a step's batch then changes the objective (not for baselines: no loss)."""
        return not self.baseline and any(
            getattr(t.component.cls, "depends_on_batch", False) for t in self.losses
        )

    def components(self) -> dict[str, Any]:
        """The identity of each of its components (:func:`component_identity`), by role:
        ``encoder``, ``masking`` and ``loss`` (one per term; a baseline has its encoder only)."""
        if self.baseline:
            return {"encoder": self.encoder.identity}
        out = {
            "encoder": self.encoder.identity,
            "masking": self.masking.identity,
            "loss": [t.component.identity for t in self.losses],
        }
        if self.target is not None:
            out["target"] = self.target.identity
        return out

    def plugins(self) -> dict[str, str]:
        """Name and version of every plugin distribution providing one of its components."""
        parts = (
            [self.encoder]
            if self.baseline
            else [self.encoder, self.masking, *(t.component for t in self.losses)]
        )
        if self.target is not None and not self.baseline:
            parts.append(self.target)
        return {r.plugin: r.version for r in parts}

    def build_losses(self) -> list[tuple[Loss, float]]:
        """The loss terms with their weights."""
        return [(t.component.cls(t.component.params), t.weight) for t in self.losses]


@dataclass(frozen=True)
class Suite:
    """A validated suite with every component resolved."""

    config: SuiteConfig
    dataset: Resolved
    variants: tuple[Variant, ...]
    source: str
    evaluators: tuple[Resolved, ...] = ()  # the enabled evaluators, in suite order
    loggers: tuple[Resolved, ...] = ()  # run observers (not part of any result's key)
    warnings: tuple[str, ...] = ()  # valid, but the user should know (e.g. test leakage)
    families: tuple[tuple[str, str], ...] = ()  # swept variant -> its point at unswept values
    written: tuple[dict[str, Any], ...] = ()  # per suite variant: resolved, a sweep unexpanded

    @property
    def adaptive(self) -> AdaptiveSeeds | None:
        """The adaptive-seed setting (``seeds: {min, max, until}``), None for a seed list."""
        seeds = self.config.seeds
        return seeds if isinstance(seeds, AdaptiveSeeds) else None

    @property
    def initial_seeds(self) -> list[int]:
        """The seeds every variant runs: the list, or an adaptive setting's first ``min``."""
        adaptive = self.adaptive
        return adaptive.seeds(adaptive.min) if adaptive else list(self.config.seeds)

    @property
    def reference(self) -> str | None:
        """The variant every other is compared with: the suite's ``reference``, where a
        swept variant's name means its point at the unswept values; without one, the first
        variant's such point if it is swept, else None (the first pretrained variant with
        results, see :func:`mae_bench.leaderboard.default_reference`)."""
        families = dict(self.families)
        if self.config.reference is not None:
            return families.get(self.config.reference, self.config.reference)
        return families.get(self.config.variants[0].name)

    @property
    def name(self) -> str:
        """The suite's name (its results folder)."""
        return self.config.name

    @property
    def resolved(self) -> dict[str, Any]:
        """The whole suite with every default filled in, as plain data."""
        exclude = {"dataset", "variants", "eval", "loggers"}
        data = self.config.model_dump(mode="json", exclude=exclude)
        data["dataset"] = self.dataset_config
        # a swept variant as its resolved unswept config plus its sweep: resolving this again
        # (a worker reads it from suite.json) expands the same points, sweep values included
        data["variants"] = list(self.written) or [v.config for v in self.variants]
        data["eval"] = self.eval_config
        data["loggers"] = [logger.config for logger in self.loggers]
        data["reference"] = self.reference
        return data

    def build_loggers(self) -> list[Logger]:
        """The suite's loggers."""
        return [r.cls(r.params) for r in self.loggers]

    @property
    def eval_config(self) -> dict[str, Any]:
        """``eval:`` resolved: core settings and each enabled evaluator's full params."""
        core = self.config.eval.model_dump(mode="json", exclude=set(self.config.eval.evaluators))
        enabled = {}
        for e in self.evaluators:
            params = {k: v for k, v in e.config.items() if k != "name"}
            enabled[e.config["name"]] = {"enabled": True, **params}
        return {**core, **enabled}

    def build_evaluators(self) -> list[Evaluator]:
        """The enabled evaluators, in suite order."""
        return [e.cls(e.params) for e in self.evaluators]

    def plugin_versions(self) -> dict[str, str]:
        """Every plugin distribution the suite uses, with its version (for provenance)."""
        parts = [self.dataset, *self.evaluators]
        out = {r.plugin: r.version for r in parts}
        for v in self.variants:
            out.update(v.plugins())
        return dict(sorted(out.items()))

    def metrics(self) -> dict[str, Metric]:
        """Every metric a cell of this suite reports: the runner's own and the evaluators'."""
        out = dict(CORE_METRICS)
        for evaluator in self.build_evaluators():
            out.update(evaluator.metrics())
        for variant in self.variants:  # a target's own reconstruction measure
            target = variant.build_target()
            if target is not None and not variant.baseline:
                out.update(target.metrics())
        return out

    @property
    def dataset_config(self) -> dict[str, Any]:
        """The dataset reference, resolved."""
        ds = self.config.dataset
        return {**self.dataset.config, "image_size": ds.image_size, "channels": ds.channels}

    def build_dataset(self) -> Dataset:
        """The dataset plugin, its ``load()`` checked (see :class:`CheckedDataset`)."""
        return CheckedDataset(self.dataset, self.source)


T = TypeVar("T")


def adaptive_rule(resolved: dict[str, Any]) -> SequentialRule | None:
    """The stopping rule of a resolved suite's adaptive seeds (as ``suite.json`` records
    it), None for a seed list."""
    seeds = resolved.get("seeds")
    return AdaptiveSeeds.model_validate(seeds).rule if isinstance(seeds, dict) else None


def plugin_call(build: Callable[[], T], field: str, resolved: Resolved, source: str) -> T:
    """``build()``, which runs a plugin's code, or one ConfigError naming ``field`` in
    ``source``: a ValueError's message as it is (how a plugin refuses its settings), any
    other exception as the plugin's failure. A UserError (a missing file) passes unchanged."""
    try:
        return build()
    except UserError:
        raise
    except ValueError as exc:
        raise ConfigError(field, str(exc), source) from None
    except Exception as exc:
        message = f"{resolved.describe()} could not be built: {type(exc).__name__}: {exc}"
        raise ConfigError(field, message, source) from None


class CheckedDataset(Dataset):
    """A suite's dataset plugin as the core uses it: whatever goes wrong in its ``load()``
    (it raises, returns something else than an ImageData, or data that fails ImageData's
    checks: float images, labels out of range, an empty split, a label-count mismatch) is
    one ConfigError naming the plugin under ``dataset``, never a traceback. A UserError the
    plugin raises (a missing file, with its hint) passes unchanged."""

    def __init__(self, resolved: Resolved, source: str) -> None:
        self.plugin = plugin_call(
            lambda: resolved.cls(resolved.params), "dataset", resolved, source
        )
        super().__init__(resolved.params)
        self.resolved = resolved
        self.source = source

    @property
    def pretrain_sees_test(self) -> bool:
        return self.plugin.pretrain_sees_test

    def load(self) -> ImageData:
        who = self.resolved.describe()
        try:
            data = self.plugin.load()
        except UserError:
            raise
        except Exception as exc:
            if _raised_in(exc, ImageData.__post_init__):
                message = f"{who} returned invalid data: {exc}"
            else:
                message = f"{who} failed to load: {type(exc).__name__}: {exc}"
            raise ConfigError("dataset", message, self.source) from None
        if not isinstance(data, ImageData):
            message = f"{who} returned {type(data).__name__}, not an ImageData"
            raise ConfigError("dataset", message, self.source)
        return data


def _raised_in(exc: BaseException, function: Callable[..., Any]) -> bool:
    """Whether ``exc`` was raised by ``function``'s own code (its innermost frame)."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and tb.tb_frame.f_code is function.__code__


def _format_loc(loc: Sequence[str | int], prefix: str = "") -> str:
    path = prefix
    for part in loc:
        if isinstance(part, str) and part.startswith("~"):  # a union's tag, not a field
            continue
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path += f".{part}" if path else str(part)
    return path


def config_error(exc: ValidationError, prefix: str, source: str) -> ConfigError:
    """A pydantic validation error as one ConfigError naming the field (more lines for more
    errors), under ``prefix`` in ``source``."""
    lines = []
    for err in exc.errors():
        loc = _format_loc(err["loc"], prefix)
        if err["type"] == "extra_forbidden":
            message = "unknown key (check the spelling)"
        elif err["type"] == "missing":
            message = "required field is missing"
        else:
            message = err["msg"].removeprefix("Value error, ")
            if "input" in err and not isinstance(err["input"], dict | list):
                message += f" (got {err['input']!r})"
        lines.append((loc, message))
    first_loc, first_message = lines[0]
    error = ConfigError(first_loc, first_message, source)
    if len(lines) > 1:
        more = "\n".join(f"  {loc}: {message}" for loc, message in lines[1:])
        error.args = (f"{error.args[0]}\n{more}",)
    return error


def _alternatives(annotation: Any) -> tuple[Any, ...]:
    """The types a field of ``annotation`` takes: a union's members, ``Annotated`` unwrapped."""
    while get_origin(annotation) is Annotated:
        annotation = get_args(annotation)[0]
    if get_origin(annotation) in (Union, UnionType):
        return tuple(a for arg in get_args(annotation) for a in _alternatives(arg))
    return (annotation,)


def _number_not_bool(annotation: Any) -> bool:
    """Whether a field of ``annotation`` takes numbers but not true/false (which pydantic
    would silently read as 1 and 0)."""
    options = _alternatives(annotation)
    takes_bool = any(
        o is bool or o is Any or (get_origin(o) is Literal and bool in map(type, get_args(o)))
        for o in options
    )
    return not takes_bool and any(o in (int, float) for o in options)


def _boolean_in(annotation: Any, value: Any, path: str) -> tuple[str, bool] | None:
    """The first ``(path, value)`` in ``value`` that is a boolean where ``annotation`` wants a
    number (nested models, lists and tuples included), or None."""
    if isinstance(value, bool):
        return (path, value) if _number_not_bool(annotation) else None
    for option in _alternatives(annotation):
        origin, args = get_origin(option), get_args(option)
        if isinstance(option, type) and issubclass(option, BaseModel):
            return boolean_for_number(option, value, path)
        if origin is list and args and isinstance(value, dict):  # one item for a list
            return _boolean_in(args[0], value, f"{path}[0]")
        if origin in (list, tuple) and args and isinstance(value, list):
            repeated = origin is list or args[-1] is Ellipsis
            for i, item in enumerate(value[: None if repeated else len(args)]):
                found = _boolean_in(args[0] if repeated else args[i], item, f"{path}[{i}]")
                if found:
                    return found
            return None
    return None


def boolean_for_number(
    model: type[BaseModel], raw: Any, prefix: str = ""
) -> tuple[str, bool] | None:
    """The path and value of the first boolean in ``raw`` (the data for ``model``) where
    ``model`` wants a number: pydantic would silently read ``epochs: true`` as 1."""
    if not isinstance(raw, dict):
        return None
    for key, value in raw.items():
        field = model.model_fields.get(key) if isinstance(key, str) else None
        if field is not None:
            found = _boolean_in(field.annotation, value, _format_loc([key], prefix))
            if found:
                return found
    return None


def _refuse_booleans(model: type[BaseModel], raw: Any, prefix: str, source: str) -> None:
    """A ConfigError naming the first field of ``raw`` given true/false for a number."""
    found = boolean_for_number(model, raw, prefix)
    if found:
        path, value = found
        raise ConfigError(path, f"must be a number, not {str(value).lower()}", source)


def _check_masking(variant: Variant, grid: tuple[int, int]) -> None:
    variant.build_masking().check_grid(grid)


def _on(device: torch.device, build: Callable[[], T]) -> T:
    """``build()`` with ``device`` as torch's default device."""
    with device:
        return build()


def lookup_component(registry: Registry, kind: str, name: str, path: str, source: str) -> Any:
    """The registered component ``name`` of ``kind``; a ConfigError naming ``path`` in
    ``source`` (and the known names) if there is none."""
    try:
        return registry.get(kind, name, path)
    except ConfigError as exc:
        raise ConfigError(exc.field, exc.message, source) from None


def _resolve(registry: Registry, kind: str, ref: ComponentRef, path: str, source: str) -> Resolved:
    info = lookup_component(registry, kind, ref.name, f"{path}.name", source)
    _refuse_booleans(info.cls.Params, ref.params, path, source)
    try:
        validated = info.cls.Params.model_validate(ref.params)
    except ValidationError as exc:
        raise config_error(exc, path, source) from None
    config = {"name": ref.name, **validated.model_dump(mode="json")}
    return Resolved(info.cls, validated, config, info.plugin.distribution, info.plugin.version)


def resolve_suite(raw: Any, registry: Registry, source: str = "<suite>") -> Suite:
    """Validate raw suite data against the schema and the plugins; raise ConfigError if bad."""
    if not isinstance(raw, dict):
        raise ConfigError("", "a suite must be a YAML mapping", source)
    _refuse_booleans(SuiteConfig, raw, "", source)
    try:
        config = SuiteConfig.model_validate(raw)
    except ValidationError as exc:
        raise config_error(exc, "", source) from None
    ds = config.dataset
    dataset = _resolve(registry, "dataset", ds, "dataset", source)
    variants: list[Variant] = []
    families: list[tuple[str, str]] = []
    written: list[dict[str, Any]] = []
    for i, v in enumerate(config.variants):
        if v.sweep is None:
            variants.append(_resolve_variant(registry, v, ds, f"variants[{i}]", source))
            written.append(variants[-1].config)
            continue
        points, reference, base = _resolve_sweep(registry, v, ds, f"variants[{i}]", source)
        variants += points
        families.append((v.name, reference))
        written.append({**base, "sweep": v.sweep})
    names = [v.name for v in variants]
    clashes = sorted({n for n in names if names.count(n) > 1})
    if clashes:
        raise ConfigError(
            "variants",
            f"duplicate variant names once sweeps are expanded: {', '.join(clashes)}",
            source,
        )
    warnings = []
    if plugin_call(
        lambda: CheckedDataset(dataset, source).pretrain_sees_test, "dataset", dataset, source
    ):
        warnings.append(
            f"{source}: dataset: pretraining (and the input normalisation) sees the test "
            "images: every result is optimistic, and marked `pretrain_sees_test` in the "
            "leaderboard"
        )
    suite = Suite(
        config=config,
        dataset=dataset,
        variants=tuple(variants),
        source=source,
        evaluators=_resolve_evaluators(registry, config.eval, source),
        loggers=_resolve_loggers(registry, config.loggers, source),
        warnings=tuple(warnings),
        families=tuple(families),
        written=tuple(written),
    )
    known_names = [*(v.name for v in variants), *(family for family, _ in families)]
    if config.reference is not None and config.reference not in known_names:
        raise ConfigError(
            "reference",
            f"no variant named {config.reference!r}; variants: {', '.join(known_names)}",
            source,
        )
    known = suite.metrics()
    if config.primary_metric not in known:
        raise ConfigError(
            "primary_metric",
            f"unknown metric {config.primary_metric!r}; the enabled evaluators report: "
            f"{', '.join(sorted(known))}",
            source,
        )
    if suite.adaptive and not known[config.primary_metric].compare:
        raise ConfigError(
            "seeds.until",
            f"adds seeds until the primary metric's comparison is conclusive, and "
            f"{config.primary_metric!r} is not compared (a timing or a size): choose another "
            "primary_metric",
            source,
        )
    return suite


def _resolve_variant(
    registry: Registry, v: VariantConfig, ds: DatasetRef, path: str, source: str
) -> Variant:
    """One variant checked against its plugins: components, the model's shapes on ``meta``
    (no memory), its masking on that grid, its loss terms, and ``init_from``."""
    encoder = _resolve(registry, "encoder", v.encoder, f"{path}.encoder", source)
    masking = _resolve(registry, "masking", v.masking, f"{path}.masking", source)
    losses = tuple(
        ResolvedLoss(_resolve(registry, "loss", t, f"{path}.loss[{j}]", source), t.weight)
        for j, t in enumerate(v.loss)
    )
    target = (
        None
        if v.target is None
        else _resolve(registry, "target", v.target, f"{path}.target", source)
    )
    variant = Variant(v.name, encoder, masking, losses, target)
    if target is not None:
        plugin_call(partial(target.cls, target.params), f"{path}.target", target, source)
        _check_target_losses(variant, path, source)
    # shapes only (no memory): a huge model is caught by the memory check
    device = torch.device("cpu" if v.encoder.init_from else "meta")
    build_model = partial(replace(variant, target=None).build_model, ds.image_size, ds.channels)
    model = plugin_call(partial(_on, device, build_model), f"{path}.encoder", encoder, source)
    if target is not None:  # the head sized as build_model sizes it; its errors the target's
        size = partial(model.size_head, variant.build_target())
        plugin_call(partial(_on, device, size), f"{path}.target", target, source)
    plugin_call(partial(_check_masking, variant, model.grid), f"{path}.masking", masking, source)
    for j, term in enumerate(losses):
        part = term.component
        plugin_call(partial(part.cls, part.params), f"{path}.loss[{j}]", part, source)
    try:
        variant.decoder_loss()
    except ValueError as exc:  # the terms disagree on what the model predicts
        raise ConfigError(f"{path}.loss", str(exc), source) from None
    if v.encoder.init_from:
        checkpoint = Path(v.encoder.init_from)
        try:
            load_weights(model, checkpoint)  # fails here, before anything runs
            digest = weights_digest(checkpoint)
        except UserError as exc:
            raise ConfigError(f"{path}.encoder.init_from", str(exc), source) from None
        variant = replace(variant, init_from=v.encoder.init_from, init_digest=digest)
    return variant


def _check_target_losses(variant: Variant, path: str, source: str) -> None:
    """Refuse loss terms that cannot train a variant's target: one that normalises pixel
    patches itself (``mse(norm_pix)``: use the ``norm_pix`` target or the loss's option,
    not both), or one that reads predictions as an image when they are not pixels."""
    target = variant.build_target()
    assert target is not None
    for j, (loss, _) in enumerate(variant.build_losses()):
        space = loss.prediction_space
        if space not in (None, "pixels"):
            raise ConfigError(
                f"{path}.loss[{j}]",
                f"{loss.summary()} trains predictions as {space}, and the target "
                f"{target.name!r} says what they are: drop the loss's option (e.g. norm_pix) "
                "or the target",
                source,
            )
        if loss.reads_images and target.prediction_space != "pixels":
            raise ConfigError(
                f"{path}.loss[{j}]",
                f"{loss.summary()} reads predictions as an image, and the {target.name!r} "
                f"target's predictions are {target.prediction_space}, not the input's pixels",
                source,
            )


def _resolve_sweep(
    registry: Registry, v: VariantConfig, ds: DatasetRef, path: str, source: str
) -> tuple[list[Variant], str, dict[str, Any]]:
    """A swept variant's points, each resolved as a variant of its own, the name of its
    point at the unswept values (the first point if no point has them: what comparisons
    default to), and its unswept config, resolved. A swept path must name a field the
    unswept variant has (defaults count)."""
    unswept = v.model_copy(update={"sweep": None})
    base = _resolve_variant(registry, unswept, ds, path, source).config
    points = expand(v.name, v.sweep or {})
    for swept in points[0].values:
        try:
            get_path(base, swept)
        except PathError as exc:
            where = "" if exc.path == swept else f"{exc.path}: "
            problem = f"{swept}: {where}{exc.problem} ({_fields(base, exc.path)})"
            raise ConfigError(f"{path}.sweep", problem, source) from None
    raw = v.model_dump(mode="json", exclude={"sweep"})
    variants, reference = [], None
    for point in points:
        if len(point.name) > MAX_NAME:
            problem = (
                f"the point name {point.name!r} is longer than {MAX_NAME} characters: "
                "shorten the variant's name"
            )
            raise ConfigError(f"{path}.sweep", problem, source)
        data = copy.deepcopy(raw)
        data["name"] = point.name
        for swept, value in point.values.items():
            set_path(data, swept, value)
        try:
            _refuse_booleans(VariantConfig, data, path, source)
            try:
                config = VariantConfig.model_validate(data)
            except ValidationError as exc:
                raise config_error(exc, path, source) from None
            variant = _resolve_variant(registry, config, ds, path, source)
        except ConfigError as exc:
            message = f"{exc.message} (at the sweep point {point.name})"
            raise ConfigError(exc.field, message, source) from None
        variant = replace(variant, family=v.name, sweep=tuple(point.values.items()))
        resolved = variant.config
        if reference is None and all(
            json.dumps(get_path(resolved, p)) == json.dumps(get_path(base, p)) for p in point.values
        ):
            reference = point.name
        variants.append(variant)
    return variants, reference or points[0].name, base


def _fields(config: dict[str, Any], path: str) -> str:
    """What the part of a resolved variant above ``path``'s failing step holds."""
    parent = path.rpartition(".")[0]
    try:
        node = get_path(config, parent) if parent else config
    except PathError:
        node = None
    if isinstance(node, dict):
        fields = ", ".join(k for k in node if k != "name") or "no fields"
        return f"{parent or 'the variant'} has: {fields}"
    return f"{parent} has no fields"


def _resolve_loggers(
    registry: Registry, refs: list[ComponentRef], source: str
) -> tuple[Resolved, ...]:
    """The suite's loggers, each built once so that a missing package fails validation."""
    out = []
    for i, ref in enumerate(refs):
        resolved = _resolve(registry, "logger", ref, f"loggers[{i}]", source)
        plugin_call(partial(resolved.cls, resolved.params), f"loggers[{i}]", resolved, source)
        out.append(resolved)
    return tuple(out)


def _resolve_evaluators(registry: Registry, cfg: EvalConfig, source: str) -> tuple[Resolved, ...]:
    """The evaluators a suite enables: those it names (unless ``enabled: false``), in its
    order, then those enabled by default that it does not name."""
    named = cfg.evaluators
    out = []
    for name, raw in named.items():
        path = f"eval.{name}"
        lookup_component(registry, "evaluator", name, path, source)  # unknown: lists the known ones
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise ConfigError(path, "must be a mapping of the evaluator's parameters", source)
        enabled = raw.get("enabled", True)
        if not isinstance(enabled, bool):
            raise ConfigError(f"{path}.enabled", f"must be true or false (got {enabled!r})", source)
        if enabled:
            params = {k: v for k, v in raw.items() if k != "enabled"}
            ref = ComponentRef(name=name, **params)
            out.append(_resolve(registry, "evaluator", ref, path, source))
    for name, info in registry.components["evaluator"].items():
        if name not in named and info.cls.enabled_by_default:
            ref = ComponentRef(name=name)
            out.append(_resolve(registry, "evaluator", ref, f"eval.{name}", source))
    for resolved in out:  # each built once, as the suite's metrics are listed
        build = partial(_evaluator_metrics, resolved)
        plugin_call(build, f"eval.{resolved.config['name']}", resolved, source)
    return tuple(out)


def _evaluator_metrics(resolved: Resolved) -> dict[str, Metric]:
    return resolved.cls(resolved.params).metrics()


# --------------------------------------------------------------------------- files
MAX_YAML_VALUES = 100_000  # a suite has a few hundred; a "billion laughs" bomb has 9**9


class SuiteYAMLError(yaml.YAMLError):
    """YAML that parses but is refused: a duplicate key or a recursive alias."""


class YAMLTooLarge(SuiteYAMLError):
    """YAML whose aliases expand it past :data:`MAX_YAML_VALUES` values, or nested too deeply
    to read; the message continues "the YAML ..." or "the value ..."."""


_MERGE_TAG = "tag:yaml.org,2002:merge"


class _SuiteLoader(yaml.SafeLoader):
    """PyYAML's safe loader refusing what a suite never needs and a hostile file uses: a
    duplicate key (the second value would silently win), a recursive alias, and aliases of
    aliases expanding past :data:`MAX_YAML_VALUES` values (found on the composed node graph,
    before anything is built, so a bomb is refused at once)."""

    def compose_document(self) -> yaml.Node | None:
        node = super().compose_document()
        expanded = _expanded_size(node, set(), {}) if node is not None else 0
        if expanded > MAX_YAML_VALUES:
            raise YAMLTooLarge(
                f"expands to more than {MAX_YAML_VALUES:,} values ({expanded:,}) through aliases "
                "of aliases (a 'billion laughs' bomb?); refused"
            )
        return node

    def compose_mapping_node(self, anchor: str | None) -> yaml.MappingNode:
        node = super().compose_mapping_node(anchor)
        first: dict[tuple[str, str], yaml.Node] = {}
        for key, _ in node.value:
            if not isinstance(key, yaml.ScalarNode) or key.tag == _MERGE_TAG:
                continue  # a merge key (<<) may be overridden: that is what it is for
            earlier = first.setdefault((key.tag, key.value), key)
            if earlier is not key:
                mark = key.start_mark
                raise SuiteYAMLError(
                    f"duplicate key {key.value!r} (line {mark.line + 1}, column "
                    f"{mark.column + 1}; first at line {earlier.start_mark.line + 1}): a second "
                    "value would silently replace the first"
                )
        return node


def _expanded_size(node: yaml.Node, path: set[int], sizes: dict[int, int]) -> int:
    """How many values ``node`` holds once every alias is expanded (each shared node counted
    once per use, measured once); a SuiteYAMLError if an alias refers to its own ancestor."""
    key = id(node)
    if key in sizes:
        return sizes[key]
    if key in path:
        mark = node.start_mark
        raise SuiteYAMLError(
            f"an alias refers to itself (line {mark.line + 1}): a recursive structure is refused"
        )
    path.add(key)
    children: list[yaml.Node] = []
    if isinstance(node, yaml.SequenceNode):
        children = node.value
    elif isinstance(node, yaml.MappingNode):
        children = [part for pair in node.value for part in pair]
    sizes[key] = 1 + sum(_expanded_size(child, path, sizes) for child in children)
    path.discard(key)
    return sizes[key]


def parse_yaml(text: str) -> Any:
    """``text`` read as YAML the safe way (plain data only), refusing duplicate keys,
    recursive aliases and alias bombs (a SuiteYAMLError) as well as malformed YAML (a
    yaml.YAMLError)."""
    loader = _SuiteLoader(text)
    try:
        return loader.get_single_data()
    except RecursionError:
        raise YAMLTooLarge("nests too deeply to read; refused") from None
    finally:
        loader.dispose()


def read_suite_file(path: str | Path, what: str = "suite") -> dict[str, Any]:
    """Load a suite (or another ``what``: a YAML mapping) safely; raise UserError for a
    missing file or bad YAML."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(
            f"{path}: not UTF-8 text (byte {exc.start}: {exc.reason}); save the {what} as UTF-8"
        ) from None
    except OSError as exc:
        raise UserError(f"{path}: cannot read the {what} file ({exc.strerror or exc})") from None
    try:
        raw = parse_yaml(text)
    except YAMLTooLarge as exc:
        raise UserError(f"{path}: the YAML {exc}") from None
    except SuiteYAMLError as exc:
        raise UserError(f"{path}: {exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise UserError(f"{path}: malformed YAML{where}: {problem}") from None
    if not isinstance(raw, dict):
        raise ConfigError("", f"the {what} must be a YAML mapping", str(path))
    return raw


def _option_value(option: str, item: str, expected: str) -> tuple[str, Any]:
    """``key`` and the YAML-parsed value of a ``key=value`` command-line ``option``."""
    key, sep, text = item.partition("=")
    if not sep or not key:
        raise UserError(f"{option} {item!r}: expected {expected}")
    if option == "--sweep":
        text = f"[{text}]"  # a,b,c: a list
    try:
        return key, parse_yaml(text)
    except YAMLTooLarge as exc:
        raise UserError(f"{option} {key}: the value {exc}") from None
    except SuiteYAMLError as exc:
        raise UserError(f"{option} {key}: {exc}") from None
    except yaml.YAMLError:
        raise UserError(f"{option} {key}: cannot parse value {text!r}") from None


def apply_overrides(raw: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply ``key.path=value`` overrides (value parsed as YAML) to raw suite data.

    A path step into a list is an index (``variants.0``) or, for lists of named mappings,
    a name (``variants.vit-mae.encoder.dim=64``).
    """
    data = copy.deepcopy(raw)  # YAML may hold dates: the schema names such a field
    for item in overrides:
        key, value = _option_value("--set", item, "key.path=value")
        try:
            set_path(data, key, value)
        except PathError as exc:
            raise UserError(f"--set {exc}") from None
    return data


def apply_sweeps(raw: dict[str, Any], sweeps: Sequence[str]) -> dict[str, Any]:
    """Add ``path=a,b,c`` sweeps (as Hydra's ``-m key=a,b,c``; values parsed as YAML) to
    every variant of raw suite data, or ``variants.NAME.path=a,b,c`` to one."""
    data = copy.deepcopy(raw)
    variants = data.get("variants")
    if not isinstance(variants, list):
        raise UserError("--sweep: the suite has no list of variants")
    for item in sweeps:
        key, values = _option_value("--sweep", item, "field.path=a,b,c")
        targets = [v for v in variants if isinstance(v, dict)]
        path = key
        if key.startswith("variants."):
            _, name, path = [*key.split(".", 2), "", ""][:3]
            try:
                targets = [variants[list_index(variants, name, f"variants.{name}")]]
            except PathError as exc:
                raise UserError(f"--sweep {exc}") from None
        for variant in targets:
            sweep = variant.setdefault("sweep", {})
            if not isinstance(sweep, dict):
                raise UserError(f"--sweep {key}: the variant's sweep is not a mapping")
            sweep[path] = values
    return data


def load_suite(
    path: str | Path,
    registry: Registry,
    overrides: Sequence[str] = (),
    loggers: Sequence[str] = (),
    sweeps: Sequence[str] = (),
) -> Suite:
    """Read, override, sweep and resolve a suite file; ``loggers`` are added to its own."""
    raw = apply_sweeps(apply_overrides(read_suite_file(path), overrides), sweeps)
    if loggers:
        listed = raw.get("loggers") or []
        raw["loggers"] = [*listed, *({"name": name} for name in loggers)]
    return resolve_suite(raw, registry, source=str(path))
