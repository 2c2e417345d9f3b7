"""What a result's key covers of the plugins (mae_bench/plan.py, mae_bench/suite.py): each
component by what determines its behaviour, not whole packages by their version. A local or
editable install is keyed by the source of the component's module (its version metadata
stays as installed until a reinstall); a release installed into site-packages by its
distribution's version; either by the component's own declared ``version``."""

from __future__ import annotations

import hashlib
import sys
import textwrap
from pathlib import Path

import pytest

from mae_bench.plan import suite_cells
from mae_bench.suite import resolve_suite
from tests.conftest import ROOT, tiny_suite_data

PACKAGE = "keyplug"

MODULES = {
    "__init__.py": """
        from mae_bench import hookimpl
        from keyplug.probe import CountProbe
        from keyplug.sharp import SharpLoss
        from keyplug.smooth import SmoothLoss

        @hookimpl
        def register_losses(register):
            register(SmoothLoss)
            register(SharpLoss)

        @hookimpl
        def register_evaluators(register):
            register(CountProbe)
    """,
    "smooth.py": """
        from mae_bench import Loss

        SCALE = 1.0

        class SmoothLoss(Loss):
            name = "smooth"
            version = "1"

            def __call__(self, inputs):
                return SCALE * (inputs.pred - inputs.target).abs().mean()
    """,
    "sharp.py": """
        from mae_bench import Loss

        class SharpLoss(Loss):
            name = "sharp"

            def __call__(self, inputs):
                return ((inputs.pred - inputs.target) ** 4).mean()
    """,
    "probe.py": """
        from mae_bench import EvalResult, Evaluator, Metric

        class CountProbe(Evaluator):
            name = "countprobe"

            def metrics(self):
                return {"count_n": Metric("test images", compare=False)}

            def evaluate(self, ctx):
                return EvalResult({"count_n": float(len(ctx.data.test_labels))})
    """,
}


def _install(folder: Path, version: str = "1.0") -> Path:
    """The package ``keyplug`` (losses ``smooth`` and ``sharp`` in modules of their own, the
    evaluator ``countprobe``) with its dist-info in ``folder``; its folder."""
    package = folder / PACKAGE
    package.mkdir(parents=True, exist_ok=True)
    for name, source in MODULES.items():
        (package / name).write_text(textwrap.dedent(source), encoding="utf-8")
    info = folder / f"{PACKAGE}-1.0.dist-info"
    info.mkdir(exist_ok=True)
    _set_version(folder, version)
    (info / "entry_points.txt").write_text(f"[mae_bench]\n{PACKAGE} = {PACKAGE}\n")
    return package


def _set_version(folder: Path, version: str) -> None:
    metadata = folder / f"{PACKAGE}-1.0.dist-info" / "METADATA"
    metadata.write_text(f"Metadata-Version: 2.1\nName: {PACKAGE}\nVersion: {version}\n")


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text(encoding="utf-8")
    assert old in text
    path.write_text(text.replace(old, new), encoding="utf-8")


@pytest.fixture
def plan(fresh_registry, monkeypatch):
    """``plan(folder)``: the tiny suite's cells with ``keyplug`` (installed in ``folder``)
    imported afresh, as a new ``mae-bench run`` would: variant ``mine`` uses ``smooth``,
    ``sibling`` uses ``sharp``, ``builtin`` only ``mse``; ``countprobe`` runs on every cell.
    Returns ``{variant: (cell_id, {evaluator: eval_id})}``."""
    monkeypatch.setattr(sys, "dont_write_bytecode", True)  # an edit within a second is seen
    monkeypatch.delenv("MAE_BENCH_PLUGINS", raising=False)
    added: list[str] = []

    def cells(folder: Path) -> dict[str, tuple[str, dict[str, str]]]:
        if str(folder) not in added:
            monkeypatch.syspath_prepend(str(folder))
            added.append(str(folder))
        for name in [m for m in sys.modules if m == PACKAGE or m.startswith(f"{PACKAGE}.")]:
            monkeypatch.delitem(sys.modules, name)
        fresh_registry.cache_clear()
        data = tiny_suite_data()
        mlp = data["variants"][0]["encoder"]
        data["variants"] = [
            {"name": "mine", "encoder": mlp, "loss": [{"name": "mse"}, {"name": "smooth"}]},
            {"name": "sibling", "encoder": mlp, "loss": [{"name": "sharp"}]},
            {"name": "builtin", "encoder": mlp},
        ]
        data["eval"]["countprobe"] = {}
        suite = resolve_suite(data, fresh_registry())
        return {
            c.variant.name: (c.cell_id, {e.name: e.eval_id for e in c.evaluations})
            for c in suite_cells(suite)
        }

    return cells


def test_an_edited_local_plugin_recomputes_only_what_uses_the_edited_component(tmp_path, plan):
    """``pip install -e`` (or a package on the path): its version metadata never changes,
    its source does. Editing ``smooth`` recomputes the cells using it; the cells using its
    untouched sibling ``sharp`` (same package) and the package's evaluator on other cells
    are reused."""
    package = _install(tmp_path / "src")
    before = plan(tmp_path / "src")
    again = plan(tmp_path / "src")
    assert again == before  # nothing edited: every key is reused
    _edit(package / "smooth.py", "SCALE = 1.0", "SCALE = 2.0")
    edited = plan(tmp_path / "src")
    assert edited["mine"][0] != before["mine"][0]
    assert edited["sibling"] == before["sibling"] and edited["builtin"] == before["builtin"]
    # the evaluator edited: its evaluations re-run on every cell, from the stored weights
    _edit(package / "probe.py", "float(len", "1.0 * float(len")
    probe_edited = plan(tmp_path / "src")
    for variant in ("sibling", "builtin"):
        assert probe_edited[variant][0] == edited[variant][0]
        assert probe_edited[variant][1]["countprobe"] != edited[variant][1]["countprobe"]
        assert probe_edited[variant][1]["linear_probe"] == edited[variant][1]["linear_probe"]


def test_a_local_plugin_is_keyed_by_its_source_not_its_stale_version(tmp_path, plan):
    """The version an editable install recorded says nothing about its source now."""
    folder = tmp_path / "src"
    _install(folder)
    before = plan(folder)
    _set_version(folder, "9.9")
    assert plan(folder) == before


def test_a_released_plugin_is_keyed_by_its_version_and_its_components_own(tmp_path, plan):
    """Installed into site-packages (from a wheel): the distribution's version keys it, and a
    component's own ``version`` keys that component alone."""
    site = tmp_path / "lib" / "site-packages"
    package = _install(site)
    before = plan(site)
    _set_version(site, "1.1")
    upgraded = plan(site)
    assert upgraded["mine"][0] != before["mine"][0]
    assert upgraded["sibling"][0] != before["sibling"][0]
    assert upgraded["builtin"][0] == before["builtin"][0]
    _edit(package / "smooth.py", 'version = "1"', 'version = "2"')
    declared = plan(site)
    assert declared["mine"][0] != upgraded["mine"][0]
    assert declared["sibling"] == upgraded["sibling"]


def test_builtins_of_a_development_install_are_keyed_by_their_modules(registry):
    """mae-bench installed editable (as here): a built-in's cells follow its own module."""
    cells = suite_cells(resolve_suite(tiny_suite_data(), registry))
    components = cells[1].config["components"]
    digest = hashlib.sha256((ROOT / "plugins" / "vit.py").read_bytes()).hexdigest()
    assert components["encoder"]["source_sha256"] == {"mae_bench_plugins.vit": digest}
    assert components["encoder"]["plugin"] == "mae-bench"
    assert [t["plugin"] for t in components["loss"]] == ["mae-bench"] * 3
    probe = cells[1].evaluations[0]
    assert set(probe.config["components"]["evaluator"]["source_sha256"]) == {
        probe.evaluator.cls.__module__
    }
