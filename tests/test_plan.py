"""The plan (mae_bench/plan.py): cells and their keys. A key covers what determines a
result (settings, seed, the versions of the plugins providing the components), resolved
defaults included, and nothing else."""

from mae_bench.plan import suite_cells
from mae_bench.suite import resolve_suite
from tests.conftest import cell_record, tiny_suite_data


def test_config_hash_is_stable_and_sensitive(registry):
    a = suite_cells(resolve_suite(tiny_suite_data(), registry))
    b = suite_cells(resolve_suite(tiny_suite_data(), registry))
    assert [c.config_hash for c in a] == [c.config_hash for c in b]
    assert len({c.cell_id for c in a}) == len(a)
    data = tiny_suite_data()
    data["variants"][0]["encoder"]["dim"] = 64
    c = suite_cells(resolve_suite(data, registry))
    assert c[0].config_hash != a[0].config_hash and c[1].config_hash == a[1].config_hash
    # defaults are resolved: spelling out a default does not change the hash
    data = tiny_suite_data()
    data["variants"][0]["masking"] = {"name": "random", "ratio": 0.75}
    assert suite_cells(resolve_suite(data, registry))[0].config_hash == a[0].config_hash


def test_baseline_cells_skip_pretraining_in_their_key(registry):
    data = tiny_suite_data()
    data["eval"]["baselines"] = True
    cells = suite_cells(resolve_suite(data, registry))
    assert [c.variant.name for c in cells] == ["mlp", "vit", "random-init-mlp", "random-init-vit"]
    data["pretrain"]["epochs"] = 9
    again = suite_cells(resolve_suite(data, registry))
    assert cells[2].cell_id == again[2].cell_id and cells[0].cell_id != again[0].cell_id
    data["variants"][1]["encoder"] = dict(data["variants"][0]["encoder"])
    data["variants"][1]["masking"] = {"name": "random"}
    same_encoder = suite_cells(resolve_suite(data, registry))
    assert [c.variant.name for c in same_encoder][-1] == "random-init"


def test_plugin_versions_are_part_of_the_keys_and_the_provenance(registry, tiny_run):
    data = tiny_suite_data()
    cells = suite_cells(resolve_suite(data, registry))
    vit = registry.components["encoder"]["vit"].plugin
    probe = registry.components["evaluator"]["linear_probe"].plugin
    assert cells[1].config["plugins"] == {"mae-bench": vit.version}
    original = vit.version
    builtins = [p for p in registry.plugins if p.distribution == vit.distribution]
    try:
        for plugin in builtins:  # the distribution providing `vit` was upgraded
            plugin.version = original + ".post1"
        upgraded = suite_cells(resolve_suite(data, registry))
    finally:
        for plugin in builtins:
            plugin.version = original
    assert upgraded[1].cell_id != cells[1].cell_id
    assert all(e.config["plugins"] == {probe.distribution: probe.version}
               for e in cells[1].evaluations)  # fmt: skip
    record = cell_record(tiny_run.cells()["vit-seed0"])
    assert record["provenance"]["plugins"] == {"mae-bench": original}
