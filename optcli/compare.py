"""`optcli compare NEW OLD`: what changed between two runs' final artifacts, and whether it regressed."""

from __future__ import annotations

import json
from pathlib import Path

from optcli.errors import BadInput
from optcli.measure import higher_is_better


def _load(path: Path) -> dict:
    try:
        report = json.loads(path.read_text())
        report["steps"][-1]
        return report
    except FileNotFoundError:
        raise BadInput(f"{path} not found") from None
    except (ValueError, KeyError, IndexError, TypeError):
        raise BadInput(f"{path} is not an optcli report.json") from None


def _final(report: dict) -> dict:
    step = report["steps"][-1]
    acc = (step.get("accuracy") or {}).get("value")
    fid = step.get("fidelity") or {}
    return {
        "size_bytes": step["size_bytes"],
        "compressed_bytes": step["compressed_bytes"],
        "sparsity": step["sparsity"],
        "accuracy": acc,
        "cosine_mean": fid.get("cosine_mean"),
        **{f"p50_ms@{k}": v["p50_ms"] for k, v in step["latency"].items()},
    }


def compare_reports(new: Path, old: Path) -> dict:
    a, b = _final(_load(new)), _final(_load(old))
    rows = []
    for key in dict.fromkeys([*a, *b]):
        va, vb = a.get(key), b.get(key)
        ratio = round(va / vb, 4) if isinstance(va, (int, float)) and isinstance(vb, (int, float)) and vb else None
        rows.append({"metric": key, "new": va, "baseline": vb, "ratio": ratio})
    return {"new": str(new), "baseline": str(old), "rows": rows}


def regression_checks(
    new: Path,
    base: Path,
    max_latency_regression: float | None = None,
    max_accuracy_drop: float | None = None,
    max_size_growth: float | None = None,
) -> list[dict]:
    """Regression limits of `optcli compare NEW BASE` (BASE: a main-branch run in CI), each a check shaped like a
    gate {name, limit, value, passed, note}. Latency and size as fractions of the baseline (0.05 = 5% slower/larger allowed); accuracy in metric units."""
    a, b = _load(new)["steps"][-1], _load(base)["steps"][-1]
    checks = []
    if max_latency_regression is not None:
        shared = [k for k in (b.get("latency") or {}) if k in (a.get("latency") or {})]
        growth = {
            k: a["latency"][k]["p50_ms"] / b["latency"][k]["p50_ms"] - 1 for k in shared if b["latency"][k]["p50_ms"]
        }
        worst = max(growth, key=growth.get) if growth else None
        checks.append(
            {
                "name": "max_latency_regression",
                "limit": max_latency_regression,
                "value": round(growth[worst], 6) if worst else None,
                "passed": worst is not None and growth[worst] <= max_latency_regression,
                "note": f"p50, slowest batch size ({worst.replace('batch_', 'batch ')})"
                if worst
                else "no batch size measured in both reports",
            }
        )
    if max_accuracy_drop is not None:
        acc_a, acc_b = a.get("accuracy") or {}, b.get("accuracy") or {}
        if acc_a.get("value") is None or acc_b.get("value") is None:
            checks.append(
                {
                    "name": "max_accuracy_drop",
                    "limit": max_accuracy_drop,
                    "value": None,
                    "passed": False,
                    "note": "accuracy not measured in both reports (data.eval with labels)",
                }
            )
        else:
            sign = 1 if higher_is_better(acc_b.get("metric", "accuracy")) else -1
            drop = sign * (acc_b["value"] - acc_a["value"])
            checks.append(
                {
                    "name": "max_accuracy_drop",
                    "limit": max_accuracy_drop,
                    "value": round(drop, 6),
                    "passed": drop <= max_accuracy_drop + 1e-12,
                    "note": f"{acc_b.get('metric', 'accuracy')}: {acc_b['value']} -> {acc_a['value']}",
                }
            )
    if max_size_growth is not None:
        growth = a["size_bytes"] / b["size_bytes"] - 1 if b.get("size_bytes") else None
        checks.append(
            {
                "name": "max_size_growth",
                "limit": max_size_growth,
                "value": round(growth, 6) if growth is not None else None,
                "passed": growth is not None and growth <= max_size_growth + 1e-12,
                "note": f"size on disk: {b.get('size_bytes')} -> {a.get('size_bytes')} bytes",
            }
        )
    return checks
