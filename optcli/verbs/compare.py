"""`optcli compare NEW OLD`: what changed between two runs' final artifacts, and whether it regressed."""

from __future__ import annotations

import json
from pathlib import Path

from optcli.config import higher_is_better
from optcli.errors import BadInput


def _load(path: Path) -> dict:
    """A report.json validated against the report contract (optcli.report.model), as a dict."""
    from pydantic import ValidationError

    from optcli.report import model

    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise BadInput(f"{path} not found") from None
    except (OSError, ValueError) as e:
        raise BadInput(
            f"{path} is not an optcli report.json ({type(e).__name__}): pass the report.json of an optcli run"
        ) from None
    if not isinstance(data, dict) or "steps" not in data or "optcli_version" not in data:
        raise BadInput(
            f"{path} is not an optcli report.json (no optcli_version and steps): pass the report.json of an optcli run"
        )
    version = data.get("schema_version", model.UNVERSIONED)
    if not isinstance(version, int) or isinstance(version, bool):
        raise BadInput(f"{path}: schema_version {version!r} is not a number: pass the report.json of an optcli run")
    if version > model.SCHEMA_VERSION:
        raise BadInput(
            f"{path} has report schema_version {version}, newer than this optcli reads ({model.SCHEMA_VERSION}): "
            "upgrade optcli to compare it"
        )
    while version < model.SCHEMA_VERSION:
        if version not in model.MIGRATIONS:
            raise BadInput(
                f"{path} has report schema_version {version}, older than this optcli reads "
                f"({model.SCHEMA_VERSION}): rerun that recipe with this optcli to compare with it"
            )
        data, version = model.MIGRATIONS[version](data), version + 1
    data["schema_version"] = model.SCHEMA_VERSION
    try:
        report = model.Report.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(x) for x in first["loc"])
        raise BadInput(
            f"{path} is not a valid optcli report.json: {where}: {first['msg']}: pass the report.json of an optcli run"
        ) from None
    if not report.steps or report.steps[-1].size_bytes is None:
        raise BadInput(f"{path} is not an optcli report.json (no measured step): pass the report.json of an optcli run")
    return data


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


def final_artifact(report_path: Path, report: dict) -> tuple[Path | None, str]:
    """The report's final artifact on disk, found next to report.json (a moved or copied output folder) or at the
    recorded path, and only if it still holds the bytes the report measured; else (None, why not)."""
    from optcli.steps import sha256_file

    output = report.get("output") or {}
    recorded = output.get("path")
    if not recorded:
        return None, f"{report_path} names no output artifact"
    for path in (report_path.parent / Path(recorded).name, Path(recorded)):
        if path.exists():
            if output.get("sha256") and sha256_file(path) != output["sha256"]:
                return None, f"{path} changed since {report_path} measured it"
            return path, ""
    return None, f"the artifact of {report_path} ({Path(recorded).name}) is not on disk next to it"


def _input_shapes(report: dict) -> list[str]:
    """--shape strings from the report's recipe (model.inputs), for artifacts whose inputs the file leaves free."""
    specs = ((report.get("recipe") or {}).get("model") or {}).get("inputs") or []
    return [
        f"{s['name']}={'x'.join(str(d) for d in s['shape'])}:{s.get('dtype') or 'float32'}"
        for s in specs
        if s.get("shape") and all(isinstance(d, int) for d in s["shape"])
    ]


def latency_regression(
    new_path: Path, base_path: Path, new: dict, base: dict, limit: float, inconclusive: str = "pass"
) -> dict:
    """Both final artifacts re-timed side by side in this process (abtest): the p50s in the two reports were taken
    at different times, on a machine whose load changed in between, so their ratio cannot decide an exit code."""
    from optcli.abtest import INCONCLUSIVE, INCONCLUSIVE_HINT, passed, verdict_at_most, worst

    check = {"name": "max_latency_regression", "limit": limit}
    found = [final_artifact(p, r) for p, r in ((new_path, new), (base_path, base))]
    missing = [why for path, why in found if path is None]
    if missing:
        return {
            **check,
            "value": None,
            "interval": None,
            "verdict": INCONCLUSIVE,
            "passed": passed(INCONCLUSIVE, inconclusive),
            "note": "not re-timed side by side ("
            + "; ".join(missing)
            + "): two p50s taken at different times do not decide a regression",
        }
    (new_file, _), (base_file, _) = found
    assert new_file is not None and base_file is not None, "missing is empty: both were found"
    ratios = _retime(new_file, base_file, new, base)
    if not ratios:
        return {
            **check,
            "value": None,
            "interval": None,
            "verdict": INCONCLUSIVE,
            "passed": passed(INCONCLUSIVE, inconclusive),
            "note": "no batch size of report.latency.batch_sizes that both artifacts take",
        }
    key, r = max(ratios.items(), key=lambda kv: kv[1].value)
    verdict = worst([verdict_at_most(x.low - 1, x.high - 1, limit) for x in ratios.values()])
    return {
        **check,
        "value": round(r.value - 1, 6),
        "interval": [round(r.low - 1, 4), round(r.high - 1, 4)],
        "verdict": verdict,
        "passed": passed(verdict, inconclusive),
        "note": f"new time over baseline's - 1, re-timed side by side ({r.rounds} rounds × {r.runs} runs), "
        f"slowest batch size ({key.replace('batch_', 'batch ')}), 95% interval"
        + (f"; inconclusive: {INCONCLUSIVE_HINT}" if verdict == INCONCLUSIVE else ""),
    }


def _retime(new_artifact: Path, base_artifact: Path, new: dict, base: dict) -> dict:
    from optcli.abtest import compare_runners
    from optcli.artifact import load_any
    from optcli.measure import runner_for

    spec = ((new.get("recipe") or {}).get("report") or {}).get("latency") or {}
    threads = spec.get("threads") or 1
    runners = [
        runner_for(load_any(path, _input_shapes(report)), threads)
        for path, report in ((base_artifact, base), (new_artifact, new))
    ]
    return compare_runners(
        runners[0], runners[1], spec.get("batch_sizes") or [1], spec.get("warmup", 10), spec.get("runs", 100)
    )


def regression_checks(
    new: Path,
    base: Path,
    max_latency_regression: float | None = None,
    max_accuracy_drop: float | None = None,
    max_size_growth: float | None = None,
    inconclusive: str = "pass",
) -> list[dict]:
    """Regression limits of `optcli compare NEW BASE` (BASE: a main-branch run in CI), each a check shaped like a
    gate {name, limit, value, passed, note}. Latency and size as fractions of the baseline (0.05 = 5% slower/larger allowed); accuracy in metric units.
    Latency is re-timed side by side and carries a verdict and interval; inconclusive counts as the user chose."""
    new_report, base_report = _load(new), _load(base)
    a, b = new_report["steps"][-1], base_report["steps"][-1]
    checks = []
    if max_latency_regression is not None:
        checks.append(latency_regression(new, base, new_report, base_report, max_latency_regression, inconclusive))
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
