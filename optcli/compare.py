"""`optcli compare NEW OLD`: what changed between two runs' final artifacts."""

from __future__ import annotations

import json
from pathlib import Path

from optcli.errors import BadInput


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
