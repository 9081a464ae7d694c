"""Feedback on long work: bars on a terminal, plain lines in CI logs, nothing with --quiet, stdout kept for --json."""

from __future__ import annotations

import json
import re

from conftest import EXPORT, digits_recipe, run_subprocess, write_recipe

PASSES = [EXPORT, {"type": "quantize", "mode": "static"}]
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
