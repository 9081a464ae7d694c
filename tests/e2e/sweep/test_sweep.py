"""`optcli sweep`: every grid combination as its own run, shared steps computed once, the Pareto front and the best
variant under the recipe's gates, --resume after an interruption."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import EXPORT, digits_recipe, run_cli, write_recipe

from optcli.verbs.sweeper import choose_best, expand, pareto_front, parse_grid

FAST = {"latency": {"batch_sizes": [1], "warmup": 0, "runs": 3, "threads": 1}}
PASSES = [EXPORT, {"type": "quantize", "mode": "dynamic"}]
GRID = ["--grid", "passes.1.mode=dynamic,static", "--grid", "passes.1.per_channel=false,true"]


def test_pareto_front_on_known_points():
    # x minimized (size), y maximized (accuracy)
    points = [(10, 0.90), (5, 0.80), (5, 0.85), (20, 0.95), (20, 0.90), (None, 1.0), (7, 0.85), (5, 0.85), (30, 0.95)]
    assert pareto_front(points) == [0, 2, 3, 7]  # (5,.85) twice (ties stay), (10,.9), (20,.95); (30,.95) is beaten
    assert pareto_front([(1, 0.1), (2, 0.2), (3, 0.3)]) == [0, 1, 2]  # a clean trade-off: all on the front
    assert pareto_front([(1, 0.9), (2, 0.2), (3, 0.3)]) == [0]  # one point better on both
    assert pareto_front([(1, 5.0), (2, 1.0), (3, 3.0)], higher_is_better=False) == [0, 1]  # mse: lower is better
    assert pareto_front([]) == []


def test_best_is_the_smallest_variant_that_passes_every_gate():
    rows = [
        {"x": 100, "metric": 0.9, "passed": True},
        {"x": 50, "metric": 0.7, "passed": False},  # smallest, but a gate failed
        {"x": 80, "metric": 0.8, "passed": True},
        {"x": 80, "metric": 0.85, "passed": True},  # same size, better metric
        {"x": 10, "metric": 0.99, "passed": True, "error": "pass 2-quantize failed"},
    ]
    assert choose_best(rows) == 3
    assert choose_best([{"x": 1, "metric": 1.0, "passed": False}]) is None


def test_grid_from_the_command_line_expands_to_every_combination():
    grid = parse_grid(["passes.1.mode=dynamic,static", "passes.2=on,off", "passes.0.opset=[17, 18]"])
    assert grid == {"passes.1.mode": ["dynamic", "static"], "passes.2": [True, False], "passes.0.opset": [17, 18]}
    raw = {"passes": [{"type": "export"}, {"type": "quantize"}, {"type": "prune"}]}
    variants = expand(grid, raw)
    assert len(variants) == 8 and len({v.name for v in variants}) == 8
    assert variants[0].name == "mode-dynamic_prune-on_opset-17"
    assert variants[-1].overrides == ['passes.1.mode="static"', "passes.2=null", "passes.0.opset=18"]


def sweep_rows(out: Path) -> dict:
    return {r["name"]: r for r in json.loads((out / "sweep.json").read_text())["variants"]}


@pytest.fixture
def sweep_recipe(digits, tmp_path):
    return write_recipe(tmp_path, digits_recipe(digits, PASSES, report=FAST, gates={"max_accuracy_drop": 0.05}))


def test_two_by_two_sweep_shares_the_export_and_picks_the_best_under_the_gates(sweep_recipe, tmp_path):
    out = tmp_path / "sweep"
    result = run_cli("sweep", sweep_recipe, "-o", out, *GRID, "--jobs", "2")
    assert result.exit_code == 0, result.stderr
    rows = sweep_rows(out)
    assert sorted(rows) == sorted(f"mode-{m}_per_channel-{p}" for m in ("dynamic", "static") for p in ("off", "on"))
    # the export is the same step for all four: computed by exactly one variant, reused by the three others
    ran_export = [n for n, r in rows.items() if "1-export" in r["ran_steps"]]
    assert len(ran_export) == 1, rows
    assert all(r["reused_steps"] == {"1-export": "step cache"} for n, r in rows.items() if n not in ran_export)
    assert all(r["ran_steps"] == ["2-quantize"] for n, r in rows.items() if n not in ran_export)
    assert len(list((out / "cache").glob("1-export-*/model.onnx"))) == 1
    for name, row in rows.items():  # each variant is a complete run of its own, with the grid values applied
        report = json.loads((out / name / "report.json").read_text())
        quant = report["recipe"]["passes"][1]
        assert (quant["mode"], quant["per_channel"]) == (
            row["values"]["passes.1.mode"],
            row["values"]["passes.1.per_channel"],
        )
        assert row["size_bytes"] == report["steps"][-1]["size_bytes"] == (out / name / "model.onnx").stat().st_size
        assert row["passed"] == report["passed"]
    # Pareto front and best, re-derived from the rows independently
    front = {
        n
        for n, r in rows.items()
        if not any(
            o["size_bytes"] <= r["size_bytes"]
            and o["metric"] >= r["metric"]
            and (o["size_bytes"] < r["size_bytes"] or o["metric"] > r["metric"])
            for o in rows.values()
        )
    }
    assert {n for n, r in rows.items() if r["pareto"]} == front
    passing = [r for r in rows.values() if r["passed"]]
    best = min(passing, key=lambda r: (r["size_bytes"], -r["metric"]))
    sweep = json.loads((out / "sweep.json").read_text())
    assert sweep["best"] == best["name"] and rows[best["name"]]["best"]
    assert (out / "best").resolve() == (out / best["name"]).resolve()
    md = (out / "sweep.md").read_text()
    assert all(name in md for name in rows) and "★ best" in md
    html = (out / "sweep.html").read_text()
    assert html.count('class="variant') == 4 and 'data-chart="pareto"' in html
    assert best["name"] in result.stdout  # the terminal table names it

    # Gates tightened so the best variant fails: with --resume nothing is computed again, the next one is chosen
    limit = best["size_bytes"] - 1
    again = run_cli("sweep", sweep_recipe, "-o", out, *GRID, "--resume", "--set", f"gates.max_size_bytes={limit}")
    rows2 = sweep_rows(out)
    assert all(r["ran_steps"] == [] for r in rows2.values()), rows2
    under = [r for r in rows2.values() if r["size_bytes"] <= limit and r["metric"] is not None]
    if under:
        assert again.exit_code == 0
        assert (
            json.loads((out / "sweep.json").read_text())["best"]
            == min(under, key=lambda r: (r["size_bytes"], -r["metric"]))["name"]
        )
    # A gate nobody can pass: exit 1, no best link
    none = run_cli("sweep", sweep_recipe, "-o", out, *GRID, "--resume", "--set", "gates.max_size_bytes=1")
    assert none.exit_code == 1, none.stderr
    assert json.loads((out / "sweep.json").read_text())["best"] is None and not os.path.lexists(out / "best")


@pytest.mark.system
def test_interrupted_sweep_resumes_with_the_finished_variants_reused(sweep_recipe, tmp_path):
    out = tmp_path / "sweep"
    args = [sys.executable, "-m", "optcli", "sweep", str(sweep_recipe), "-o", str(out), *GRID]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seen = []
    try:
        for line in proc.stderr:  # stop it while the second variant runs
            seen.append(line)
            if re.search(r"variant 2/4", line):
                break
        else:
            pytest.fail("".join(seen))
        proc.send_signal(signal.SIGINT)
        rest = proc.stderr.read()
        assert proc.wait(timeout=120) == 130, "".join(seen) + rest
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not (out / "sweep.json").exists() and not (out / ".optcli.lock").exists()
    first = "mode-dynamic_per_channel-off"
    assert (out / first / "report.json").is_file()
    again = run_cli("sweep", sweep_recipe, "-o", out, *GRID, "--resume")
    assert again.exit_code == 0, again.stderr
    rows = sweep_rows(out)
    assert rows[first]["ran_steps"] == [] and len(rows) == 4
    assert sum("1-export" in r["ran_steps"] for r in rows.values()) == 0  # the export finished before the interrupt


def test_bad_grid_is_refused_before_any_work(sweep_recipe, tmp_path):
    out = tmp_path / "sweep"
    bad = run_cli("sweep", sweep_recipe, "-o", out, "--grid", "passes.1.mode=dynamic,sideways")
    assert bad.exit_code == 2 and "mode-sideways" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
    assert not out.exists()
    none = run_cli("sweep", sweep_recipe, "-o", out)
    assert none.exit_code == 2 and "--grid" in none.stderr and not out.exists()
