"""The data2vec target (plugins/data2vec.py): the EMA update against a hand computation, the
targets against a hand-written reference of data2vec's recipe, an exact resume of the teacher,
and a CLI run whose counted FLOPs include the teacher's forward pass."""

import json
import signal

import pytest
import torch
from mae_bench_plugins.data2vec import Data2VecTarget

from mae_bench import Mask, resume
from mae_bench.errors import ConfigError
from mae_bench.layers import random_mask
from mae_bench.memory import pretrain_step_bytes
from mae_bench.suite import resolve_suite
from tests.conftest import (
    invoke,
    make_component,
    pretrain_variant,
    small_vit,
    tiny_suite_data,
    write_suite,
)

VIT = {"name": "vit", "patch_size": 4, "dim": 32, "depth": 3, "heads": 2, "decoder_dim": 16}


def _student(registry, target, **changes):
    """A 3-block vit predicting ``target``'s width, the teacher set up from it."""
    torch.manual_seed(0)
    model = small_vit(registry, depth=3, **changes)
    model.reset_head(target.dim(model))
    target.setup(model)
    return model


def _mask(seed: int) -> Mask:
    return Mask(*random_mask(2, 16, 0.75, generator=torch.Generator().manual_seed(seed)))


def test_the_teacher_follows_the_student_by_the_annealed_ema(registry):
    target = make_component(registry, "target", "data2vec", ema_decay=0.5, ema_end_decay=0.9)
    model = _student(registry, target)
    teacher = target.teacher
    assert teacher is not model.encoder and not teacher.training
    assert not any(p.requires_grad for p in teacher.parameters())
    with torch.no_grad():  # the student moves away from the teacher (as an optimizer step)
        for p in model.encoder.parameters():
            p.add_(torch.randn_like(p))
        model.encoder.pos_embed.add_(1.0)  # a buffer: copied, not averaged
    old = {k: v.clone() for k, v in teacher.named_parameters()}
    student = {k: v.clone() for k, v in model.encoder.named_parameters()}
    target.after_step(model, 0.25)
    tau = 0.5 + (0.9 - 0.5) * 0.25  # 0.6: linear from ema_decay to ema_end_decay
    assert target.decay_at(0.25) == pytest.approx(tau)
    assert target.decay_at(0.0) == 0.5 and target.decay_at(1.0) == pytest.approx(0.9)
    for name, p in teacher.named_parameters():
        expected = tau * old[name] + (1 - tau) * student[name]
        torch.testing.assert_close(p, expected, rtol=1e-6, atol=1e-7, msg=name)
        assert torch.equal(dict(model.encoder.named_parameters())[name], student[name])
    assert torch.equal(teacher.pos_embed, model.encoder.pos_embed)


def _reference(teacher, imgs, top_k):
    """data2vec's targets written out on ``teacher`` (a vit encoder): every patch visible,
    the blocks run one by one, cls dropped, each of the top-K outputs normalised per channel
    over the tokens (biased variance, eps 1e-5), averaged, then normalised per token."""
    x = teacher.patch_embed(imgs) + teacher.pos_embed  # (B, L, D)
    x = torch.cat([teacher.cls_token.expand(len(x), -1, -1), x], dim=1)  # (B, 1 + L, D)
    outs = []
    for block in teacher.blocks:
        x = block(x)
        outs.append(x[:, 1:])
    normed = []
    for y in outs[-top_k:]:
        mean, var = y.mean(dim=1, keepdim=True), y.var(dim=1, unbiased=False, keepdim=True)
        normed.append((y - mean) / torch.sqrt(var + 1e-5))
    y = sum(normed) / top_k
    mean, var = y.mean(dim=-1, keepdim=True), y.var(dim=-1, unbiased=False, keepdim=True)
    return (y - mean) / torch.sqrt(var + 1e-5)


def test_targets_are_the_teachers_normalised_top_k_average_whatever_the_mask(registry):
    target = make_component(registry, "target", "data2vec", top_k=2)
    model = _student(registry, target)
    with torch.no_grad():  # the student moves on: targets are the teacher's, not its
        for p in model.encoder.parameters():
            p.mul_(1.5)
    imgs = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    got = target(imgs, _mask(0), model)
    assert got.shape == (2, 16, 32)
    with torch.no_grad():
        torch.testing.assert_close(got, _reference(target.teacher, imgs, 2))
        # not the last block alone, nor all three averaged, nor the student's
        for other in (_reference(target.teacher, imgs, 1), _reference(target.teacher, imgs, 3)):
            assert not torch.allclose(got, other, atol=1e-3)
        assert not torch.allclose(got, _reference(model.encoder, imgs, 2), atol=1e-3)
    assert torch.equal(got, target(imgs, _mask(1), model))  # the teacher sees every patch


def test_an_encoder_without_blocks_is_refused_at_validation(registry):
    data = tiny_suite_data()
    data["variants"][0]["target"] = {"name": "data2vec"}  # the mlp encoder
    data["variants"][0]["loss"] = [{"name": "mse"}]
    with pytest.raises(ConfigError, match=r"encoder 'mlp' .* has no encoder\.blocks"):
        resolve_suite(data, registry)
    data["variants"][0]["encoder"] = {**VIT, "depth": 1}
    with pytest.raises(ConfigError, match="top_k=2 averages more blocks than the 1"):
        resolve_suite(data, registry)
    with pytest.raises(RuntimeError, match="call setup"):  # no teacher yet
        Data2VecTarget(Data2VecTarget.Params())(torch.zeros(1, 3, 16, 16), _mask(0), None)


def test_a_timm_vit_teacher_drops_its_prefix_tokens(registry):
    info = registry.get("encoder", "timm", "encoder")
    params = {"model": "vit_tiny_patch16_224", "decoder_dim": 16, "decoder_depth": 1}
    args = {"patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2, "reg_tokens": 2}
    model = info.cls(info.cls.Params(**params, model_args=args), image_size=16, in_chans=3)
    target = make_component(registry, "target", "data2vec")
    target.setup(model)
    got = target(torch.randn(2, 3, 16, 16), _mask(0), model)
    assert model.num_prefix_tokens == 3 and got.shape == (2, 16, 32)
    torch.testing.assert_close(got.mean(dim=-1), torch.zeros(2, 16), atol=1e-5, rtol=0)


def _d2v_suite(registry, **pretrain):
    data = tiny_suite_data()
    data["pretrain"].update(pretrain)
    data["variants"] = [
        {
            "name": "d2v",
            "encoder": {**VIT, "depth": 2, "decoder_depth": 1, "decoder_heads": 2},
            "loss": [{"name": "mse"}],
            "target": {"name": "data2vec", "ema_decay": 0.9, "ema_end_decay": 0.99},
        }
    ]
    return resolve_suite(data, registry)


def test_a_resumed_cell_continues_with_the_same_teacher(tmp_path, registry, monkeypatch):
    suite = _d2v_suite(registry, epochs=3)  # 128 images, batches of 32: 12 steps

    def run(checkpoint=None, init_seed=0):
        target = suite.variants[0].build_target()
        _, model, result = pretrain_variant(
            suite, init_seed=init_seed, checkpoint=checkpoint, target=target
        )
        return model, target, result

    model_a, target_a, straight = run()
    checkpoint = resume.Checkpoint(tmp_path / "c.pt", "key", every=0)  # only on signals
    calls = {"n": 0}
    real = resume.requested

    def stop_at_step_6():  # in the middle of epoch 2
        calls["n"] += 1
        return (signal.SIGTERM, False) if calls["n"] == 6 else real()

    monkeypatch.setattr(resume, "requested", stop_at_step_6)
    with pytest.raises(resume.Terminated):
        run(checkpoint)
    monkeypatch.setattr(resume, "requested", real)
    # another init: only the checkpoint can give the resumed run its student and teacher
    model_b, target_b, again = run(checkpoint, init_seed=123)
    assert again.history == straight.history
    for a, b in zip(model_a.state_dict().values(), model_b.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    teacher_a, teacher_b = target_a.state_dict()["teacher"], target_b.state_dict()["teacher"]
    assert teacher_a.keys() == teacher_b.keys()
    for key, value in teacher_a.items():
        assert torch.equal(value, teacher_b[key]), key
    # the teacher is its own state: neither the student nor its initial copy
    blocks = "blocks.1.mlp.fc2.weight"
    assert not torch.equal(teacher_a[blocks], model_a.encoder.state_dict()[blocks])


def test_a_cli_run_counts_the_teachers_forward_pass(tmp_path, registry):
    data = tiny_suite_data()
    data["pretrain"]["epochs"] = 1
    data["eval"] = {"reconstruction": {"num_images": 16}}
    vit = {**VIT, "depth": 2, "decoder_depth": 1, "decoder_heads": 2}
    masking = {"name": "random", "ratio": 0.75}
    plain = {"name": "plain", "encoder": vit, "masking": masking, "loss": [{"name": "mse"}]}
    data["variants"] = [plain, {**plain, "name": "d2v", "target": {"name": "data2vec"}}]
    suite = write_suite(tmp_path, data)
    result = invoke("run", str(suite), "--out", str(tmp_path / "out"), "--device", "cpu")
    assert result.exit_code == 0, result.output
    cells = {p.name.split("-")[0]: p for p in (tmp_path / "out" / "tiny" / "cells").iterdir()}
    gflops = {
        name: json.loads((cells[name] / "pretrain.json").read_text())["metrics"]
        for name in ("plain", "d2v")
    }
    gflops = {name: m["flops_per_image"] * 1e9 for name, m in gflops.items()}
    # the teacher's forward on all 16 patches (+ cls) of the 2 blocks, its patch embedding,
    # and the head predicting D = 32 values instead of p*p*C = 48 (17 decoder tokens of 16)
    tokens, d = 17, 32
    block = 2 * tokens * d * (12 * d) + 2 * 2 * tokens * tokens * d
    teacher = 2 * block + 2 * 16 * 48 * d
    head = 3 * 2 * tokens * 16 * (32 - 48)  # forward and backward
    assert gflops["d2v"] > gflops["plain"]
    assert gflops["d2v"] - gflops["plain"] == pytest.approx(teacher + head, rel=0.02)
    # the memory estimate runs the teacher on fake tensors too
    resolved = resolve_suite(data, registry)
    plain_bytes, d2v_bytes = (pretrain_step_bytes(v, resolved) for v in resolved.variants)
    assert d2v_bytes > 0 and plain_bytes > 0


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_pretraining_on_cuda_runs_the_teacher_in_bf16_and_its_norms_in_float32(registry):
    suite = _d2v_suite(registry, epochs=1)
    target = suite.variants[0].build_target()
    _, model, result = pretrain_variant(suite, device="cuda", target=target)
    assert next(target.teacher.parameters()).is_cuda and not target.teacher.training
    imgs = torch.randn(2, 3, 16, 16, device="cuda")
    got = target(imgs, _mask(0), model)
    assert got.dtype == torch.float32 and got.shape == (2, 16, 32)
    with torch.no_grad():  # bf16 against the float32 reference: close, not equal
        expected = _reference(target.teacher, imgs, 2)
    torch.testing.assert_close(got, expected, atol=0.1, rtol=0.05)
    assert all(torch.isfinite(torch.tensor(row["loss"])) for row in result.history)
