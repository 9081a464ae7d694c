"""What a run amounts to, in the terms a user compares with: each step against the step before it and against
the first ONNX step (the baseline), one verdict sentence, and the caveats that decide whether to trust it
(a slower final artifact, a busy machine while timing).

Pure functions over the report dict (standard library only), shared by report.json and every view.
Every ratio here is new / reference: time and size alike, so < 1× is better for both.
"""

from __future__ import annotations

import math
from typing import Any, TypeGuard

from optcli.config import higher_is_better

# A final artifact at least this much slower than its reference is called slower (timing noise stays below it).
SLOWER = 1.05
# p99 / p50 above this in one latency loop: other work kept interrupting the measurement.
JITTER = 3.0
# What to do about a speed verdict whose confidence interval straddles its limit (optcli.abtest).
INCONCLUSIVE_HINT = "rerun on a quiet machine or with more report.latency.runs"


def _finite(x: Any) -> TypeGuard[float]:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _steps(report: dict) -> list[dict]:
    return [s for s in (report.get("steps") or []) if isinstance(s, dict)]


def _latency(step: dict) -> dict:
    lat = step.get("latency")
    return lat if isinstance(lat, dict) else {}


def _p50(step: dict, key: str) -> Any:
    entry = _latency(step).get(key)
    return entry.get("p50_ms") if isinstance(entry, dict) else None


def _accuracy(step: dict) -> Any:
    acc = step.get("accuracy")
    return acc.get("value") if isinstance(acc, dict) else None


def _div(a: Any, b: Any) -> float | None:
    return round(float(a) / float(b), 4) if _finite(a) and _finite(b) and b else None


def baseline_index(report: dict) -> int:
    """The step the user compares with: the first ONNX step (the fp32 export of a torch model, or an ONNX
    original); the original when no step is ONNX."""
    for i, step in enumerate(_steps(report)):
        if step.get("format") == "onnx":
            return i
    return 0


def versus(step: dict, ref: dict) -> dict:
    """step / ref: size and p50 time ratios per batch size (< 1 is better), the accuracy's difference in points,
    or the relative change in % of a metric that is not a share (perplexity)."""
    out: dict[str, Any] = {"step": ref.get("name"), "size": _div(step.get("size_bytes"), ref.get("size_bytes"))}
    for key in _latency(step):
        out[f"p50_{key}"] = _div(_p50(step, key), _p50(ref, key))
    a, b = _accuracy(step), _accuracy(ref)
    out["accuracy_pt"] = out["metric_change_pct"] = None
    if _finite(a) and _finite(b):
        if _is_share(step, a) and _is_share(ref, b):
            out["accuracy_pt"] = round((a - b) * 100, 4)
        elif b:  # perplexity, mse, a metric of the user's on another scale: points of it mean nothing
            out["metric_change_pct"] = round((a / b - 1) * 100, 4)
    return out


def _is_share(step: dict, value: float) -> bool:
    """A metric read in points: a share between 0 and 1 where higher is better (accuracy, F1, agreement)."""
    return 0.0 <= value <= 1.0 and higher_is_better(_metric(step))


def step_comparisons(report: dict) -> list[dict]:
    """Per step: {"vs_previous": ..., "vs_baseline": ...} (None for the step itself / the original)."""
    all_steps = _steps(report)
    base = baseline_index(report)
    out = []
    for i, step in enumerate(all_steps):
        out.append(
            {
                "vs_previous": versus(step, all_steps[i - 1]) if i else None,
                "vs_baseline": versus(step, all_steps[base]) if i > base else None,
            }
        )
    return out


def _times(x: float) -> str:
    return f"{x:.2f}×" if x < 9.95 else f"{x:.0f}×"


def _batch(key: str) -> str:
    return "b" + key.removeprefix("batch_")


def verdict_sentence(report: dict) -> str:
    """ "2-quantize: 2.8× smaller, 1.78× faster at b32 and 1.03× slower at b1 than 1-export, accuracy −0.0 pt"."""
    said = (report.get("generation") or {}).get("verdict")
    if said:  # a decoder LLM's: speed is decode tokens/s, cost is perplexity and agreement (optcli.llm.run)
        return str(said)
    all_steps = _steps(report)
    if len(all_steps) < 2:
        return ""
    final = all_steps[-1]
    base = baseline_index(report)
    ref = all_steps[base] if base < len(all_steps) - 1 else all_steps[0]
    v = versus(final, ref)
    parts = []
    size = v["size"]
    if size is not None:
        parts.append(
            "the same size"
            if abs(size - 1) < 0.005
            else f"{_times(1 / size)} smaller"
            if size < 1
            else f"{_times(size)} bigger"
        )
    faster: list[str] = []
    slower: list[str] = []
    same: list[str] = []
    side = side_by_side(report, ref)
    for key in sorted(_latency(final), key=lambda k: int(k.removeprefix("batch_")) if k[6:].isdigit() else 0):
        t = v.get(f"p50_{key}")
        if key in side:  # timed side by side: the ratio and its interval, not two p50s taken apart
            t, (low, high) = side[key]["time_ratio"], side[key]["interval"]
            if low <= 1 <= high:
                same.append(f"{_batch(key)} (within noise, {_times(low)}–{_times(high)} the time)")
                continue
        if t is None:
            continue
        if abs(t - 1) < 0.005:
            same.append(_batch(key))
        elif t < 1:
            faster.append(f"{_times(1 / t)}{'' if faster else ' faster'} at {_batch(key)}")
        else:
            slower.append(f"{_times(t)}{'' if slower else ' slower'} at {_batch(key)}")
    speed = " and ".join(p for p in (", ".join(faster), ", ".join(slower)) if p)
    if same:
        speed = " and ".join(p for p in (speed, f"as fast at {', '.join(same)}") if p)
    if speed:
        parts.append(speed)
    sentence = f"{final.get('name')}: {', '.join(parts) or 'measured'} than {ref.get('name')}"
    if v["accuracy_pt"] is not None:
        sentence += f", {_metric(final)} {_signed(v['accuracy_pt'], 1)} pt"
    elif v["metric_change_pct"] is not None:
        sentence += f", {_metric(final)} {_signed(v['metric_change_pct'], 1)} %"
    else:
        fid = final.get("fidelity") or {}
        cos, agree = fid.get("cosine_mean"), fid.get("top1_agreement")
        errors = [o.get("max_relative_error") for o in fid.get("outputs") or [] if o.get("kind") == "value"]
        errors = [e for e in errors if _finite(e)]
        judged = [f"cosine {cos:.4g}"] if _finite(cos) else []
        # A probability's cosine is 1 whatever it did, a classifier's hides changed labels: say the judgement too.
        judged += [f"top-1 agreement {agree:.4g}"] if _finite(agree) and agree < 1 else []
        judged += [f"max error {max(errors):.3g} × the range"] if errors else []
        if judged:
            sentence += f", fidelity {', '.join(judged)} against the original"
    return sentence


def side_by_side(report: dict, ref: dict) -> dict:
    """report["speed"] per batch key when it was timed against ref (the runner's interleaved A/B), else {}."""
    speed = report.get("speed")
    if not isinstance(speed, dict) or speed.get("baseline") != ref.get("name"):
        return {}
    return {
        k: v
        for k, v in speed.items()
        if isinstance(v, dict)
        and _finite(v.get("time_ratio"))
        and isinstance(v.get("interval"), list)
        and len(v["interval"]) == 2
        and all(_finite(x) for x in v["interval"])
    }


def _metric(step: dict) -> str:
    acc = step.get("accuracy")
    return str(acc.get("metric") or "accuracy") if isinstance(acc, dict) else "accuracy"


def _signed(x: float, digits: int) -> str:
    text = f"{x:+.{digits}f}"
    return text.replace("-", "−")  # a real minus sign, as in "−0.0 pt"


def slower_warning(report: dict) -> str:
    """A loud line when the final artifact takes longer than its baseline (or than the original) at any batch."""
    all_steps = _steps(report)
    if len(all_steps) < 2:
        return ""
    final, base = all_steps[-1], all_steps[baseline_index(report)]
    for ref in [base] if base is all_steps[0] else [base, all_steps[0]]:
        if ref is final:
            continue
        v = versus(final, ref)
        side = side_by_side(report, ref)
        for key, entry in side.items():  # side by side: slower only when the whole interval says so
            v[f"p50_{key}"] = entry["time_ratio"] if entry["interval"][0] > 1 else None
        slow = [
            f"{v[k]:.2f}× the time at {_batch(k.removeprefix('p50_'))}"
            for k in sorted(v)
            if k.startswith("p50_") and v[k] is not None and v[k] >= SLOWER
        ]
        if slow:
            return (
                f"{final.get('name')} is SLOWER than {ref.get('name')} ({', '.join(slow)}): it did not pay on "
                "this machine; set gates.min_speedup to fail the run on it"
            )
    return ""


def busy_note(report: dict) -> str:
    """Why the timings may not be trusted: the machine was busy (load above the cores) or a loop was jittery."""
    cores = (report.get("environment") or {}).get("cpu_count")
    load, jitter, where = None, None, ""
    for step in _steps(report):
        for key, entry in _latency(step).items():
            if not isinstance(entry, dict):
                continue
            la = entry.get("load_average")
            if _finite(la) and (load is None or la > load):
                load = la
            p50, p99 = entry.get("p50_ms"), entry.get("p99_ms")
            if _finite(p50) and _finite(p99) and p50 > 0 and (jitter is None or p99 / p50 > jitter):
                jitter, where = p99 / p50, f"{step.get('name')} {_batch(key)}"
    reasons = []
    if _finite(load) and _finite(cores) and load > cores:
        reasons.append(f"load average {load:.1f} on {cores} cores")
    if jitter is not None and jitter > JITTER:
        reasons.append(f"p99 was {jitter:.0f}× p50 in {where}")
    if not reasons:
        return ""
    return (
        f"timings not trustworthy: the machine was busy while measuring ({'; '.join(reasons)}); "
        "rerun on a quiet machine before acting on latency figures"
    )


def summary(report: dict) -> dict:
    """report.json's "summary": the verdict sentence, the baseline step, and the caveats (empty when none)."""
    all_steps = _steps(report)
    return {
        "verdict": verdict_sentence(report),
        "baseline": all_steps[baseline_index(report)].get("name") if all_steps else None,
        "slower": slower_warning(report),
        "busy": busy_note(report),
    }
