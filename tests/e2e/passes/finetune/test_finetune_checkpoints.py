"""Epoch checkpoints on a two-weight model trained for real (seconds): one checkpoint kept per epoch, a finished run
resumed from its last one, a checkpoint of another config ignored."""

from __future__ import annotations

import math

import numpy as np
import torch

from optcli.data import Dataset
from optcli.passes.finetune import Config
from optcli.passes.finetune.loop import TrainJob, train


def tiny_job(tmp_path, **config) -> TrainJob:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((40, 2)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64)
    torch.manual_seed(0)
    return TrainJob(
        config=Config(**{"seed": 0, "batch_size": 8, "lr": 0.1, **config}),
        student=torch.nn.Linear(2, 2),
        input_names=["x"],
        train=Dataset("train", {"x": x}, y, 8, "accuracy"),
        eval=Dataset("eval", {"x": x}, y, 8, "accuracy"),
        checkpoint_dir=str(tmp_path / "ckpt"),
    )


def test_one_checkpoint_per_epoch_is_kept_and_a_finished_run_resumes_nothing(tmp_path):
    result = train(tiny_job(tmp_path, epochs=3), progress=False)
    assert [r["epoch"] for r in result.epochs] == [1, 2, 3] and result.steps == 3 * math.ceil(40 / 8)
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["epoch-3.pt"]
    saved = torch.load(tmp_path / "ckpt" / "epoch-3.pt", weights_only=True)
    assert saved["epoch"] == 3 and saved["step"] == result.steps and len(saved["history"]) == 3
    lines: list[str] = []
    again = train(tiny_job(tmp_path, epochs=3), progress=False, log=lines.append)
    assert again.resumed_from_epoch == 3 and any("resuming from the checkpoint of epoch 3" in m for m in lines)


def test_a_checkpoint_of_another_config_is_ignored(tmp_path):
    train(tiny_job(tmp_path, epochs=1), progress=False)
    lines: list[str] = []
    result = train(tiny_job(tmp_path, epochs=1, lr=0.05), progress=False, log=lines.append)
    assert result.resumed_from_epoch is None and any("written by a different config" in m for m in lines)
