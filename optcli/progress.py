"""The progress protocol: what long work (calibration, search trials, epochs, benchmarks) reports to the person
waiting, and the silent default. Standard library only, so passes and distributed workers can report progress
without importing Rich; optcli.report.terminal implements it (a live bar on a terminal, plain lines elsewhere).
"""

from __future__ import annotations


class ProgressTask:
    """One piece of long work (calibration, search trials, an epoch, benchmarking): advance() it, set() its fields."""

    def advance(self, n: int = 1, **fields) -> None: ...

    def set(self, **fields) -> None: ...

    def close(self) -> None: ...

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Feedback:
    """What a run tells the person waiting for it, all on stderr: log lines and progress. Silent with --quiet;
    a Rich live bar on a terminal; elsewhere (CI logs, pipes) one plain line per task at most every few seconds
    and when it ends. Passes get it through their Context (ctx.progress) and never print themselves."""

    def log(self, message: str) -> None: ...

    def task(self, description: str, total: int | None = None, **fields) -> ProgressTask:
        return ProgressTask()

    def close(self) -> None: ...


SILENT = Feedback()


class EpochProgress:
    """The training progress (loss, metric, samples/s per epoch) through a Feedback; silent when given none.

    enabled: the run's Feedback, or False / None for silence (a worker that does not show progress)."""

    def __init__(self, enabled: Feedback | bool | None, epochs: int):
        self.feedback = enabled if isinstance(enabled, Feedback) else SILENT
        self.epochs = epochs
        self.current: ProgressTask | None = None

    def epoch(self, epoch: int, steps: int):
        self.close()
        self.current = self.feedback.task(f"train epoch {epoch}/{self.epochs}", total=steps)
        return self.current

    def update(self, task, advance: int = 0, **fields):
        shown = {}
        if "loss" in fields:
            shown["loss"] = f"{fields['loss']:.4f}"
        if fields.get("metric"):
            shown[""] = fields["metric"]  # already "accuracy 0.9712"
        if "rate" in fields:
            shown["samples/s"] = f"{fields['rate']:.0f}"
        task.advance(advance, **shown)

    def close(self):
        if self.current is not None:
            self.current.close()
            self.current = None
