"""What a study optimizes and how its trials are compared: objectives read from a trial's row, the Pareto front
over any number of them, the hypervolume a front covers.

A row is sweeper.variant_row's: metric (accuracy, or fidelity cosine without labels), latency_ms (p50, first
batch size), size_bytes, compressed_bytes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal, TypeGuard

Direction = Literal["minimize", "maximize"]  # what optuna.create_study takes

OBJECTIVES = {"metric": "metric", "latency": "latency_ms", "size": "size_bytes", "compressed": "compressed_bytes"}
DEFAULT_OBJECTIVES = ("metric", "latency", "size")


def check_objectives(names: Sequence[str]) -> list[str]:
    from optcli.errors import BadInput

    names = list(names)
    bad = [n for n in names if n not in OBJECTIVES]
    if bad or not names or len(set(names)) < len(names):
        raise BadInput(
            f"sweep objectives {', '.join(bad or names)}: name each once, from {', '.join(OBJECTIVES)} "
            "(e.g. --objective metric --objective latency)"
        )
    return names


def directions(names: Sequence[str], metric_higher_is_better: bool) -> list[Direction]:
    """Optuna's study directions: the metric up (down for a loss such as mse), the costs down."""
    return ["maximize" if n == "metric" and metric_higher_is_better else "minimize" for n in names]


def row_values(row: dict, names: Sequence[str]) -> list[float] | None:
    """The objective values of a finished trial, or None when one is missing (not measured)."""
    values = [row.get(OBJECTIVES[n]) for n in names]
    finite = [float(v) for v in values if _finite(v)]
    return finite if len(finite) == len(values) else None


def _finite(x: object) -> TypeGuard[float]:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def dominates(a: Sequence[float], b: Sequence[float], signs: Sequence[int]) -> bool:
    """a beats b: no worse on every objective, better on one (signs: +1 maximize, -1 minimize)."""
    better = False
    for x, y, s in zip(a, b, signs, strict=True):
        if s * x < s * y:
            return False
        better = better or s * x > s * y
    return better


def front_indices(points: Sequence[Sequence[float] | None], dirs: Sequence[str]) -> list[int]:
    """Indices of the points no other point dominates (equal points all stay); None points are on no front."""
    signs = [1 if d == "maximize" else -1 for d in dirs]
    ok = {i: p for i, p in enumerate(points) if p is not None}
    return [i for i, p in ok.items() if not any(dominates(q, p, signs) for j, q in ok.items() if j != i)]


def hypervolume(points: Sequence[Sequence[float]], dirs: Sequence[str], reference: Sequence[float]) -> float:
    """The volume the points dominate up to the reference point (Optuna's WFG algorithm, on minimized values)."""
    import numpy as np
    from optuna._hypervolume import compute_hypervolume  # Optuna's own, as its samplers and visualization use

    signs = np.array([-1.0 if d == "maximize" else 1.0 for d in dirs])
    ref = np.asarray(reference, dtype=float) * signs
    pts = np.asarray([p for p in points], dtype=float).reshape(-1, len(dirs)) * signs
    pts = pts[np.all(pts < ref, axis=1)]
    if len(pts) == 0:
        return 0.0
    return float(compute_hypervolume(pts, ref))
