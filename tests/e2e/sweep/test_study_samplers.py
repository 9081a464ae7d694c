"""The study's other samplers and budgets, run the way a user types them: random and NSGA-II over a space where a
pass may be dropped (its own keys then not asked), and --time-budget ending a worker's study however many trials
--trials would allow."""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from conftest import EXPORT, digits_recipe, run_cli, write_recipe

FAST = {"latency": {"batch_sizes": [1], "warmup": 0, "runs": 3, "threads": 1}}
PASSES = [EXPORT, {"type": "quantize", "mode": "dynamic", "allow_slower": True}]
# Pass 1 (the int8 quantize) kept or dropped; per_channel only means something when it is kept.
SWITCH_SPACE = {"passes.1": [True, False], "passes.1.per_channel": [True, False]}


@pytest.fixture
def recipe(digits, tmp_path) -> Path:
    return write_recipe(tmp_path, digits_recipe(digits, PASSES, report=FAST, gates={"max_accuracy_drop": 0.05}))


def space_file(tmp_path: Path, space: dict) -> Path:
    path = tmp_path / "space.yaml"
    path.write_text(json.dumps(space))  # JSON is YAML
    return path


@pytest.mark.parametrize("sampler", ["random", "nsga2"])
def test_random_and_nsga2_spend_the_budget_and_a_dropped_pass_takes_its_keys_with_it(recipe, tmp_path, sampler):
    out = tmp_path / "study"
    space = space_file(tmp_path, SWITCH_SPACE)
    result = run_cli("sweep", recipe, "-o", out, "--space", space, "--sampler", sampler, "--trials", "3", "-q")
    assert result.exit_code == 0, result.stderr
    sweep = json.loads((out / "sweep.json").read_text())
    assert sweep["study"]["sampler"] == sampler and sweep["study"]["counts"]["complete"] == 3
    assert [r["state"] for r in sweep["variants"]] == ["complete"] * 3
    for row in sweep["variants"]:
        report = json.loads((out / row["folder"] / "report.json").read_text())
        types = [p["type"] for p in report["recipe"]["passes"]]
        if row["values"]["passes.1"]:
            assert types == ["export", "quantize"], row
            assert report["recipe"]["passes"][1]["per_channel"] == row["values"]["passes.1.per_channel"]
        else:
            # define-by-run: the sampler was not asked for a key of a pass that is not there
            assert types == ["export"] and "passes.1.per_channel" not in row["values"], row
        assert len(row["objective_values"]) == 3  # accuracy, latency, size: the default objectives
    assert any(r["pareto"] for r in sweep["variants"])


def test_time_budget_starts_no_trial_after_it_is_spent(recipe, tmp_path):
    out = tmp_path / "study"
    space = space_file(tmp_path, {"passes.1.per_channel": [True, False], "passes.1.reduce_range": [True, False]})
    began = datetime.now()
    result = run_cli(
        "sweep", recipe, "-o", out, "--space", space, "--sampler", "random", "--trials", "20", "--time-budget", "1"
    )
    assert result.exit_code == 0, result.stderr
    assert "time budget spent" in result.stderr
    sweep = json.loads((out / "sweep.json").read_text())
    rows = sweep["variants"]
    assert 1 <= sweep["study"]["counts"]["complete"] < 20 and all(r["state"] == "complete" for r in rows)
    # each trial started (finished less its seconds) inside the budget, whatever it then took to finish
    starts = [datetime.fromisoformat(r["finished_at"]) - timedelta(seconds=r["seconds"]) for r in rows]
    tz = starts[0].tzinfo
    began = began.astimezone(tz) if tz else began
    assert all(s <= began + timedelta(seconds=1.5) for s in starts), (began, starts)
