"""The layout the code promises: read from its import statements, not from running it."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import mae_bench

CORE = Path(mae_bench.__file__).resolve().parent
# the bottom of the stack: what every plugin imports; it may lean only on these
BOTTOM = {"contract": {"layers", "errors"}, "layers": set(), "errors": set()}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def core_imports(path: Path, *, type_checking: bool) -> list[tuple[str, bool]]:
    """The mae_bench modules ``path`` imports, each with whether the import sits inside a
    function (a lazy import); ``type_checking``: include ``if TYPE_CHECKING:`` blocks."""
    found: list[tuple[str, bool]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child) and not type_checking:
                for orelse in child.orelse:
                    visit(orelse, in_function)
                continue
            if isinstance(child, ast.Import):
                names = [a.name for a in child.names]
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                names = (
                    [f"mae_bench.{a.name}" for a in child.names]
                    if child.module == "mae_bench"
                    else [child.module]
                )
            else:
                names = []
            for name in names:
                parts = name.split(".")
                core = parts[0] == "mae_bench" and len(parts) > 1
                if core and (CORE / f"{parts[1]}.py").exists():
                    found.append((parts[1], in_function))
            inner = in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef)
            visit(child, inner)

    visit(ast.parse(path.read_text(encoding="utf-8")), False)
    return found


def test_contract_and_layers_import_nothing_above_them():
    for module, allowed in BOTTOM.items():
        imported = {name for name, _ in core_imports(CORE / f"{module}.py", type_checking=True)}
        assert imported <= allowed, f"{module}.py imports {sorted(imported - allowed)}"


def test_core_imports_form_no_circle_not_even_through_lazy_imports():
    """Every import inside the core, module-level or inside a function, points down: a lazy
    import that dodges a circle would close one here."""
    graph = {
        path.stem: {name for name, _ in core_imports(path, type_checking=False)} - {path.stem}
        for path in CORE.glob("*.py")
    }
    state: dict[str, str] = {}

    def walk(node: str, trail: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            assert state.get(nxt) != "open", "import circle: " + " -> ".join([*trail, nxt])
            if nxt not in state:
                walk(nxt, [*trail, nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            walk(node, [node])


def test_only_the_command_line_imports_lazily():
    """Commands import what they need when they run (so --help stays fast); no other core
    module defers an import of another."""
    lazy = {
        path.stem: sorted({n for n, inner in core_imports(path, type_checking=False) if inner})
        for path in CORE.glob("*.py")
        if path.stem != "cli"
    }
    assert {module: names for module, names in lazy.items() if names} == {}


def test_help_and_status_do_not_import_torch(tiny_run):
    """The commands that only read (help, status of a finished run) answer without loading
    torch, timm or pandas, and still answer in full."""
    code = (
        "import sys\n"
        "from click.testing import CliRunner\n"
        "from mae_bench.cli import cli\n"
        "for args in (['--help'], ['run', '--help'], ['plugins', '--help'],"
        f" ['status', {str(tiny_run.root)!r}]):\n"
        "    result = CliRunner().invoke(cli, args)\n"
        "    assert result.exit_code == 0, (args, result.output)\n"
        "    print(result.stdout.splitlines()[0 if args[0] != 'status' else -1])\n"
        "print(sorted(m for m in ('torch', 'timm', 'pandas') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    lines = out.stdout.strip().splitlines()
    assert lines[-1] == "[]", out.stdout + out.stderr
    assert lines[0].startswith("Usage: ") and lines[2].startswith("Usage: ")
    assert lines[3].startswith("done ") and len(tiny_run.cells()) == 4
