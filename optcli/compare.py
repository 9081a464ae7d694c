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


# --------------------------------------------------------------------------- what a person needs besides the rows


def _flat(value, prefix: str = "") -> dict:
    """{"passes[0].mode": "static", ...}: a recipe as dotted keys, for a line-by-line difference."""
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    if isinstance(value, list) and any(isinstance(v, (dict, list)) for v in value):
        out = {}
        for i, v in enumerate(value):
            out.update(_flat(v, f"{prefix}[{i}]"))
        return out
    return {prefix: value}


def recipe_changes(new: dict, old: dict, limit: int = 12) -> list[str]:
    """ "passes[0].mode: dynamic → static" for every recipe key whose value differs (old → new)."""
    a, b = _flat(new.get("recipe") or {}), _flat(old.get("recipe") or {})
    lines = []
    for key in dict.fromkeys([*b, *a]):
        if a.get(key) != b.get(key):
            lines.append(f"{key}: {_shown(b.get(key), key in b)} → {_shown(a.get(key), key in a)}")
    return lines[:limit] + ([f"... and {len(lines) - limit} more"] if len(lines) > limit else [])


def _shown(value, present: bool) -> str:
    if not present:
        return "(absent)"
    if value is None:
        return "—"
    if isinstance(value, (bool, list, dict)):
        return json.dumps(value)  # as the recipe spells it: true / false, [1, 32], not Python's True / [1, 32]
    return str(value)


def comparison_caveats(new: dict, old: dict) -> list[str]:
    """Why the two runs' figures may not be comparable: other evaluation inputs, another machine, a busy one."""
    from optcli.report.summary import busy_note

    out = []
    if (new.get("evaluation") or "") != (old.get("evaluation") or ""):
        out.append(
            f"accuracy/fidelity were measured on different inputs: new {new.get('evaluation')!r}, "
            f"baseline {old.get('evaluation')!r}"
        )
    env_new, env_old = new.get("environment") or {}, old.get("environment") or {}
    differ = [k for k in ("cpu", "cpu_count", "threads", "onnxruntime", "torch") if env_new.get(k) != env_old.get(k)]
    if differ:
        out.append(
            "timed on different machines or settings ("
            + ", ".join(f"{k}: {env_old.get(k)} → {env_new.get(k)}" for k in differ)
            + "): latency ratios compare the machines too"
        )
    for label, report in (("new", new), ("baseline", old)):
        note = busy_note(report)
        if note:
            out.append(f"{label} run: {note}")
    return out


def metric_direction(report: dict) -> str:
    """ "higher" or "lower": which way the accuracy metric of this report improves."""
    step = (report.get("steps") or [{}])[-1]
    metric = ((step.get("accuracy") or {}).get("metric") or "accuracy") if isinstance(step, dict) else "accuracy"
    return "lower" if metric == "mse" else "higher"


def explain(new_path: Path, old_path: Path) -> dict:
    """What `optcli compare` prints besides the rows: recipe changes and caveats (not part of --json)."""
    new, old = _load(new_path), _load(old_path)
    return {
        "recipe_changes": recipe_changes(new, old),
        "caveats": comparison_caveats(new, old),
        "accuracy_better": metric_direction(new),
    }


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
