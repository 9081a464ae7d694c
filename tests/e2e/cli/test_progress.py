"""Feedback on long work: bars on a terminal, plain lines in CI logs, nothing with --quiet, stdout kept for --json."""

from __future__ import annotations

import io
import json
import re

from conftest import digits_recipe, run_subprocess, write_recipe
from rich.console import Console

from optcli.report.terminal import EpochProgress, LineFeedback, RichFeedback, feedback

PASSES = [{"type": "export"}, {"type": "quantize", "mode": "static"}]
REPORT = {"latency": {"batch_sizes": [1], "warmup": 1, "runs": 4, "threads": 1}}


def test_json_stdout_stays_pure_and_progress_lines_go_to_stderr(digits, tmp_path):
    recipe = write_recipe(tmp_path, digits_recipe(digits, PASSES, report=REPORT))
    result = run_subprocess("run", recipe, "-o", tmp_path / "out", "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["steps"][-1]["name"] == "2-quantize"  # nothing but JSON on stdout
    # stderr is not a terminal here: one plain line per task when it ends, with its count
    calib = re.search(r"^optcli 2-quantize: calibration: (\d+)/(\d+) \(", result.stderr, re.M)
    assert calib and calib.group(1) == calib.group(2) != "0", result.stderr
    assert re.search(r"^optcli model\.onnx: latency batch 1: 5/5 \(", result.stderr, re.M), result.stderr
    assert "\x1b[" not in result.stderr and "\r" not in result.stderr  # no bar redrawing in a log


def test_quiet_prints_nothing_but_the_json(digits, tmp_path):
    recipe = write_recipe(tmp_path, digits_recipe(digits, PASSES, report=REPORT))
    result = run_subprocess("run", recipe, "-o", tmp_path / "out", "--json", "--quiet")
    assert result.exit_code == 0 and result.stderr == ""
    assert json.loads(result.stdout)["passed"] is True


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
