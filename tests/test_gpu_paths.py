"""The CUDA paths that crashed before any GPU ran them (issue 18, items 1 and 3), checked on
the CPU with CUDA mocked: each torchrun rank's device, ``--device cuda:N`` with the local
launcher, the submitit launcher's GPUs per task, and a timm encoder pooled by ``avg``
trained data-parallel (two gloo processes)."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as torch_dist
import torch.multiprocessing as mp
from mae_bench_plugins.launchers import LocalLauncher, LocalParams, device_slices
from rich.console import Console

from mae_bench import LaunchRequest, UserError, runner, worker
from mae_bench.contract import Mask
from mae_bench.distributed import Dist, cell_device
from mae_bench.layers import random_mask
from mae_bench.runner import local_device, resolve_launcher, run_suite
from mae_bench.suite import load_suite
from tests.conftest import fake_local_workers, invoke, write_suite


class _ReachedWork(Exception):
    """Raised where a rank would start training: the test has seen its device."""


@pytest.fixture
def two_gpu_node(monkeypatch):
    """A node with two (mocked) GPUs; ``set_rank(r)`` makes this process torchrun's rank r
    of two, and the process group a no-op."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(
        torch.cuda,
        "get_device_properties",
        lambda index: SimpleNamespace(total_memory=80 << 30, name="mock GPU"),
    )
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    started: list[torch.device] = []
    monkeypatch.setattr(runner, "start_world", lambda world, device: started.append(device))
    monkeypatch.setattr(worker, "start_world", lambda world, device: started.append(device))
    monkeypatch.setattr(Dist, "barrier", lambda self: None)

    def set_rank(rank: int) -> list[torch.device]:
        monkeypatch.setenv("WORLD_SIZE", "2")
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("LOCAL_RANK", str(rank))
        started.clear()
        return started

    return set_rank


def _cell_ids(suite_file: Path, registry) -> tuple[str, ...]:
    from mae_bench.plan import suite_cells

    return tuple(c.cell_id for c in suite_cells(load_suite(str(suite_file), registry)))


@pytest.mark.parametrize("option", ["auto", "cuda", "cuda:0"])
def test_torchrun_run_command_gives_each_rank_its_own_gpu(
    option, tmp_path, monkeypatch, registry, two_gpu_node
):
    """``torchrun --nproc-per-node 2 mae-bench run SUITE`` on a two-GPU node: rank r joins
    the group and trains on cuda:r (the command's own functions, up to the training loop)."""
    suite_file = write_suite(tmp_path)
    ids: list[str] = []  # what rank 0 hands every rank: the cells as planned for 2 processes
    monkeypatch.setattr(
        Dist, "broadcast", lambda self, obj: tuple(ids) if isinstance(obj, tuple) else obj
    )
    trained_on: list[torch.device] = []

    def reach_work(suite, root, device, *args, **kwargs):
        trained_on.append(device)
        raise _ReachedWork

    monkeypatch.setattr(worker, "work", reach_work)

    def reach_load(cls, suite, root, device, *args):
        trained_on.append(device)
        raise _ReachedWork

    monkeypatch.setattr(worker.WorkerContext, "load", classmethod(reach_load))
    for rank in (0, 1):
        started = two_gpu_node(rank)
        ids[:] = _cell_ids(suite_file, registry)
        trained_on.clear()
        result = invoke(
            "run", str(suite_file), "--out", str(tmp_path / f"out{rank}"), "--device", option
        )
        assert isinstance(result.exception, _ReachedWork), result.output
        assert started and set(started) == {torch.device("cuda", rank)}
        assert trained_on == [torch.device("cuda", rank)]  # rank 0 loads the data first


def test_run_suite_takes_a_rank_device_resolved_once(tmp_path, monkeypatch, registry, two_gpu_node):
    """A device already resolved for this rank (``local_device``) is used as it is, never
    resolved again: rank 1's cuda:1 is not refused as a second GPU index."""
    suite_file = write_suite(tmp_path)
    suite = load_suite(str(suite_file), registry)
    monkeypatch.setattr(Dist, "broadcast", lambda self, obj: obj)
    started = two_gpu_node(1)
    device = local_device("auto")
    assert device == torch.device("cuda", 1)
    summary = run_suite(suite, tmp_path / "out", device)  # rank 1: nothing to claim
    assert started == [torch.device("cuda", 1)] and not summary.failed


def _fake_workers(monkeypatch) -> list[tuple[list[str], dict[str, str]]]:
    """The local launcher's worker processes, recorded instead of started."""
    started = fake_local_workers(monkeypatch)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    return started


def test_local_launcher_pins_cuda_n_and_the_worker_sees_it_as_its_only_gpu(tmp_path, monkeypatch):
    """``--device cuda:2``: the worker's slice is GPU 2, which it sees as its only GPU, so it
    is told ``--device cuda`` (``cuda:2`` there is an invalid device ordinal)."""
    started = _fake_workers(monkeypatch)
    request = LaunchRequest(tmp_path, ("a-seed0-1",), "cuda:2")
    LocalLauncher(LocalParams(workers=1)).launch(request, Console())
    ((command, env),) = started
    assert env["CUDA_VISIBLE_DEVICES"] == "2"
    assert command[-2:] == ["--device", "cuda"]
    started.clear()
    LocalLauncher(LocalParams(workers=2)).launch(
        LaunchRequest(tmp_path, ("a-seed0-1",), "cuda"), Console()
    )
    assert [env["CUDA_VISIBLE_DEVICES"] for _, env in started] == ["0", "1"]
    assert all(command[-2:] == ["--device", "cuda"] for command, _ in started)


def test_cuda_n_names_one_gpu_that_every_worker_shares(monkeypatch):
    _fake_workers(monkeypatch)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")
    assert device_slices("cuda:1", 1, 1) == ["5"]  # cuda:1 of the visible GPUs
    assert device_slices("cuda:1", 2, 1) == ["5", "5"]  # two workers share GPU 1
    with pytest.raises(UserError, match=r"--device cuda:1 names one GPU; procs_per_cell 2"):
        device_slices("cuda:1", 1, 2)
    with pytest.raises(UserError, match=r"--device cuda:4: 4 GPUs are visible"):
        device_slices("cuda:4", 1, 1)


def test_submitit_tasks_get_a_gpu_unless_the_device_is_the_cpu(registry):
    pytest.importorskip("submitit")
    default = resolve_launcher(registry, "submitit", {"cluster": "debug"})
    assert default.params.gpus_per_task is None  # decided by --device
    assert default.gpus_per_task("auto") == 1 and default.gpus_per_task("cuda") == 1
    assert default.gpus_per_task("cpu") == 0 and default.gpus_per_task("mps") == 0
    two = resolve_launcher(registry, "submitit", {"cluster": "debug", "tasks_per_node": 2})
    assert two.gpus_per_task("auto") == 1  # each data-parallel task its own GPU
    none = resolve_launcher(registry, "submitit", {"cluster": "debug", "gpus_per_task": 0})
    assert none.gpus_per_task("auto") == 0  # asked for: CPU nodes
    with pytest.raises(UserError, match=r"--device cuda.*gpus_per_task=0"):
        none.gpus_per_task("cuda")


def test_submitit_executor_requests_the_gpus_per_node(registry, tmp_path):
    pytest.importorskip("submitit")
    launcher = resolve_launcher(registry, "submitit", {"cluster": "local", "tasks_per_node": 2})
    gpus = launcher.executor(tmp_path / "%j", "auto").parameters["gpus_per_node"]
    assert gpus == 2
    cpu = launcher.executor(tmp_path / "%j", "cpu").parameters["gpus_per_node"]
    assert cpu == 0


def _timm_avg_steps(rank: int, world_size: int, store_file: str, steps: int) -> None:
    """One gloo rank: a timm ViT pooled by ``avg`` trained ``steps`` steps under DDP."""
    from mae_bench.plugins import load_registry

    torch.set_num_threads(1)
    torch_dist.init_process_group(
        "gloo", init_method=f"file://{store_file}", rank=rank, world_size=world_size
    )
    try:
        model = make_component_model(load_registry())
        net = torch.nn.parallel.DistributedDataParallel(model)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
        generator = torch.Generator().manual_seed(rank)
        for _ in range(steps):
            imgs = torch.randn(2, 3, 16, 16, generator=generator)
            ids_keep, ids_restore, mask = random_mask(
                2, model.num_patches, 0.75, generator=generator
            )
            loss = net(imgs, Mask(ids_keep, ids_restore, mask)).pred.square().mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    finally:
        torch_dist.destroy_process_group()


def make_component_model(registry) -> torch.nn.Module:
    """A one-block timm ViT pooled by ``avg`` (timm gives it ``fc_norm``) on 16 px images."""
    info = registry.get("encoder", "timm", "encoder")
    params = info.cls.Params(
        model="vit_tiny_patch16_224",
        model_args={"patch_size": 4, "depth": 1, "global_pool": "avg"},
        decoder_dim=16,
        decoder_depth=1,
        decoder_heads=2,
    )
    return info.cls(params, image_size=16, in_chans=3)


def test_timm_avg_pool_encoder_trains_only_what_pretraining_uses(registry):
    """Every parameter that trains gets a gradient from the pretraining loss (DDP refuses
    one that does not); timm's ``fc_norm`` is kept (its weights export) but frozen."""
    model = make_component_model(registry)
    assert not isinstance(model.encoder.fc_norm, torch.nn.Identity)
    ids_keep, ids_restore, mask = random_mask(2, model.num_patches, 0.75)
    model(torch.randn(2, 3, 16, 16), Mask(ids_keep, ids_restore, mask)).pred.mean().backward()
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert no_grad == []
    weights, _ = model.export_state_dict("timm")
    assert "fc_norm.weight" in weights


def test_timm_avg_pool_encoder_trains_data_parallel(tmp_path):
    """Two gloo processes, three DDP steps (an unused parameter fails at the second)."""
    store = tmp_path / "store"
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_timm_avg_steps, args=(2, str(store), 3), nprocs=2, join=True)


def test_a_gpu_index_under_torchrun_is_refused_naming_the_option(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(UserError, match=r"--device cuda:1: each of the 2 processes.*--device cuda"):
        cell_device(torch.device("cuda", 1), Dist(0, 2, 0))
