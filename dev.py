#!/usr/bin/env python3
"""The front door, with nothing but Python 3.10+ installed.

    python3 dev.py quick   # create .venv if needed, then run the embedded quick suite
    python3 dev.py test    # create .venv if needed, then ruff and the test suite

The first call creates ``.venv`` (the pinned torch first, then mae-bench with its test
extras); later calls reuse it, and reinstall only when pyproject.toml or the torch pin
changes. Arguments after the command go to ``mae-bench run`` (quick) or pytest (test).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

TORCH = ["torch==2.14.1", "torchvision==0.29.1"]
ROOT = Path(__file__).resolve().parent
VENV = Path(os.environ.get("MAE_BENCH_VENV", ROOT / ".venv"))
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
LINTED = ["mae_bench", "plugins", "tests", "examples", "dev.py"]


def _fingerprint() -> str:
    pyproject = (ROOT / "pyproject.toml").read_bytes()
    return hashlib.sha256(pyproject + " ".join(TORCH).encode()).hexdigest()


def ensure_env() -> None:
    """Create or update the virtual environment; a no-op when it is up to date."""
    stamp = VENV / ".mae-bench-installed"
    if stamp.is_file() and stamp.read_text() == _fingerprint():
        return
    if not (BIN / "python").exists():
        print(f"creating {VENV} ...", flush=True)
        venv.create(VENV, with_pip=True)
    pip = [str(BIN / "python"), "-m", "pip", "install", "--quiet"]
    for step in (["--upgrade", "pip"], TORCH, ["-e", f"{ROOT}[test]"]):
        print("pip install", " ".join(step), flush=True)
        subprocess.run([*pip, *step], check=True)
    stamp.write_text(_fingerprint())


def run(*command: str) -> int:
    """Run a command from the environment's bin folder, in the repository root."""
    return subprocess.run([str(BIN / command[0]), *command[1:]], cwd=ROOT).returncode


def main(argv: list[str]) -> int:
    if sys.version_info < (3, 10):  # noqa: UP036 (dev.py runs under any python3)
        print("mae-bench needs Python 3.10 or newer", file=sys.stderr)
        return 2
    commands = {
        "quick": lambda args: run("mae-bench", "run", "suites/quick.yaml", *args),
        "test": lambda args: run("ruff", "check", *LINTED) or run("python", "-m", "pytest", *args),
        "lint": lambda args: run("ruff", "check", *LINTED, *args),
        "env": lambda args: 0,
    }
    if not argv or argv[0] not in commands:
        print(f"usage: python3 dev.py {{{','.join(commands)}}} [args...]", file=sys.stderr)
        return 2
    try:
        ensure_env()
    except subprocess.CalledProcessError as exc:
        print(f"error: setting up {VENV} failed ({exc})", file=sys.stderr)
        return 1
    return commands[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
