"""Epoch checkpoints: after each epoch rank 0 writes checkpoint_dir/epoch-<k>.pt atomically and drops the previous
one; a job whose fingerprint (config + starting weights + data) matches continues from the last one."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from optcli.passes.finetune.job import TrainJob
from optcli.report.write import atomic_path


@dataclass
class State:
    """Where the run stands between epochs: what a checkpoint holds besides the weights."""

    step: int = 0
    epoch: int = 0  # epochs finished
    history: list[dict] = field(default_factory=list)
    best: dict | None = None  # {"score", "epoch", "model": state_dict} of the best candidate epoch so far
    bad_epochs: int = 0
    resumed_from: int | None = None


def fingerprint(job: TrainJob) -> str:
    """Config + starting weights + data: a checkpoint is resumed only by the job that wrote it."""
    h = hashlib.sha256(json.dumps(job.config.model_dump(mode="json"), sort_keys=True).encode())
    for module in (job.student, job.teacher):
        if module is None:
            continue
        for name, t in sorted(module.state_dict().items()):
            h.update(name.encode())
            h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    for data in (job.train, job.eval):
        if data is not None:
            for k, v in sorted(data.arrays.items()):
                h.update(k.encode() + np.ascontiguousarray(v).tobytes())
            if data.labels is not None:
                h.update(np.ascontiguousarray(data.labels).tobytes())
    return h.hexdigest()


def latest_checkpoint(folder: Path | None) -> Path | None:
    if folder is None or not folder.is_dir():
        return None
    found = sorted(folder.glob("epoch-*.pt"), key=lambda p: int(p.stem.split("-")[1]))
    return found[-1] if found else None


def save_checkpoint(folder: Path, epoch: int, state: dict) -> None:
    target = folder / f"epoch-{epoch}.pt"
    with atomic_path(target) as tmp:  # a crash mid-write never leaves a torn checkpoint behind
        torch.save(state, tmp)
    for old in folder.glob("epoch-*.pt"):
        if old != target:
            old.unlink()


def checkpoint_state(run, state: State, key: str) -> dict:
    """What resume() reads back: the State, the weights, the optimizer and the loss scaler (run: a loop.Run)."""
    return {
        "fingerprint": key,
        "epoch": state.epoch,
        "step": state.step,
        "history": state.history,
        "bad_epochs": state.bad_epochs,
        "best": state.best,
        "model": run.net.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "scaler": run.scaler.state_dict(),
    }


def resume(run, ckpt_dir: Path | None, key: str, log) -> State:
    """The last finished epoch of this same job (same fingerprint), if its checkpoint is there; else a fresh start."""
    latest = latest_checkpoint(ckpt_dir)
    if latest is None:
        return State()
    saved = torch.load(latest, map_location=run.device, weights_only=True)
    if saved.get("fingerprint") != key:
        log(f"ignoring {latest}: written by a different config, model or data")
        return State()
    for _ in range(saved["step"] if run.schedule is not None else 0):
        run.schedule.step()  # bring a gradual prune schedule to where it was; the masks themselves come from the state
    run.net.load_state_dict(saved["model"])
    run.optimizer.load_state_dict(saved["optimizer"])
    if run.scaler.is_enabled() and saved.get("scaler"):
        run.scaler.load_state_dict(saved["scaler"])
    log(f"resuming from the checkpoint of epoch {saved['epoch']} ({latest})")
    return State(
        step=saved["step"],
        epoch=saved["epoch"],
        history=saved["history"],
        best=saved["best"],
        bad_epochs=saved["bad_epochs"],
        resumed_from=saved["epoch"],
    )
