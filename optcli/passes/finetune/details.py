"""What a finetune step writes under "details" in report.json (registered as PassSpec.details); pydantic only."""

from __future__ import annotations

from typing import Any

from optcli.report.model import Number, Open, StepDetails


class Epoch(Open):
    epoch: int | None = None
    loss: Number | None = None
    metric: Number | None = None


class Training(Open):
    """The curve (one entry per epoch), the epoch kept, and where training ran (workers, devices, batch, speed)."""

    epochs: list[Epoch] | None = None
    best_epoch: int | None = None
    metric: Any = None
    seconds: Number | None = None
    samples_per_s: Number | None = None
    samples_per_s_per_worker: Number | None = None
    world_size: int | None = None
    backend: str | None = None
    devices: list[Any] | None = None
    batch_per_worker: int | None = None
    global_batch: int | None = None
    stopped_early: bool | None = None
    resumed_from_epoch: int | None = None


class FinetuneDetails(StepDetails):
    training: Training | None = None
