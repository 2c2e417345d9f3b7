"""Plugin discovery and isolation, with fake distributions on sys.path."""

import inspect
import json
import textwrap
from pathlib import Path

import pytest

from mae_bench import hookspecs
from mae_bench.plugins import KINDS, PluginInfo, build_registry
from tests.conftest import ROOT, invoke


def test_builtins_registered_through_entry_points(registry):
    assert registry.names("encoder") == ["crossmae", "mlp", "simmim", "timm", "vit"]
    assert registry.names("masking") == ["block", "curriculum", "grid", "random"]
    assert registry.names("loss") == ["l1", "laplacian", "mse", "uniformity"]
    assert registry.names("target") == ["data2vec", "hog", "norm_pix", "pixels"]
    assert {"digits", "synthetic"} <= set(registry.names("dataset"))
    for kind in KINDS:
        for component in registry.components[kind].values():
            assert component.plugin.distribution == "mae-bench"
            assert component.cls.__module__.startswith("mae_bench_plugins.")
            assert component.description


def test_every_hook_is_documented():
    docs = (ROOT / "docs" / "plugins.md").read_text()
    specs = [
        name
        for name, fn in inspect.getmembers(hookspecs, inspect.isfunction)
        if name.startswith("register_")
    ]
    assert sorted(specs) == sorted(k.hook for k in KINDS.values())
    for name in specs:
        assert getattr(hookspecs, name).__doc__, name
        assert f"`{name}(register)`" in docs, name


class _Module:
    """A stand-in plugin module built from hook functions."""

    def __init__(self, **hooks):
        for name, fn in hooks.items():
            setattr(self, name, hookspecs.hookimpl(fn))


def _info(name):
    return PluginInfo(name=name, module=name, distribution=f"dist-{name}", version="1.0")


def test_build_registry_isolates_failures(registry):
    mse = registry.components["loss"]["mse"].cls

    def boom():
        raise ImportError("no module named 'missing_dep'")

    def raising(register):
        raise RuntimeError("bad hook")

    def registers_junk(register):
        register(int)

    def registers_duplicate(register):
        register(mse)

    class WeightedParams(mse.Params):
        weight: float = 1.0

    class Weighted(mse):
        name = "weighted"
        Params = WeightedParams

    def registers_reserved(register):
        register(Weighted)

    class Typo:
        @hookspecs.hookimpl
        def register_encoder(self, register):  # not a hook: caught by check_pending
            pass

    good = _Module(register_losses=lambda register: register(mse))
    reg = build_registry(
        [
            (_info("good"), lambda: good),
            (_info("broken"), boom),
            (_info("raising"), lambda: _Module(register_losses=raising)),
            (_info("junk"), lambda: _Module(register_losses=registers_junk)),
            (_info("dup"), lambda: _Module(register_losses=registers_duplicate)),
            (_info("reserved"), lambda: _Module(register_losses=registers_reserved)),
            (_info("typo"), Typo),
        ]
    )
    errors = {p.name: p.errors for p in reg.plugins}
    assert reg.names("loss") == ["mse"]
    assert reg.components["loss"]["mse"].plugin.name == "good"
    assert errors["good"] == []
    assert "failed to load: ImportError" in errors["broken"][0]
    assert "register_losses raised RuntimeError: bad hook" in errors["raising"][0]
    assert "not a subclass of mae_bench.Loss" in errors["junk"][0]
    assert "'mse' is already registered by dist-good" in errors["dup"][0]
    assert "invalid hook" in errors["typo"][0]
    assert "Params uses reserved key(s) weight" in errors["reserved"][0]


def _fake_distribution(site: Path, name: str, module_source: str) -> None:
    """Install a one-module distribution by hand (dist-info + entry point) into ``site``."""
    module = name.replace("-", "_")
    (site / f"{module}.py").write_text(textwrap.dedent(module_source))
    info = site / f"{module}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[mae_bench]\n{module} = {module}\n")


@pytest.fixture
def fake_site(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    _fake_distribution(site, "broken-plugin", "import this_module_does_not_exist\n")
    _fake_distribution(
        site,
        "dup-plugin",
        """
        from mae_bench import hookimpl
        from mae_bench_plugins.losses import MSELoss

        @hookimpl
        def register_losses(register):
            register(MSELoss)
    """,
    )
    return site


def test_plugins_command_reports_broken_and_duplicate(fake_site, fresh_registry, monkeypatch):
    """The distributions on sys.path of this process, as PYTHONPATH puts them there."""
    monkeypatch.syspath_prepend(str(fake_site))
    monkeypatch.delenv("MAE_BENCH_PLUGINS", raising=False)
    result = invoke("plugins")
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "broken-plugin 1.0" in out and "ModuleNotFoundError" in out
    assert "loss 'mse' is already registered by mae-bench" in out
    assert "encoder   vit" in out  # the built-ins keep working
    data = json.loads(invoke("plugins", "--json").stdout)
    by_dist = {p["distribution"]: p for p in data}
    assert by_dist["broken-plugin"]["errors"]
    assert "mse" in [
        c for p in data if p["distribution"] == "mae-bench" for c in p["components"]["losses"]
    ]


def test_env_var_restricts_loading(fake_site, fresh_registry, monkeypatch):
    monkeypatch.syspath_prepend(str(fake_site))
    monkeypatch.setenv("MAE_BENCH_PLUGINS", "mae-bench")
    out = invoke("plugins").stdout
    assert "broken-plugin" not in out and "dup-plugin" not in out and "encoder   vit" in out
    monkeypatch.setenv("MAE_BENCH_PLUGINS", "losses, dup-plugin")
    fresh_registry.cache_clear()
    names = [(p["distribution"], p["name"]) for p in json.loads(invoke("plugins", "--json").stdout)]
    assert names == [("mae-bench", "losses"), ("dup-plugin", "dup_plugin")]
    monkeypatch.setenv("MAE_BENCH_PLUGINS", "")
    fresh_registry.cache_clear()
    assert invoke("plugins").stdout.strip() == "no plugins loaded"
    result = invoke("validate", str(ROOT / "suites" / "tiny.yaml"))
    assert result.exit_code == 2 and "none (no plugin loaded)" in result.stderr


def test_plugin_problems_are_warned_in_validate_and_run_and_hint_unknown_names(
    fake_site, fresh_registry, monkeypatch
):
    """The fake distributions on sys.path of this process, as PYTHONPATH puts them there."""
    monkeypatch.syspath_prepend(str(fake_site))
    monkeypatch.delenv("MAE_BENCH_PLUGINS", raising=False)
    fresh_registry.cache_clear()
    suite = ROOT / "suites" / "tiny.yaml"
    result = invoke("validate", str(suite))
    assert result.exit_code == 0, result.output
    assert "warning: plugin broken-plugin (broken_plugin): failed to load" in result.stderr
    assert "warning: plugin dup-plugin (dup_plugin): loss 'mse' is already registered" in (
        result.stderr
    )
    missing = invoke("validate", str(suite), "--set", "variants.0.masking=blocky")
    assert missing.exit_code == 2 and "unknown masking 'blocky'" in missing.stderr
    assert "plugins with errors, one may provide it: broken-plugin, dup-plugin" in missing.stderr


def test_params_must_subclass_mae_bench_params(registry):
    from pydantic import BaseModel

    mse = registry.components["loss"]["mse"].cls

    class LooseParams(BaseModel):  # silently drops misspelt keys
        eps: float = 1.0

    class Loose(mse):
        name = "loose"
        Params = LooseParams

    module = _Module(register_losses=lambda register: register(Loose))
    reg = build_registry([(_info("loose"), lambda: module)])
    assert "Params must subclass mae_bench.Params" in reg.plugins[0].errors[0]
    assert reg.names("loss") == []


def test_plugins_command_lists_each_components_parameters():
    out = invoke("plugins").stdout
    assert "schedule: 'linear' | 'cosine' = 'linear'" in out and "k: int > 0 = 20" in out
    data = json.loads(invoke("plugins", "--json").stdout)
    params = {k: v for p in data for k, v in p["params"].items()}
    assert params["masking:curriculum"]["start"] == {
        "type": "float in (0, 1)", "default": 0.5, "required": False, "description": None
    }  # fmt: skip
    assert params["evaluator:knn"]["k"]["default"] == 20


def test_parameter_types_read_as_a_person_writes_them():
    """Not pydantic's reprs (``Optional[Annotated[int, Gt(gt=0)]]``): unions with ``|``,
    literals quoted, constraints as bounds, a required parameter said so."""
    out = invoke("plugins").stdout
    assert "Optional" not in out and "Annotated" not in out and "FieldInfo" not in out
    for line in (
        "steps: int > 0 | None = None",  # finetune: Annotated inside Optional
        "layer_decay: float in (0, 1] = 1.0",  # Annotated[float, Field(gt=0, le=1)]
        "pool: 'cls' | 'mean' = 'mean'",
        "cluster: 'slurm' | 'local' | 'debug' | None = None",  # Literal inside Optional
        "fold: int in [0, 9] | None = None",  # stl10
        "workers: int > 0 = 2  (worker processes)",  # PositiveInt, with its description
        "root: str (required)",  # imagefolder
        "sbatch: dict[str, Any] = {}",
    ):
        assert line in out, line


def test_component_descriptions_are_whole_paragraphs(registry):
    """The first paragraph of the docstring, not its first line cut mid-sentence."""
    inline = registry.components["launcher"]["inline"]
    first_paragraph = inline.cls.__doc__.split("\n\n")[0]
    assert "\n" in first_paragraph.strip()  # it spans lines: the old cut lost the rest
    assert inline.description == " ".join(first_paragraph.split())
    assert inline.description.endswith(".")
    out = invoke("plugins").stdout
    block = out.split("launcher  inline")[1].split("launcher  local")[0]
    assert " ".join(block.split()) == inline.description  # wrapped, nothing lost
    for kind in registry.components.values():
        for component in kind.values():
            assert component.description.rstrip(")").endswith((".", "!", "?")), component.name


def test_nested_settings_are_described_as_plain_data():
    """A parameter whose default is itself a settings model: plain data, as a suite writes
    it, so ``plugins --json`` can print it."""
    from pydantic import BaseModel

    from mae_bench import Params
    from mae_bench.plugins import describe_params

    class Crop(BaseModel):
        scale: tuple[float, float] = (0.2, 1.0)

    class WithCrop(Params):
        crop: Crop = Crop()

    described = describe_params(WithCrop)["crop"]
    assert described["default"] == {"scale": [0.2, 1.0]} and described["type"] == "Crop"
    json.dumps(described)
