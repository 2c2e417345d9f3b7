"""Several local workers per GPU (issue 18, item 7; plugins/launchers.py): more workers than
GPU slices share them round-robin, each told ``cuda`` (its slice is its only GPU); a cell's
data-parallel processes never share a GPU. Checked with CUDA mocked and the worker
processes recorded instead of started (``fake_local_workers``)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from mae_bench_plugins.launchers import LocalLauncher, LocalParams, device_slices
from rich.console import Console

from mae_bench import LaunchRequest, UserError
from tests.conftest import fake_local_workers, invoke, write_suite

CELLS = ("a-seed0-1", "b-seed0-2")


@pytest.fixture
def gpus(monkeypatch):
    """A node whose visible (mocked) GPUs are set by ``gpus("4,5")``."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)

    def visible(ids: str) -> None:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", ids)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: len(ids.split(",")))

    return visible


def _launch(tmp_path, device: str, **params) -> str:
    """What the local launcher printed when launching on ``device`` (its workers are
    recorded by ``fake_local_workers``)."""
    console = Console(record=True, width=200)
    LocalLauncher(LocalParams(**params)).launch(LaunchRequest(tmp_path, CELLS, device), console)
    return console.export_text()


@pytest.mark.parametrize("device", ["auto", "cuda"])
def test_eight_workers_share_two_gpus_round_robin(tmp_path, monkeypatch, gpus, device):
    started = fake_local_workers(monkeypatch)
    gpus("0,1")
    printed = _launch(tmp_path, device, workers=8, threads=1)
    assert [env["CUDA_VISIBLE_DEVICES"] for _, env in started] == ["0", "1"] * 4
    # each worker sees one GPU, its cuda: the device it is told resolves there
    assert all(command[-2:] == ["--device", device] for command, _ in started)
    assert "8 workers share the GPUs (4 on GPU 0, 4 on GPU 1)" in printed
    assert "share its memory" in printed


def test_data_parallel_workers_share_whole_slices(tmp_path, monkeypatch, gpus):
    """3 workers of 2 processes on 4 GPUs: slices 0,1 and 2,3, the third worker on 0,1 again;
    within a slice each torchrun rank has its own GPU."""
    started = fake_local_workers(monkeypatch)
    gpus("4,5,6,7")
    printed = _launch(tmp_path, "auto", workers=3, procs_per_cell=2, threads=1)
    assert [env["CUDA_VISIBLE_DEVICES"] for _, env in started] == ["4,5", "6,7", "4,5"]
    assert all("--nproc-per-node=2" in command for command, _ in started)
    assert "2 on GPUs 4,5, 1 on GPUs 6,7" in printed


def test_a_pinned_gpu_takes_every_worker_and_each_sees_it_as_cuda(tmp_path, monkeypatch, gpus):
    started = fake_local_workers(monkeypatch)
    gpus("4,5,6,7")
    _launch(tmp_path, "cuda:1", workers=3, threads=1)
    assert [env["CUDA_VISIBLE_DEVICES"] for _, env in started] == ["5"] * 3
    assert all(command[-2:] == ["--device", "cuda"] for command, _ in started)


def test_one_worker_per_gpu_prints_no_sharing_note(tmp_path, monkeypatch, gpus):
    started = fake_local_workers(monkeypatch)
    gpus("0,1")
    printed = _launch(tmp_path, "cuda", workers=2, threads=1)
    assert [env["CUDA_VISIBLE_DEVICES"] for _, env in started] == ["0", "1"]
    assert "share" not in printed


def test_a_cells_processes_never_share_a_gpu(gpus):
    """What stays refused: NCCL cannot run two ranks of one group on one device."""
    gpus("0,1")
    assert device_slices("cuda", 5, 2) == ["0,1"] * 5  # whole slices, shared by workers
    with pytest.raises(UserError, match=r"procs_per_cell=3: each cell runs one process per GPU "
                                        r"and 2 GPUs are visible"):  # fmt: skip
        device_slices("auto", 1, 3)
    with pytest.raises(UserError, match=r"--device cuda:1 names one GPU; procs_per_cell 2"):
        device_slices("cuda:1", 1, 2)
    with pytest.raises(UserError, match=r"--device cuda:2: 2 GPUs are visible"):
        device_slices("cuda:2", 3, 1)


def test_a_refused_slice_is_one_line_naming_the_option(tmp_path, monkeypatch, gpus):
    gpus("0,1")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(
        torch.cuda,
        "get_device_properties",
        lambda index: SimpleNamespace(total_memory=80 << 30, name="mock GPU"),
    )
    result = invoke("run", str(write_suite(tmp_path)), "--out", str(tmp_path / "out"),
                    "--device", "cuda", "--launcher", "local", "--launcher-opt",
                    "procs_per_cell=3")  # fmt: skip
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "error: --launcher-opt procs_per_cell=3: each cell runs one process per GPU and 2 GPUs "
        "are visible"
    )
    assert "Traceback" not in result.output


def test_the_sharing_rule_is_shown_by_mae_bench_plugins():
    shown = " ".join(invoke("plugins").stdout.split())
    assert "more workers than slices share them round-robin" in shown
    assert "Workers on one GPU share its memory" in shown
