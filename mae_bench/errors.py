"""Errors the CLI turns into one clear message and exit code 2."""

from __future__ import annotations

import os


class UserError(Exception):
    """Bad input from the user: a malformed suite, an unknown plugin, a missing file."""


class ConfigError(UserError):
    """An invalid suite field; ``field`` is its path, e.g. ``variants[1].masking.ratio``."""

    def __init__(self, field: str, message: str, source: str | None = None) -> None:
        self.field = field
        self.message = message
        self.source = source
        where = f"{source}: " if source else ""
        super().__init__(f"{where}{field}: {message}" if field else f"{where}{message}")


class MaeBenchWarning(UserWarning):
    """Something the user should know that does not stop the run (a damaged file skipped or
    rebuilt, a leaky split); the CLI prints it as one ``warning: ...`` line."""


def exception_line(exc: BaseException) -> str:
    """One line naming an exception: its type and the first line of its message."""
    message = str(exc).strip()
    return f"{type(exc).__name__}: {message.splitlines()[0]}" if message else type(exc).__name__


def env_seconds(name: str, default: float) -> float:
    """A duration in seconds from the environment variable ``name`` (``default`` when unset);
    UserError naming the variable if it is not a positive number."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        seconds = float(raw)
    except ValueError:
        seconds = float("nan")
    if not 0 < seconds < float("inf"):
        raise UserError(f"{name}: expected a number of seconds above 0, got {raw!r}")
    return seconds
