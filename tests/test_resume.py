"""Checkpoints and exact resume (mae_bench/resume.py): a run killed with -9 or stopped by
SIGTERM mid-epoch resumes to exactly the numbers of an uninterrupted run; so does
fine-tuning; and when checkpoints are saved."""

import os
import signal
import subprocess
import time

import numpy as np
import pytest
import torch
import yaml
from mae_bench_plugins.finetune import FinetuneParams, finetune

from mae_bench import resume
from mae_bench.data import ImageFeeder
from mae_bench.resume import Checkpoint
from mae_bench.suite import resolve_suite
from tests.conftest import (
    MAE_BENCH,
    invoke,
    pretrain_variant,
    results_of,
    slow_suite,
    tiny_suite_data,
    wait_for_epoch,
)


@pytest.mark.slow
def test_kill_9_resumes_from_checkpoint_with_identical_metrics(slow_run, tmp_path):
    """``slow_run`` is the same suite run straight through."""
    out = tmp_path / "b"
    root = out / "slow"
    proc = subprocess.Popen(
        [MAE_BENCH, "run", str(slow_run.suite), "--out", str(out), "--device", "cpu"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for_epoch(root, 3, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    (checkpoint,) = (root / "checkpoints").glob("*.pt")
    saved = torch.load(checkpoint, weights_only=True)["epoch"]
    assert 3 <= saved < 10
    assert not (root / "cells").exists() or not any((root / "cells").glob("vit-*"))

    status = invoke("status", str(root))
    assert status.exit_code == 0 and "will resume from its checkpoint" in status.stdout
    again = invoke("run", str(slow_run.suite), "--out", str(out), "--device", "cpu")
    assert again.exit_code == 0, again.output
    assert "resumed vit-seed0-" in again.stderr
    assert f"from its checkpoint saved after epoch {saved}" in again.stderr  # as it was saved
    assert results_of(root) == results_of(slow_run.root)  # exactly, on CPU
    assert not list((root / "checkpoints").glob("*.pt"))  # removed once the cell is stored


def test_sigterm_mid_epoch_saves_a_checkpoint_and_resumes_exactly(tmp_path, registry, monkeypatch):
    suite = resolve_suite(yaml.safe_load(slow_suite(tmp_path, epochs=3).read_text()), registry)

    def run(checkpoint=None, init_seed=0, on_resume=None):
        _, model, result = pretrain_variant(
            suite, init_seed=init_seed, checkpoint=checkpoint, on_resume=on_resume
        )
        return model, result

    model_a, straight = run()
    checkpoint = resume.Checkpoint(tmp_path / "c.pt", "key", every=0)  # only on signals
    calls = {"n": 0}
    real = resume.requested

    def stop_at_step_20():  # the 20th step of 48: in the middle of epoch 2
        calls["n"] += 1
        return (signal.SIGTERM, False) if calls["n"] == 20 else real()

    monkeypatch.setattr(resume, "requested", stop_at_step_20)
    with pytest.raises(resume.Terminated, match="checkpoint saved in epoch 2"):
        run(checkpoint)
    monkeypatch.setattr(resume, "requested", real)
    assert torch.load(checkpoint.path, weights_only=True)["batch"] == 4
    resumed: list[int] = []
    # another init and global seed: the checkpoint restores the weights and every generator
    model_b, again = run(checkpoint, init_seed=123, on_resume=resumed.append)
    assert resumed == [1]  # one epoch done, then 4 batches of the second
    assert again.history == straight.history
    for a, b in zip(model_a.state_dict().values(), model_b.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    # a stale checkpoint (other settings) is not resumed from
    with pytest.warns(UserWarning, match="written for other settings"):
        assert resume.Checkpoint(checkpoint.path, "other").load() is None


def test_finetuning_resumes_exactly_from_its_checkpoint(tmp_path, registry, monkeypatch):
    suite = resolve_suite(tiny_suite_data(), registry)
    data = suite.build_dataset().load()
    cpu = torch.device("cpu")
    feeder = ImageFeeder.fit(data.pretrain, image_size=16, channels=3, device=cpu)
    torch.manual_seed(0)
    model = suite.variants[1].build_model(16, 3)
    cfg = FinetuneParams(epochs=4, batch_size=32, mixup=0.8, cutmix=1.0, randaugment=True,
                         drop_path=0.1, val_fraction=0.25)  # fmt: skip
    np_before = np.random.get_state()[1].copy()
    straight = finetune(model, data, feeder, cfg, seed=3)
    assert (np.random.get_state()[1] == np_before).all()  # numpy's global state untouched

    checkpoint = resume.Checkpoint(tmp_path / "ft.pt", "key", every=0)
    calls = {"n": 0}
    real = resume.requested

    def stop_after_epoch_2():
        calls["n"] += 1
        return (signal.SIGTERM, False) if calls["n"] == 2 else real()

    monkeypatch.setattr(resume, "requested", stop_after_epoch_2)
    with pytest.raises(resume.Terminated, match="after epoch 2"):
        finetune(model, data, feeder, cfg, seed=3, checkpoint=checkpoint)
    monkeypatch.setattr(resume, "requested", real)
    torch.manual_seed(99)
    np.random.seed(99)
    again = finetune(model, data, feeder, cfg, seed=3, checkpoint=checkpoint)
    np.testing.assert_equal(again[0], straight[0])  # NaN-aware: a metric may be NaN
    assert again[1] == straight[1]
    assert torch.equal(again[2], straight[2])


def test_checkpoint_policy(tmp_path):
    every3 = Checkpoint(tmp_path / "a.pt", "k", every=3)
    assert [every3.due(e, epoch_end=True) for e in (1, 2, 3, 6)] == [False, False, True, True]
    assert not Checkpoint(tmp_path / "b.pt", "k", every=0).due(1, epoch_end=True)
    auto = Checkpoint(tmp_path / "checkpoints" / "c.pt", "k", every="auto")
    assert auto.due(1, epoch_end=True)  # nothing measured yet: save
    auto._last_save_s = 1.0  # a save took 1 s: at most one per 20 s of training
    auto._last_save_at = time.perf_counter() - 10
    assert not auto.due(2, epoch_end=True)
    auto._last_save_at = time.perf_counter() - 25
    assert auto.due(3, epoch_end=True)
    auto.save({"x": torch.ones(2)})
    assert torch.load(auto.path, weights_only=True)["key"] == "k"
    auto.remove()
    assert not (tmp_path / "checkpoints").exists()  # the emptied folder goes too


def test_a_stop_signal_in_a_hung_step_raises_after_the_grace_period(tmp_path, monkeypatch):
    """A step that never returns: after MAE_BENCH_STOP_GRACE_S the stop is raised where the
    loop is, without a checkpoint; a loop that reaches its step boundary in time saves one.
    Either way the watchdog then stands down (its hard exit would end this process)."""
    monkeypatch.setenv("MAE_BENCH_STOP_GRACE_S", "0.5")
    checkpoint = Checkpoint(tmp_path / "c.pt", "k", every=0)
    start = time.perf_counter()
    raises = pytest.raises(resume.Terminated)
    with resume.handle_signals(), raises as stopped, resume.training():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(30)  # the hung step
    assert time.perf_counter() - start < 5 and stopped.value.signum == signal.SIGTERM
    assert "did not finish within 0.5 s of the signal" in stopped.value.detail
    assert not checkpoint.path.exists()
    raises = pytest.raises(resume.Terminated, match="saved in epoch 1")
    with resume.handle_signals(), raises, resume.training():
        os.kill(os.getpid(), signal.SIGTERM)
        stop, save = resume.requested()
        resume.step_boundary(checkpoint, lambda: {"x": 1}, stop, save, where="in epoch 1")
    assert torch.load(checkpoint.path, weights_only=True)["x"] == 1
    time.sleep(1.2)  # both grace periods pass: nothing is raised, nothing exits
    assert resume.requested() == (None, False)


def test_the_resume_message_names_the_epoch_the_save_message_named(tmp_path, monkeypatch):
    """A stop mid-epoch says "checkpoint saved in epoch 2"; the run that resumes it says it
    resumed from that same checkpoint, not "from epoch 1" (the epochs it had completed)."""
    suite = slow_suite(tmp_path, epochs=2, checkpoint_every=0)
    out = tmp_path / "out"
    calls = {"n": 0}
    real = resume.requested

    def stop_at_step_20():  # 16 steps per epoch: the 4th step of epoch 2
        calls["n"] += 1
        return (signal.SIGTERM, False) if calls["n"] == 20 else real()

    monkeypatch.setattr(resume, "requested", stop_at_step_20)
    stopped = invoke("run", str(suite), "--out", str(out), "--device", "cpu")
    assert stopped.exit_code == 143 and "checkpoint saved in epoch 2" in stopped.stderr
    monkeypatch.setattr(resume, "requested", real)
    again = invoke("run", str(suite), "--out", str(out), "--device", "cpu")
    assert again.exit_code == 0, again.output
    (line,) = [x for x in again.stderr.splitlines() if x.startswith("resumed ")]
    assert line.startswith("resumed vit-seed0-")
    assert line.endswith("from its checkpoint saved in epoch 2"), line


def test_a_checkpoint_remembers_when_it_was_saved(tmp_path):
    checkpoint = Checkpoint(tmp_path / "c.pt", "k", every=1)
    resume.epoch_boundary(checkpoint, 3, lambda: {"x": 1}, last=False, asked=(None, False))
    again = Checkpoint(tmp_path / "c.pt", "k")
    assert again.load()["x"] == 1 and again.saved_at == "after epoch 3"
    torch.save({"x": 1, "key": "k"}, tmp_path / "old.pt")  # written before it was recorded
    old = Checkpoint(tmp_path / "old.pt", "k")
    assert old.load() is not None and old.saved_at is None
