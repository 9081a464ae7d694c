"""What the search aims for and how a trial is judged against it: the target as a threshold on the baseline, which
trial wins, and the int8-versus-fp32 speed verdict. Pure decisions, no model run."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from optcli.abtest import FAILS, HOLDS, INCONCLUSIVE
from optcli.config import higher_is_better
from optcli.measure import FIDELITY_METRICS


@dataclass
class Goal:
    metric: str
    threshold: float
    baseline: float
    higher_better: bool

    def meets(self, value: float | None) -> bool:
        if value is None or not np.isfinite(value):
            return False
        return value >= self.threshold - 1e-12 if self.higher_better else value <= self.threshold + 1e-12

    def better(self, a: float | None, b: float | None) -> bool:
        if a is None:
            return False
        if b is None:
            return True
        return a > b if self.higher_better else a < b

    def relation(self) -> str:
        return ">=" if self.higher_better else "<="


def make_goal(target, reference_value: float) -> Goal:
    """The recipe's target (min_value, or max_drop / max_increase from the reference model's own score) as a
    threshold."""
    if target.metric in FIDELITY_METRICS:
        higher = FIDELITY_METRICS[target.metric][1]
    else:
        higher = higher_is_better(target.metric)
    if target.min_value is not None:
        threshold = target.min_value
    elif target.max_increase is not None:  # a lower-is-better metric (the config allows it for no other)
        threshold = reference_value * (1 + target.max_increase)
    else:
        threshold = reference_value - target.max_drop if higher else reference_value + target.max_drop
    return Goal(target.metric, float(threshold), float(reference_value), higher)


def best_trial(trials: list, goal: Goal):
    """The winner among measured int8 trials still on disk: the fastest meeting the goal (an untimed one ranks
    last), else the one whose metric comes closest. None when no trial was measured."""
    done = [
        t
        for t in trials
        if t.settings is not None and t.metric is not None and np.isfinite(t.metric) and t.path is not None
    ]
    if not done:
        return None
    meeting = [t for t in done if t.meets]
    if meeting:
        return min(meeting, key=lambda t: t.latency_ms if t.latency_ms is not None else float("inf"))
    best = done[0]
    for t in done[1:]:
        if goal.better(t.metric, best.metric):
            best = t
    return best


def faster_verdict(ratio) -> str:
    """int8 faster than fp32: holds when the whole interval of int8/fp32 time is below 1, fails when it is at or
    above 1 (as fast at best), inconclusive when the machine's noise straddles 1."""
    if ratio is None:
        return INCONCLUSIVE
    return HOLDS if ratio.high < 1.0 else FAILS if ratio.low >= 1.0 else INCONCLUSIVE
