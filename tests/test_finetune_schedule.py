"""The fine-tune schedule's decisions, unit-tested on a two-weight model (seconds): the distillation loss mix,
which epoch is kept as best and when patience runs out, and the checkpoint written after each epoch."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from optcli.data import Dataset
from optcli.passes.finetune import Config
from optcli.passes.finetune.checkpoint import State
from optcli.passes.finetune.distillation import distillation_loss
from optcli.passes.finetune.loop import TrainJob, keep_best, train


def softmax(x: np.ndarray, t: float) -> np.ndarray:
    e = np.exp(x / t - (x / t).max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_distillation_loss_is_alpha_t_squared_kl_plus_one_minus_alpha_cross_entropy():
    rng = np.random.default_rng(0)
    student, teacher = rng.standard_normal((4, 5)), rng.standard_normal((4, 5))
    labels = np.array([0, 3, 1, 4])
    t, alpha = 3.0, 0.7
    p, q = softmax(teacher, t), softmax(student, t)
    kl = float((p * (np.log(p) - np.log(q))).sum(-1).mean())  # KL(teacher_T || student_T), batch mean
    ce = float(-np.log(softmax(student, 1.0)[np.arange(4), labels]).mean())
    got = distillation_loss(torch.tensor(student), torch.tensor(teacher), torch.tensor(labels), t, alpha)
    assert float(got) == pytest.approx(alpha * t * t * kl + (1 - alpha) * ce, rel=1e-6)
    soft_only = distillation_loss(torch.tensor(student), torch.tensor(teacher), None, t, alpha)
    assert float(soft_only) == pytest.approx(t * t * kl, rel=1e-6)  # no labels: the soft term alone


def test_a_student_matching_its_teacher_only_pays_the_label_loss():
    logits = torch.tensor([[2.0, -1.0, 0.5]])
    labels = torch.tensor([1])
    loss = distillation_loss(logits, logits.clone(), labels, temperature=4.0, alpha=0.25)
    assert float(loss) == pytest.approx(0.75 * float(F.cross_entropy(logits, labels)), abs=1e-6)


def fake_run(metric_name: str | None, min_delta: float = 0.0, schedule=None):
    net = torch.nn.Linear(1, 1)
    return SimpleNamespace(
        schedule=schedule, metric_name=metric_name, net=net, job=SimpleNamespace(config=Config(min_delta=min_delta))
    )


def test_best_epoch_follows_the_eval_metric_and_patience_counts_epochs_without_gain():
    run, state = fake_run("accuracy", min_delta=0.01), State()
    for epoch, metric in enumerate([0.50, 0.60, 0.605, 0.55], start=1):
        keep_best(run, state, {"epoch": epoch, "loss": 1.0}, metric)
    assert state.best["epoch"] == 2  # 0.605 is within min_delta of 0.60: not an improvement
    assert state.bad_epochs == 2


def test_a_loss_metric_is_better_lower_and_ramping_prune_epochs_are_never_best():
    run, state = fake_run("eval_loss"), State()
    keep_best(run, state, {"epoch": 1, "loss": 1.0}, 0.9)
    keep_best(run, state, {"epoch": 2, "loss": 1.0}, 0.4)
    assert state.best["epoch"] == 2
    ramping = SimpleNamespace(done=False)
    run, state = fake_run("accuracy", schedule=ramping), State()
    keep_best(run, state, {"epoch": 1, "loss": 1.0}, 0.99)
    assert state.best is None and state.bad_epochs == 0
    ramping.done = True
    keep_best(run, state, {"epoch": 2, "loss": 1.0}, 0.5)
    assert state.best["epoch"] == 2


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
