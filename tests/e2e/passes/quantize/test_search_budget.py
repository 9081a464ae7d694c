"""The search says its plan and time budget up front, shows progress against it, and stops when one more trial
cannot fit the budget."""

from __future__ import annotations

from conftest import EXPORT, digits_recipe, run_cli, write_recipe


def test_digits_search_reports_its_plan_estimate_and_skipped_count(digits, tmp_path):
    quantize = {
        "type": "quantize",
        "target": {"metric": "cosine", "min_value": 0.99},
        "allow_slower": True,
        "search": {"per_channel": [True], "max_trials": 3, "latency_runs": 2, "fallback": False},
    }
    recipe = digits_recipe(digits, [EXPORT, quantize])
    recipe["report"]["latency"]["batch_sizes"] = [8]
    result = run_cli("run", write_recipe(tmp_path, recipe), "-o", tmp_path / "out", "--json", "--quiet")
    assert result.exit_code in (0, 1), result.stderr
    search = result.json()["steps"][-1]["details"]["search"]
    plan = search["plan"]
    assert plan["max_trials"] == 3 and plan["time_budget_s"] == 1800 and 1 <= plan["candidates"] <= 3
    assert plan["line"].startswith(f"search: {plan['candidates']} candidates planned (max_trials 3), budget 30 min; ~")
    assert plan["estimate_s"] > 0 and plan["seconds_per_trial"] > 0
    assert search["skipped"] == {"count": 0, "why": []}
