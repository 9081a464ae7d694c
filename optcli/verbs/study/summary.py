"""A study's state as the sweep dict that sweep.json|md|html render: one row per trial, the Pareto front over
the study's objectives, the best trial under the recipe's gates, Optuna's parameter importances, the history.

Only what the storage says is taken as finished: a trial is COMPLETE once its worker told its objective values,
after its run wrote report.json; a killed worker's folder is never read as a result.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from optcli.verbs.study.front import front_indices, row_values

if TYPE_CHECKING:
    from optuna.trial import FrozenTrial

STATES = ("complete", "running", "waiting", "failed")


def _state(t) -> str:
    name = t.state.name.lower()
    return "failed" if name == "fail" else name


def trial_rows(study) -> list[dict]:
    from optcli.verbs.study.worker import counted

    trials = study.get_trials(deepcopy=False)
    keep = {t.number for t in counted(trials)} | {t.number for t in trials if t.state.name == "FAIL"}
    retried_as = {}
    for t in trials:
        for n in [*(t.system_attrs.get("retry_history") or [])]:
            retried_as[n] = t.number
    rows = []
    for t in trials:
        if t.number not in keep or t.user_attrs.get("over_budget"):
            continue
        attrs = t.user_attrs
        folder = attrs.get("folder") or f"t{t.number:03d}"
        values = attrs.get("values") or dict(t.params)
        state = _state(t)
        if state == "complete" and attrs.get("row"):
            row = dict(attrs["row"])
        else:
            row = {"name": folder, "values": values, "folder": folder, "x": None, "metric": None, "gates": []}
            row["passed"] = False
            row["error"] = attrs.get("error") if state == "failed" else None
            if state == "failed":
                row["exit_code"] = attrs.get("exit_code")
        start, end = t.datetime_start, t.datetime_complete
        row.update(
            trial=t.number,
            state=state,
            retried_as=retried_as.get(t.number),
            seconds=row.get("seconds") or (round((end - start).total_seconds(), 3) if start and end else None),
            finished_at=end.isoformat() if end else None,
            objective_values=list(t.values) if t.values else None,
        )
        rows.append(row)
    return rows


def importances(study, objectives: list[str]) -> dict[str, dict[str, float]]:
    """Optuna's parameter importances (its default evaluator), per objective; empty until there are enough
    finished trials with more than one value of a parameter."""
    import optuna

    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if len(complete) < 2 or not any(t.params for t in complete):
        return {}
    out = {}
    for i, name in enumerate(objectives):
        # The evaluator ranks what leads to low target values: a maximized objective is negated.
        sign = -1.0 if study.directions[i] == optuna.study.StudyDirection.MAXIMIZE else 1.0
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "computes the importances ... to achieve low target": as meant
                imp = optuna.importance.get_param_importances(study, target=_signed(i, sign))
        except Exception:  # too few distinct values, a conditional space the evaluator cannot split
            continue
        out[name] = {k: round(float(v), 4) for k, v in imp.items() if math.isfinite(v)}
    return out


def _signed(i: int, sign: float) -> Callable[[FrozenTrial], float]:
    """Objective i of a trial times sign (a function per objective: a lambda in the loop would see the last i)."""
    return lambda t: sign * t.values[i]


def summarize_study(study, meta: dict, out: Path, with_importances: bool = True) -> dict:
    """The sweep dict of the study now; meta is study.json (recipe, objectives, minimize, sampler, budget)."""
    from optcli import __version__
    from optcli.verbs.study.front import directions
    from optcli.verbs.sweeper import choose_best, original_figures, sweep_busy

    objectives = meta["objectives"]
    rows = trial_rows(study)
    counts = {s: sum(r["state"] == s for r in rows) for s in STATES}
    counts["retried"] = sum(r.get("retried_as") is not None for r in rows)
    higher = next((r["higher_is_better"] for r in rows if "higher_is_better" in r), meta.get("higher_is_better", True))
    dirs = directions(objectives, higher)
    points = [row_values(r, objectives) if r["state"] == "complete" else None for r in rows]
    front = set(front_indices(points, dirs))
    complete = [i for i, r in enumerate(rows) if r["state"] == "complete"]
    best_local = choose_best([rows[i] for i in complete])
    best = complete[best_local] if best_local is not None else None
    for i, r in enumerate(rows):
        r["pareto"] = i in front
        r["best"] = i == best
    reports = []
    for i in complete[:50]:  # the original's figures and the busy caveat come from the runs' own reports
        try:
            reports.append({"report": json.loads((Path(out) / rows[i]["folder"] / "report.json").read_text())})
        except (OSError, ValueError):
            continue
    failed = [
        r for r in rows if r["state"] == "failed" and r.get("retried_as") is None and r.get("error") != "interrupted"
    ]
    return {
        "optcli_version": __version__,
        "recipe": meta["recipe"],
        "grid": {p: None for p in meta["space"]},  # the table's columns: the space's keys
        "space": meta["space"],
        "minimize": meta["minimize"],
        "study": {
            "name": meta["study"],
            "storage": meta["storage"],
            "sampler": meta["sampler"],
            "trials": meta["trials"],
            "objectives": objectives,
            "directions": dirs,
            "counts": counts,
        },
        "original": original_figures(reports, meta["minimize"]),
        "metric": next((r["metric_name"] for r in rows if r.get("metric_name")), None),
        "higher_is_better": higher,
        "variants": rows,
        "pareto": [r["name"] for r in rows if r["pareto"]],
        "best": rows[best]["name"] if best is not None else None,
        "passed": best is not None,
        "errors": [
            {"variant": r["name"], "error": r.get("error") or "failed", "exit_code": r.get("exit_code") or 3}
            for r in failed
        ],
        "importances": importances(study, objectives) if with_importances else {},
        "busy": sweep_busy(reports),
    }
