"""Plugin discovery: load every ``mae_bench`` entry point and collect its components.

Each entry point is loaded in its own ``try``: a plugin that fails to import, implements an
unknown hook, raises in a hook or registers a name already taken is reported (see
``mae-bench plugins``) and the others keep working. Set ``MAE_BENCH_PLUGINS`` to a
comma-separated list of entry-point or distribution names to load only those (empty: none).
"""

from __future__ import annotations

import inspect
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import cache
from importlib.metadata import EntryPoint, entry_points
from types import ModuleType, NoneType, UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import pluggy
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from mae_bench import hookspecs
from mae_bench.contract import Component, Params
from mae_bench.errors import ConfigError

ENV_VAR = "MAE_BENCH_PLUGINS"
BUILTIN_DISTRIBUTION = "mae-bench"
_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]*$")


@dataclass(frozen=True)
class Kind:
    """One kind of component: the hook that registers it, its plural (``mae-bench plugins``),
    the name of its base class, and the suite keys the core reads beside its own parameters
    (which its ``Params`` may therefore not use)."""

    hook: str
    plural: str
    base: str
    reserved: frozenset[str] = frozenset()


KINDS: dict[str, Kind] = {
    "encoder": Kind("register_encoders", "encoders", "MaskedAutoencoder",
                    frozenset({"name", "init_from"})),
    "masking": Kind("register_masking", "masking", "MaskingStrategy", frozenset({"name"})),
    "loss": Kind("register_losses", "losses", "Loss", frozenset({"name", "weight"})),
    "target": Kind("register_targets", "targets", "Target", frozenset({"name"})),
    "dataset": Kind("register_datasets", "datasets", "Dataset",
                    frozenset({"name", "image_size", "channels"})),
    "evaluator": Kind("register_evaluators", "evaluators", "Evaluator", frozenset({"enabled"})),
    "logger": Kind("register_loggers", "loggers", "Logger", frozenset({"name"})),
    "launcher": Kind("register_launchers", "launchers", "Launcher"),
}  # fmt: skip


def describe_params(params: type[Params]) -> dict[str, dict[str, Any]]:
    """Each parameter of a component: its type as a person writes it (:func:`type_text`),
    its default, whether it is required, and its description."""
    out = {}
    for name, field_info in params.model_fields.items():
        required = field_info.is_required()
        default = None if required else field_info.get_default(call_default_factory=True)
        if isinstance(default, BaseModel):  # nested settings: as they are written in a suite
            default = default.model_dump(mode="json")
        out[name] = {
            "type": type_text(field_info.annotation, field_info.metadata),
            "default": "required" if required else default,
            "required": required,
            "description": field_info.description,
        }
    return out


def type_text(annotation: Any, constraints: Iterable[Any] = ()) -> str:
    """A parameter's type as a person writes it, not as pydantic or ``typing`` repr it:
    ``int | None``, ``'cls' | 'mean'``, ``float in (0, 1]``, ``int > 0``, ``dict[str, Any]``
    (``constraints``: pydantic's or annotated-types' bounds on it)."""
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Annotated:
        return type_text(args[0], [*args[1:], *constraints])
    if origin in (Union, UnionType):
        return " | ".join(type_text(a, () if a is NoneType else constraints) for a in args)
    if origin is Literal:
        return " | ".join(repr(a) for a in args)
    if annotation is NoneType or annotation is None:
        return "None"
    if annotation is Any:
        text = "Any"
    elif origin is not None:
        name = getattr(origin, "__name__", str(origin).replace("typing.", ""))
        text = f"{name}[{', '.join(type_text(a) for a in args)}]" if args else name
    elif isinstance(annotation, type):
        text = annotation.__name__
    else:
        text = str(annotation).replace("typing.", "")
    return text + _bounds_text(constraints)


def _bounds_text(constraints: Iterable[Any]) -> str:
    """`` in (0, 1]``, `` > 0``, `` <= 9`` or ``""``: the numeric bounds among
    ``constraints`` (annotated-types ``Gt``/``Ge``/``Lt``/``Le``, possibly inside a
    pydantic ``FieldInfo``)."""
    low: tuple[Any, bool] | None = None  # (value, inclusive)
    high: tuple[Any, bool] | None = None
    for item in constraints:
        if isinstance(item, FieldInfo):
            inner = _bounds_text(item.metadata)
            if inner:
                return inner
            continue
        for attribute, inclusive, is_low in (
            ("gt", False, True), ("ge", True, True), ("lt", False, False), ("le", True, False),
        ):  # fmt: skip
            value = getattr(item, attribute, None)
            if value is not None:
                if is_low:
                    low = (value, inclusive)
                else:
                    high = (value, inclusive)
    if low and high:
        return (
            f" in {'[' if low[1] else '('}{_number(low[0])}, "
            f"{_number(high[0])}{']' if high[1] else ')'}"
        )
    if low:
        return f" {'>=' if low[1] else '>'} {_number(low[0])}"
    if high:
        return f" {'<=' if high[1] else '<'} {_number(high[0])}"
    return ""


def _number(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def first_paragraph(doc: str | None) -> str:
    """The first paragraph of a docstring as one line (its lines joined, whitespace
    collapsed): what a listing shows, never a line cut mid-sentence."""
    if not doc:
        return ""
    paragraph = inspect.cleandoc(doc).split("\n\n", 1)[0]
    return " ".join(paragraph.split())


@dataclass(frozen=True)
class ComponentInfo:
    """A registered component: its kind, suite name, class and the plugin providing it."""

    kind: str
    name: str
    cls: type
    plugin: PluginInfo

    @property
    def description(self) -> str:
        """The first paragraph of the class docstring, as one line."""
        return first_paragraph(self.cls.__doc__)


@dataclass(eq=False)
class PluginInfo:
    """One loaded (or failed) plugin: an entry point of a distribution."""

    name: str
    module: str
    distribution: str
    version: str
    components: list[ComponentInfo] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def builtin(self) -> bool:
        """True for the plugins shipped with mae-bench itself."""
        return self.distribution == BUILTIN_DISTRIBUTION


@dataclass
class Registry:
    """Every component available, by kind and name, and every plugin seen."""

    plugins: list[PluginInfo] = field(default_factory=list)
    components: dict[str, dict[str, ComponentInfo]] = field(
        default_factory=lambda: {kind: {} for kind in KINDS}
    )

    def names(self, kind: str) -> list[str]:
        """Sorted names of the components of ``kind``."""
        return sorted(self.components[kind])

    def get(self, kind: str, name: str, field_path: str) -> ComponentInfo:
        """Look up a component, or raise a ConfigError naming ``field_path`` and the known names."""
        try:
            return self.components[kind][name]
        except KeyError:
            known = ", ".join(self.names(kind)) or "none (no plugin loaded)"
            broken = [p.distribution for p in self.plugins if p.errors]
            hint = (
                f" (plugins with errors, one may provide it: {', '.join(sorted(set(broken)))};"
                " see `mae-bench plugins`)"
                if broken
                else ""
            )
            raise ConfigError(
                field_path, f"unknown {kind} {name!r}; known: {known}{hint}"
            ) from None

    def problems(self) -> list[str]:
        """Every plugin's load or registration error, one line each (for warnings)."""
        return [
            f"plugin {p.distribution} ({p.name}): {error}"
            for p in self.plugins
            for error in p.errors
        ]


def _check_component(kind: str, cls: object) -> str | None:
    """Why ``cls`` cannot be registered as a ``kind``, or None if it can."""
    base = KINDS[kind].base
    if not (
        isinstance(cls, type)
        and issubclass(cls, Component)
        and getattr(cls, "kind", None) == kind
        and any(c.__name__ == base and c.__module__.startswith("mae_bench.") for c in cls.__mro__)
    ):
        return f"{cls!r} is not a subclass of mae_bench.{base}"
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not _NAME.match(name):
        return f"{cls.__name__}.name must be a lowercase name like 'my-loss', got {name!r}"
    params = getattr(cls, "Params", None)
    if not (isinstance(params, type) and issubclass(params, Params)):
        return (
            f"{cls.__name__}.Params must subclass mae_bench.Params (which refuses unknown "
            "keys, so a misspelt parameter is an error, not silently dropped)"
        )
    clash = sorted(KINDS[kind].reserved & set(params.model_fields))
    if clash:
        return f"{cls.__name__}.Params uses reserved key(s) {', '.join(clash)}"
    return None


def build_registry(candidates: Iterable[tuple[PluginInfo, Callable[[], object]]]) -> Registry:
    """Register each candidate plugin (info, loader) in isolation and collect its components."""
    registry = Registry()
    pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
    pm.add_hookspecs(hookspecs)
    by_plugin_name: dict[str, PluginInfo] = {}
    for info, load in candidates:
        registry.plugins.append(info)
        try:
            pm.register(load(), name=f"{info.distribution}:{info.name}")
        except Exception as exc:  # one broken plugin must not take down the others
            info.errors.append(f"failed to load: {type(exc).__name__}: {exc}")
            continue
        by_plugin_name[f"{info.distribution}:{info.name}"] = info
    while True:
        try:
            pm.check_pending()
            break
        except pluggy.PluginValidationError as exc:
            name = pm.get_name(exc.plugin)
            by_plugin_name.pop(name).errors.append(f"invalid hook: {exc}")
            pm.unregister(exc.plugin)
    order = list(by_plugin_name)
    for kind, spec in KINDS.items():
        hook_name = spec.hook
        impls = getattr(pm.hook, hook_name).get_hookimpls()
        for impl in sorted(impls, key=lambda impl: order.index(impl.plugin_name)):
            info = by_plugin_name[impl.plugin_name]
            try:
                impl.function(register=_registrar(registry, kind, info))
            except Exception as exc:
                info.errors.append(f"{hook_name} raised {type(exc).__name__}: {exc}")
    return registry


def _registrar(registry: Registry, kind: str, info: PluginInfo) -> Callable[[type], None]:
    def register(cls: type) -> None:
        problem = _check_component(kind, cls)
        if problem:
            info.errors.append(f"{KINDS[kind].hook}: {problem}")
            return
        taken = registry.components[kind].get(cls.name)
        if taken is not None:
            info.errors.append(
                f"{kind} {cls.name!r} is already registered by {taken.plugin.distribution} "
                f"({taken.plugin.module}); ignored"
            )
            return
        component = ComponentInfo(kind=kind, name=cls.name, cls=cls, plugin=info)
        registry.components[kind][cls.name] = component
        info.components.append(component)

    return register


def _allowed_plugins() -> set[str] | None:
    raw = os.environ.get(ENV_VAR)
    if raw is None:
        return None
    return {part.strip() for part in raw.split(",") if part.strip()}


def _entry_point_candidates() -> list[tuple[PluginInfo, Callable[[], object]]]:
    allowed = _allowed_plugins()
    seen: set[tuple[str, str]] = set()
    candidates = []
    for ep in entry_points(group=hookspecs.ENTRY_POINT_GROUP):
        dist = ep.dist.name if ep.dist else "unknown"
        if (dist, ep.name) in seen:  # the same distribution found twice on sys.path
            continue
        seen.add((dist, ep.name))
        if allowed is not None and ep.name not in allowed and dist not in allowed:
            continue
        version = ep.dist.version if ep.dist else "unknown"
        info = PluginInfo(name=ep.name, module=ep.value, distribution=dist, version=version)
        candidates.append((info, _loader(ep)))
    # Built-ins first, so a third-party plugin can never shadow a built-in name.
    candidates.sort(key=lambda c: (not c[0].builtin, c[0].distribution, c[0].name))
    return candidates


def _loader(ep: EntryPoint) -> Callable[[], ModuleType]:
    return lambda: ep.load()


@cache
def load_registry() -> Registry:
    """The registry of every installed plugin (loaded once per process)."""
    return build_registry(_entry_point_candidates())
