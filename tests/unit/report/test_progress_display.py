"""Feedback on long work drawn on fake consoles (no model run): bars with k of n and the fields, training progress with
loss, metric and samples per second. The CLI runs are in tests/e2e/cli/test_progress.py."""

from __future__ import annotations

import io
import re

from rich.console import Console

from optcli.report.terminal import EpochProgress, LineFeedback, RichFeedback, feedback


def test_terminal_bars_show_k_of_n_and_the_fields_then_clear():
    out = io.StringIO()
    fb = RichFeedback(Console(file=out, force_terminal=True, width=120))
    with fb.task("2-quantize: search trials", total=3) as task:
        for best in (0.91, 0.95, 0.97):
            task.advance(best=f"int8 {best}")
        task.set(note="done")  # set() redraws now; advance() leaves it to Rich's refresh thread
    fb.log("2-quantize: chose int8")
    fb.close()
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", out.getvalue())
    assert "search trials" in text and "3/3" in text and "best int8 0.97" in text
    assert "optcli 2-quantize: chose int8" in text
    assert not fb.live  # the live display is gone once no task runs


def test_training_progress_reports_loss_metric_and_samples_per_second():
    out = io.StringIO()
    bar = EpochProgress(LineFeedback(out), epochs=2)
    task = bar.epoch(1, steps=3)
    for _ in range(3):
        bar.update(task, advance=1, loss=0.25, rate=1234.0)
    bar.update(task, metric="accuracy 0.9700")
    bar.close()
    assert re.fullmatch(
        r"optcli train epoch 1/2: 3/3  loss 0\.2500  samples/s 1234  accuracy 0\.9700 \(\d+\.\d s\)\n", out.getvalue()
    )
    assert feedback(quiet=True).task("anything", total=3) is not None  # --quiet: a task that shows nothing
