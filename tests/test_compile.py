"""torch.compile (`pretrain.compile: true`, `eval.finetune.compile: true`): the compiled step
gives the eager step's loss to 1e-4, also where curriculum masking changes the token count
(dynamic shapes, compiled once more, not once per count), a compiled cell resumes exactly
from its checkpoint, and the switch is not part of any key (it changes how a cell runs)."""

import signal

import pytest
import torch
from mae_bench_plugins.finetune import FinetuneParams, finetune

from mae_bench import resume
from mae_bench.data import ImageFeeder
from mae_bench.plan import suite_cells
from mae_bench.suite import resolve_suite
from tests.conftest import pretrain_variant, tiny_suite_data

pytestmark = pytest.mark.slow  # each test compiles a model (tens of seconds on a CPU)

VIT = {"name": "vit", "patch_size": 4, "dim": 32, "depth": 1, "heads": 2, "decoder_dim": 32,
       "decoder_depth": 1}  # fmt: skip


def vit_suite(registry, masking, compile_=False, epochs=2):
    data = tiny_suite_data(seeds=[0])
    data["pretrain"] = {"epochs": epochs, "batch_size": 32, "lr": 1e-3, "compile": compile_}
    losses = [{"name": "mse"}, {"name": "laplacian", "weight": 0.1}]
    data["variants"] = [{"name": "v", "encoder": VIT, "masking": masking, "loss": losses}]
    return resolve_suite(data, registry)


def test_a_compiled_step_gives_the_eager_loss_where_the_token_count_changes(registry):
    """Curriculum masking 0.25 -> 0.75 over 2 epochs of 4 steps: the visible patches go
    12, 11, ... 4, a new count every step. torch recompiles once with a symbolic count
    (automatic dynamic shapes), not once per count, and every step's loss is the eager one."""
    torch._dynamo.reset()
    masking = {"name": "curriculum", "start": 0.25, "end": 0.75}
    _, _, eager = pretrain_variant(vit_suite(registry, masking))
    counters = torch._dynamo.utils.counters
    counters.clear()
    _, _, compiled = pretrain_variant(vit_suite(registry, masking, compile_=True))
    assert len(compiled.history) == len(eager.history) == 2
    for a, b in zip(eager.history, compiled.history, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4, abs=1e-4)
        assert b["mask_ratio"] == a["mask_ratio"]
    # (weights are not compared: AdamW turns a rounding-size gradient into a step of lr)
    frames = counters["stats"]["unique_graphs"]
    assert 0 < frames <= 4, dict(counters["stats"])  # not one graph per token count (8)


def test_a_compiled_cell_resumes_exactly(registry, tmp_path, monkeypatch):
    """Stopped by SIGTERM in the middle of epoch 2 and resumed (another init, another global
    seed): the same history and weights as the compiled run straight through."""
    torch._dynamo.reset()
    suite = vit_suite(registry, {"name": "random", "ratio": 0.75}, compile_=True, epochs=3)
    _, straight_model, straight = pretrain_variant(suite)
    checkpoint = resume.Checkpoint(tmp_path / "c.pt", "key", every=0)
    calls = {"n": 0}
    real = resume.requested

    def stop_at_step_6():  # of 12: in the middle of epoch 2
        calls["n"] += 1
        return (signal.SIGTERM, False) if calls["n"] == 6 else real()

    monkeypatch.setattr(resume, "requested", stop_at_step_6)
    with pytest.raises(resume.Terminated, match="checkpoint saved in epoch 2"):
        pretrain_variant(suite, checkpoint=checkpoint)
    monkeypatch.setattr(resume, "requested", real)
    _, model, again = pretrain_variant(suite, init_seed=123, checkpoint=checkpoint)
    assert again.history == straight.history
    for a, b in zip(straight_model.state_dict().values(), model.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_compiled_fine_tuning_gives_the_eager_losses(registry):
    suite = resolve_suite(tiny_suite_data(), registry)
    data = suite.build_dataset().load()
    feeder = ImageFeeder.fit(data.pretrain, image_size=16, channels=3, device=torch.device("cpu"))
    runs = []
    for compile_ in (False, True):
        torch.manual_seed(0)
        model = suite.variants[1].build_model(16, 3)
        cfg = FinetuneParams(epochs=2, batch_size=32, val_fraction=0.25, compile=compile_)
        runs.append(finetune(model, data, feeder, cfg, seed=3))
    (eager_metrics, eager_history, _), (metrics, history, _) = runs
    for a, b in zip(eager_history, history, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4, abs=1e-4)
    assert metrics["ft_acc"] == pytest.approx(eager_metrics["ft_acc"], abs=1 / 64)


def test_compile_is_not_part_of_any_key(registry):
    data = tiny_suite_data()
    plain = suite_cells(resolve_suite(data, registry))
    data["pretrain"]["compile"] = True
    data["eval"]["finetune"] = {"enabled": True, "epochs": 1}
    with_ft = suite_cells(resolve_suite(data, registry))
    data["eval"]["finetune"]["compile"] = True
    compiled = suite_cells(resolve_suite(data, registry))
    assert [c.cell_id for c in plain] == [c.cell_id for c in with_ft]
    assert [c.result_ids for c in with_ft] == [c.result_ids for c in compiled]
