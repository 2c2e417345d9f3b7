"""Parameter sweeps, and the dotted paths that name a field of raw suite data.

A variant sweeps fields of its own (``masking.ratio``, ``encoder.decoder_depth``,
``loss.0.weight`` or ``loss.mse.weight``); its points are the product of the listed values,
except the paths grouped under ``zip``, whose lists move together::

    sweep:
      masking.ratio: [0.5, 0.75, 0.9]
      zip: {encoder.decoder_depth: [1, 2, 8], encoder.decoder_dim: [32, 32, 64]}

Each point is a variant of its own, named from its values (``vit-mae-ratio0.5-decoder_depth1
-decoder_dim32``): the name depends on the point alone, so adding values to a sweep keeps
every earlier point's name, cells and results. ``--set`` uses the same paths.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import re
from dataclasses import dataclass
from typing import Any

ZIP = "zip"  # the key of a sweep that groups paths moving together
SWEPT_FIELDS = ("encoder", "masking", "loss", "target")  # what a variant's sweep may reach into
MAX_NAME = 80  # as SafeName allows
_UNSAFE = re.compile(r"[^A-Za-z0-9_.+-]+")


class PathError(ValueError):
    """A dotted path that does not lead to a field: ``path`` is the step that fails."""

    def __init__(self, path: str, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path, self.problem = path, problem


def list_index(items: list[Any], part: str, path: str) -> int:
    """The index ``part`` names in ``items``: a number, or the ``name`` of a mapping."""
    if part.lstrip("-").isdigit():
        index = int(part)
        if not -len(items) <= index < len(items):
            raise PathError(path, f"index out of range (list has {len(items)} items)")
        return index
    for i, item in enumerate(items):
        if isinstance(item, dict) and item.get("name") == part:
            return i
    raise PathError(path, f"no item named {part!r}")


def set_path(data: Any, path: str, value: Any) -> None:
    """Set the field ``path`` of ``data`` (mappings are created on the way; a list step is an
    index or an item's ``name``)."""
    parts = path.split(".")
    node = data
    for depth, part in enumerate(parts):
        last = depth == len(parts) - 1
        here = ".".join(parts[: depth + 1])
        if isinstance(node, dict):
            if last:
                node[part] = value
            else:
                node = node.setdefault(part, {})
        elif isinstance(node, list):
            index = list_index(node, part, here)
            if last:
                node[index] = value
            else:
                node = node[index]
        else:
            raise PathError(path, f"{'.'.join(parts[:depth])} is not a mapping or list")


def get_path(data: Any, path: str) -> Any:
    """The value of the field ``path`` of ``data``; :class:`PathError` if there is none."""
    node = data
    parts = path.split(".")
    for depth, part in enumerate(parts):
        here = ".".join(parts[: depth + 1])
        if isinstance(node, dict):
            if part not in node:
                raise PathError(here, "no such field")
            node = node[part]
        elif isinstance(node, list):
            node = node[list_index(node, part, here)]
        else:
            raise PathError(here, f"{'.'.join(parts[:depth])} has no fields")
    return node


@dataclass(frozen=True)
class SweepPoint:
    """One point of a sweep: its variant's name and the value of each swept path."""

    name: str
    values: dict[str, Any]


def sweep_axes(spec: dict[str, Any]) -> list[dict[str, list[Any]]]:
    """The independent axes of a sweep, in the order written: one path each, or a ``zip``
    group of paths with lists of one length. Raises ValueError naming what is wrong."""
    if not isinstance(spec, dict) or not spec:
        raise ValueError("a sweep is a mapping of field paths to lists of values")
    axes: list[dict[str, list[Any]]] = []
    for key, value in spec.items():
        if key == ZIP:
            groups = value if isinstance(value, list) else [value]
            for group in groups:
                if not isinstance(group, dict) or len(group) < 2:
                    raise ValueError(
                        "zip: a mapping of two or more field paths to lists of one length"
                    )
                lengths = {path: len(_values(path, v)) for path, v in group.items()}
                if len(set(lengths.values())) > 1:
                    shown = ", ".join(f"{p} has {n}" for p, n in lengths.items())
                    raise ValueError(f"zip: its lists must have one length ({shown})")
                axes.append({path: _values(path, v) for path, v in group.items()})
        else:
            axes.append({key: _values(key, value)})
    paths = [path for axis in axes for path in axis]
    for path in paths:
        _check_path(path)
        if paths.count(path) > 1:
            raise ValueError(f"{path} is swept twice")
    for axis in axes:
        points = list(zip(*axis.values(), strict=True))
        if len({_canonical(p) for p in points}) < len(points):
            raise ValueError(f"{', '.join(axis)}: a value is listed twice")
    return axes


def _values(path: str, value: Any) -> list[Any]:
    if not isinstance(value, list) or not value:
        raise ValueError(f"{path}: a non-empty list of values (got {value!r})")
    return value


def _check_path(path: str) -> None:
    head, _, rest = path.partition(".")
    if head not in SWEPT_FIELDS or not rest:
        raise ValueError(
            f"{path}: a sweep names a field inside the variant's "
            f"{' / '.join(SWEPT_FIELDS)} (e.g. masking.ratio, encoder.decoder_depth)"
        )


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def expand(family: str, spec: dict[str, Any]) -> list[SweepPoint]:
    """Every point of ``family``'s sweep ``spec``, in product order (the first axis
    slowest), each named from its values."""
    axes = sweep_axes(spec)
    labels = path_labels([path for axis in axes for path in axis])
    points = []
    for combo in itertools.product(*(list(zip(*a.values(), strict=True)) for a in axes)):
        values = {
            path: value for axis, chosen in zip(axes, combo, strict=True)
            for path, value in zip(axis, chosen, strict=True)
        }  # fmt: skip
        suffix = "-".join(f"{labels[p]}{format_value(v)}" for p, v in values.items())
        points.append(SweepPoint(f"{family}-{suffix}", values))
    return points


def path_labels(paths: list[str]) -> dict[str, str]:
    """How a path shows in a point's name: its last field (``ratio``), or the whole path
    with ``_`` for ``.`` where that is ambiguous or only says ``name``/an index."""
    last = {p: p.rsplit(".", 1)[-1] for p in paths}
    out = {}
    for path, label in last.items():
        vague = label == "name" or label.lstrip("-").isdigit()
        clash = list(last.values()).count(label) > 1
        out[path] = path.replace(".", "_") if vague or clash else label
    return out


def format_value(value: Any) -> str:
    """A value as a point's name shows it: as written (``0.5``, ``8``, ``true``, ``block``),
    file-safe; a mapping or list as a short digest of its JSON."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "none"
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else str(value)
    if isinstance(value, int | str):
        text = _UNSAFE.sub("_", str(value)).strip("_")
        return text or "_"
    return hashlib.sha256(_canonical(value).encode()).hexdigest()[:8]
