"""Retraining on several workers: what each worker binds, which backend, how many workers, AMP, learning-rate scaling,
SyncBatchNorm and the failure line, decided without launching a worker. The launches are in
tests/e2e/passes/finetune/test_distributed.py."""

from __future__ import annotations

import json

import pytest
import torch

from optcli.errors import BadInput
from optcli.passes.finetune import launch as D
from optcli.passes.finetune import loop
from optcli.passes.finetune.config import DistributedConfig


def test_each_worker_binds_the_gpu_of_its_local_rank():
    assert D.device_for("cuda", local_rank=3, cuda_count=4, nproc=4) == "cuda:3"
    assert D.device_for("auto", local_rank=1, cuda_count=2, nproc=2) == "cuda:1"
    assert D.device_for("auto", local_rank=1, cuda_count=0, nproc=2) == "cpu"
    assert D.device_for("cuda:2", local_rank=0, cuda_count=4, nproc=1) == "cuda:2"
    with pytest.raises(BadInput, match="no CUDA GPU"):
        D.device_for("cuda", 0, cuda_count=0)
    with pytest.raises(BadInput, match="only 2 GPU"):
        D.device_for("cuda", local_rank=2, cuda_count=2, nproc=3)
    with pytest.raises(BadInput, match="names one GPU"):
        D.device_for("cuda:1", 0, cuda_count=2, nproc=2)


def test_backend_auto_is_nccl_on_cuda_and_gloo_on_cpu():
    assert D.backend_for("auto", "cuda:0") == "nccl"
    assert D.backend_for("auto", "cpu") == "gloo"
    assert D.backend_for("gloo", "cuda:1") == "gloo"
    with pytest.raises(BadInput, match="nccl needs CUDA"):
        D.backend_for("nccl", "cpu")


def test_nproc_auto_is_one_per_gpu_and_one_on_cpu():
    auto = DistributedConfig(nproc_per_node="auto")
    assert D.nproc_for(auto, "cuda", cuda_count=8) == 8
    assert D.nproc_for(auto, "auto", cuda_count=2) == 2
    assert D.nproc_for(auto, "cpu", cuda_count=8) == 1
    assert D.nproc_for(auto, "cuda:3", cuda_count=8) == 1
    assert D.nproc_for(DistributedConfig(nproc_per_node=3), "cpu", cuda_count=0) == 3


def test_amp_picks_autocast_dtype_and_loss_scaling_only_on_cuda():
    assert loop.amp_dtype("bf16", "cuda:0") is torch.bfloat16
    assert loop.amp_dtype("fp16", "cuda:1") is torch.float16
    assert loop.amp_dtype("fp16", "cpu") is None and loop.amp_dtype("none", "cuda:0") is None
    with loop.autocast("bf16", "cpu"):  # a no-op off CUDA
        assert not torch.is_autocast_enabled("cpu") and not torch.is_autocast_enabled("cuda")
    assert not loop.grad_scaler("bf16", "cuda:0").is_enabled()  # bf16 has fp32's exponent range: no scaling


def test_linear_lr_scaling_multiplies_by_world_size():
    assert D.scaled_lr(1e-3, 8, "linear") == pytest.approx(8e-3)
    assert D.scaled_lr(1e-3, 8, "none") == 1e-3


def test_sync_batchnorm_round_trip_restores_the_original_layers():
    from optcli.examples.digits import build_cnn

    torch.manual_seed(0)
    model = build_cnn(8).eval()
    x = torch.randn(4, 1, 8, 8)
    before = model(x)
    synced, classes = D.to_sync_batchnorm(model, "cuda:0")
    assert sum(isinstance(m, torch.nn.SyncBatchNorm) for m in synced.modules()) == len(classes) == 4
    assert D.to_sync_batchnorm(build_cnn(8), "cpu")[1] == {}  # CPU: torch's SyncBatchNorm cannot run there
    back = D.from_sync_batchnorm(synced, classes).eval()
    assert not any(isinstance(m, torch.nn.SyncBatchNorm) for m in back.modules())
    assert sum(type(m) is torch.nn.BatchNorm2d for m in back.modules()) == 4
    assert torch.equal(back(x), before)


def test_failure_message_names_the_first_failed_rank_and_its_error(tmp_path, monkeypatch):
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure
    from torch.distributed.elastic.multiprocessing.errors.error_handler import ErrorHandler

    error_file = tmp_path / "error.json"
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(error_file))
    try:
        raise ValueError("labels go up to 12 but the model has 10 outputs")
    except ValueError as e:
        ErrorHandler().record_exception(e)  # what torch's @record writes in a worker
    failed = ProcessFailure(local_rank=1, pid=4242, exitcode=1, error_file=str(error_file))
    msg = D.failure_message(ChildFailedError("_worker", {3: failed}), max_restarts=0)
    assert (
        msg
        == "worker rank 3 (local rank 1, pid 4242) failed: ValueError: labels go up to 12 but the model has 10 outputs"
    )
    killed = ProcessFailure(local_rank=0, pid=77, exitcode=-9, error_file=str(tmp_path / "none.json"))
    assert (
        D.failure_message(ChildFailedError("_worker", {2: killed}), max_restarts=2)
        == "worker rank 2 (local rank 0, pid 77) failed after 2 restart(s): killed by signal 9 (SIGKILL)"
    )
    assert json.loads(error_file.read_text())["message"]["message"].startswith("ValueError")
