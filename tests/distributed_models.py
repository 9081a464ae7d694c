"""Models for the distributed tests: no BatchNorm, and a switch that kills one worker mid-run.

Imported by the spawned workers too (PYTHONPATH=tests), so keep it free of pytest.
"""

from __future__ import annotations

import os
import signal

from torch import nn


class FragileMLP(nn.Module):
    """8x8 digits -> 10 classes. No BatchNorm: per-worker batch statistics would make N workers differ from
    one worker on CPU, where torch's SyncBatchNorm is unavailable (see optcli.passes.finetune.launch.to_sync_batchnorm).

    With kill_rank/kill_step set, the worker of that RANK SIGKILLs itself at its kill_step-th training
    forward, in the first attempt only (TORCHELASTIC_RESTART_COUNT 0), like a machine losing a process;
    with raise_instead it raises a ValueError there instead, like a bug or bad data on one worker.
    """

    def __init__(
        self, hidden: int = 32, kill_rank: int | None = None, kill_step: int | None = None, raise_instead: bool = False
    ):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))
        self.kill_rank, self.kill_step, self.raise_instead, self.steps = kill_rank, kill_step, raise_instead, 0

    def forward(self, x):
        if self.training and self.kill_step is not None:
            self.steps += 1
            first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT") == "0"
            if first_attempt and os.environ.get("RANK") == str(self.kill_rank) and self.steps == self.kill_step:
                if self.raise_instead:
                    raise ValueError(f"worker {self.kill_rank} met a NaN in its batch at step {self.steps}")
                os.kill(os.getpid(), signal.SIGKILL)
        return self.net(x)


def build_mlp(
    hidden: int = 32, kill_rank: int | None = None, kill_step: int | None = None, raise_instead: bool = False
) -> FragileMLP:
    return FragileMLP(hidden, kill_rank, kill_step, raise_instead)
