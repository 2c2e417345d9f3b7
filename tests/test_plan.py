"""The plan (mae_bench/plan.py): cells and their keys. A key covers what determines a
result (settings, seed, the identity of each component, the micro-batch a batch-statistic
loss sees), resolved defaults included, and nothing else."""

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


def test_components_are_part_of_the_keys_and_plugin_versions_the_provenance(registry, tiny_run):
    """Each component enters the key on its own (tests/test_keys.py: edited, untouched,
    released); the run records the distributions' versions as provenance."""
    cells = suite_cells(resolve_suite(tiny_suite_data(), registry))
    components = cells[1].config["components"]
    assert set(components) == {"dataset", "encoder", "masking", "loss"}
    assert len(components["loss"]) == 3 and "plugins" not in cells[1].config
    assert all(set(e.config["components"]) == {"evaluator"} for e in cells[1].evaluations)
    record = cell_record(tiny_run.cells()["vit-seed0"])
    assert record["config_hash"] == cells[1].config_hash  # the runner plans the same keys
    vit = registry.components["encoder"]["vit"].plugin
    assert record["provenance"]["plugins"] == {"mae-bench": vit.version}


def _keys(registry, **pretrain) -> dict[str, str]:
    """Cell id per variant of the tiny suite (``vit`` has a uniformity term, ``mlp`` mse)."""
    data = tiny_suite_data()
    data["pretrain"].update(pretrain)
    cells = suite_cells(resolve_suite(data, registry))
    return {c.variant.name: c.cell_id for c in cells}


def test_batch_statistic_loss_keys_hold_the_micro_batch_the_loss_sees(registry):
    """uniformity's objective changes with accum_iter: its cell key covers the micro-batch;
    an mse-only variant's key does not move."""
    single = _keys(registry, batch_size=32, accum_iter=1)
    accumulated = _keys(registry, batch_size=32, accum_iter=4)
    assert accumulated["vit"] != single["vit"] and accumulated["mlp"] == single["mlp"]
    cells = suite_cells(resolve_suite(tiny_suite_data(), registry))
    assert cells[1].config["pretrain"]["loss_batch"] == 32
    assert "loss_batch" not in cells[0].config["pretrain"]


def test_data_parallel_processes_plan_the_same_keys(registry, monkeypatch):
    """A data-parallel loss gathers the micro-batch over the processes (distributed.
    gather_batch): torchrun's ranks plan the keys one process does."""
    one = _keys(registry)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert _keys(registry) == one
