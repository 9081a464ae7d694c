"""Sweep studies' decisions with fakes: the search space read from YAML, the Pareto front over the study's
objectives, the hypervolume, the trial budget, the study's page (no model, no Optuna storage)."""

from __future__ import annotations

import re

import pytest

from optcli.errors import BadInput
from optcli.verbs.study.front import dominates, front_indices, hypervolume
from optcli.verbs.study.space import Param, grid_space, load_space, parse_param, values_to_overrides


def test_space_reads_ranges_log_ranges_integers_choices_and_pass_switches(tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text(
        "space:\n"
        "  passes.1.lr: {low: 1.0e-5, high: 1.0e-2, log: true}\n"
        "  passes.1.epochs: {low: 2, high: 12}\n"
        "  passes.0.sparsity: {low: 0.3, high: 0.7, step: 0.1}\n"
        "  passes.3: [true, false]\n"
        "  passes.3.mode: {choices: [dynamic, static]}\n"
    )
    params = {p.key: p for p in load_space(space, {"passes.2.opset": [17, 18]})}
    lr, epochs, sparsity = params["passes.1.lr"], params["passes.1.epochs"], params["passes.0.sparsity"]
    assert (lr.kind, lr.low, lr.high, lr.log) == ("float", 1e-5, 1e-2, True)
    assert (epochs.kind, epochs.low, epochs.high) == ("int", 2, 12)
    assert sparsity.grid_values() == [0.3, 0.4, 0.5, 0.6, 0.7]
    assert params["passes.3.mode"].switch == "passes.3" and params["passes.3"].choices == (True, False)
    assert params["passes.2.opset"].choices == (17, 18)  # --grid keys join the space as choices
    assert epochs.grid_values() == list(range(2, 13))
    with pytest.raises(BadInput, match="passes.1.lr.*step"):  # a grid cannot enumerate a continuous range
        grid_space([lr])


@pytest.mark.parametrize(
    ("key", "spec", "says"),
    [
        ("passes.1.lr", {"low": 1e-2, "high": 1e-5}, "low <= high"),
        ("passes.1.lr", {"low": 0, "high": 1, "log": True}, "log range needs low > 0"),
        ("passes.1.lr", {"low": 1, "hi": 2}, "unknown: hi"),
        ("passes.1.mode", [], "one choice or more"),
        ("passes.1.mode", [{"a": 1}], "plain values"),
        ("passes.1.mode", ["static", "static"], "listed twice"),
        ("lr", [1], "recipe path"),
        ("passes.1.lr", "fast", "list of choices or a range"),
    ],
)
def test_space_mistakes_name_the_key_and_how_to_write_it(key, spec, says):
    with pytest.raises(BadInput, match=says) as e:
        parse_param(key, spec)
    assert key in str(e.value) and "\n" not in str(e.value)


def test_trial_values_become_set_items_and_a_dropped_pass_takes_its_keys_with_it():
    values = {
        "passes.1.lr": 0.001,
        "passes.1.epochs": 3,
        "passes.3": False,
        "passes.3.mode": "static",
        "passes.2": True,
    }
    assert values_to_overrides(values) == ["passes.1.lr=0.001", "passes.1.epochs=3", "passes.3=null"]


def test_pareto_front_over_three_objectives_on_known_points():
    dirs = ["maximize", "minimize", "minimize"]  # accuracy up, latency down, size down
    points = [
        [0.95, 1.0, 100],  # 0: best accuracy
        [0.90, 0.5, 100],  # 1: fastest
        [0.90, 0.6, 50],  # 2: smallest
        [0.89, 0.6, 60],  # 3: beaten by 2 on every objective
        None,  # 4: failed trial: on no front
        [0.90, 0.5, 100],  # 5: equal to 1: both stay
    ]
    assert front_indices(points, dirs) == [0, 1, 2, 5]
    assert dominates([0.9, 0.6, 50], [0.89, 0.6, 60], [1, -1, -1])
    assert not dominates([0.9, 0.5, 100], [0.9, 0.5, 100], [1, -1, -1])
    assert front_indices([[1.0, 2.0], [2.0, 1.0]], ["minimize", "minimize"]) == [0, 1]


def test_hypervolume_of_a_front_is_the_area_it_dominates():
    # accuracy up, size down, reference (0, 10): two boxes 0.5x8 and 0.9x4 overlapping in 0.5x4 -> 4 + 3.6 - 2
    hv = hypervolume([[0.5, 2.0], [0.9, 6.0]], ["maximize", "minimize"], [0.0, 10.0])
    assert hv == pytest.approx(0.5 * 8 + 0.9 * 4 - 0.5 * 4)
    assert hypervolume([[0.5, 12.0]], ["maximize", "minimize"], [0.0, 10.0]) == 0.0  # beyond the reference


def test_budget_counts_retries_once_and_ignores_trials_refused_as_over_budget():
    from types import SimpleNamespace

    from optuna.trial import TrialState

    from optcli.verbs.study.worker import counted

    def t(number, state, user=None, system=None):
        return SimpleNamespace(number=number, state=state, user_attrs=user or {}, system_attrs=system or {})

    trials = [
        t(0, TrialState.COMPLETE),
        t(1, TrialState.FAIL),  # killed, retried as 3
        t(2, TrialState.FAIL, user={"error": "pass 2-quantize failed"}),  # a real failure: spends budget
        t(3, TrialState.RUNNING, system={"failed_trial": 1, "retry_history": [1]}),
        t(4, TrialState.PRUNED, user={"over_budget": True}),
    ]
    assert [x.number for x in counted(trials)] == [0, 2, 3]


def test_grid_values_of_an_int_range_with_a_step():
    assert Param("passes.1.epochs", "int", 1, 9, step=4).grid_values() == [1, 5, 9]


def test_study_page_draws_the_front_history_and_importances_and_says_why_the_best_was_chosen():
    from optcli.report.sweep import progress_line, render_sweep_html, render_sweep_markdown

    def row(trial, metric, latency, size, state="complete", **extra):
        done = state == "complete"
        gates = (
            [{"name": "max_accuracy_drop", "limit": 0.05, "value": 0.98 - metric, "passed": metric > 0.93}]
            if done
            else []
        )
        return {
            "name": f"t{trial:03d}",
            "folder": f"t{trial:03d}",
            "trial": trial,
            "state": state,
            "values": {"passes.0.sparsity": 0.1 * trial},
            "metric": metric,
            "latency_ms": latency,
            "size_bytes": size,
            "x": size,
            "gates": gates,
            "passed": done and metric > 0.93,
            "pareto": False,
            "best": False,
            **extra,
        }

    rows = [
        row(0, 0.97, 1.0, 9000, pareto=True),
        row(1, 0.95, 0.5, 4000, pareto=True, best=True),
        row(2, 0.90, 0.4, 3000, pareto=True),  # smaller, but fails the gate
        row(3, None, None, None, state="failed", error="its worker stopped", retried_as=4),
        row(4, None, None, None, state="running"),
    ]
    sweep = {
        "recipe": "r.yaml",
        "grid": {"passes.0.sparsity": None},
        "minimize": "size",
        "metric": "accuracy",
        "variants": rows,
        "pareto": ["t000", "t001", "t002"],
        "best": "t001",
        "passed": True,
        "errors": [],
        "importances": {"metric": {"passes.0.sparsity": 1.0}},
        "study": {
            "name": "s",
            "storage": "study.journal",
            "sampler": "tpe",
            "trials": 10,
            "objectives": ["metric", "latency", "size"],
            "directions": ["maximize", "minimize", "minimize"],
            "counts": {"complete": 3, "running": 1, "waiting": 0, "failed": 1, "retried": 1},
        },
    }
    assert progress_line(sweep) == "3/10 trials done, 1 running, 1 failed (1 retried), Pareto front: 3"
    html = render_sweep_html(sweep)
    for chart in ("pareto", "history", "importance"):
        assert f'data-chart="{chart}"' in html
    assert html.count('class="variant') == 3  # the finished trials only; radius grows with size
    radii = [float(x) for x in re.findall(r'class="variant[^"]*" cx="[\d.]+" cy="[\d.]+" r="([\d.]+)"', html)]
    assert radii[0] > radii[1] > radii[2]
    assert html.count('class="failed"') == 1  # the killed trial, in the history
    assert "smallest size on disk" in html and "t001 passes every gate" in html
    md = render_sweep_markdown(sweep)
    assert "failed, retried as trial 4" in md and "| running |" in md
