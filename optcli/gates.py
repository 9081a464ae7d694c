"""Gates: the recipe's promises (accuracy drop, fidelity, size, speed-up) and those a pass adds, checked on the steps."""

from __future__ import annotations

from optcli.measure import higher_is_better

DEFAULT_MIN_COSINE = 0.99
DEFAULT_MAX_DROP = 0.01  # one point of accuracy: NNCF's quantize_with_accuracy_control max_drop default
# Agreement with the original's decisions (argmax per sample, per position of a sequence, or an integer output):
# at 0.99 at most 1 in 100 predictions changed, so the accuracy cannot drop by more than the 1 pt that NNCF's
# accuracy control (max_drop 0.01) and Olive's accuracy goals are usually given. A cosine cannot promise that:
# 0.999 still lets 7 % of a classifier's labels change when its scores are close.
DEFAULT_MIN_AGREEMENT = 0.99
# A value output (a probability, a regression): the worst sample may move by a tenth of the range the original's
# values cover on these inputs. int8 moves a healthy output by a few steps of 1/255 of its range; a probability
# that jumps from 0.1 to 0.9 is a different answer.
DEFAULT_MAX_VALUE_ERROR = 0.1


SHRINKING_PASSES = ("quantize", "prune", "cluster", "convert")


def default_gates(steps: list[dict], baseline: int) -> list[dict]:
    """The promises kept when a recipe names no gates, both deterministic (no timing): the final artifact is no
    bigger than the baseline (the first ONNX step, or the original), and keeps cosine >= 0.99 when quantized (the
    accuracy within 1 pt instead, when a finetune changed the outputs on purpose and labelled eval data measures it)."""
    # The baseline even when it is the final step: an export alone changes the format, and a torch checkpoint's
    # size says nothing about the ONNX graph's.
    last, base = steps[-1], steps[min(baseline, len(steps) - 1)]
    # Sizes compare only within one file format (a .pt state_dict and a .pt2 program differ by their containers).
    suffix = str(last.get("path") or "").rsplit(".", 1)[-1]
    if str(base.get("path") or "").rsplit(".", 1)[-1] != suffix:
        # The first same-format step before anything shrank; none (a .pt checkpoint pruned into .pt2): no size gate.
        first_shrink = next((i for i, s in enumerate(steps) if s.get("type") in SHRINKING_PASSES), len(steps))
        same = [s for s in steps[:first_shrink] if str(s.get("path") or "").rsplit(".", 1)[-1] == suffix]
        base = same[0] if same else last
    results = []
    # Only where a pass is meant to shrink the model: an fp32 rewrite (prepare, optimize) may add shape annotations.
    shrinks = any(s.get("type") in SHRINKING_PASSES for s in steps) and base is not last
    # Zeroed or shared weights (prune, cluster) pay off in the compressed file, not in the dense one on disk.
    key = "compressed_bytes" if any(s.get("type") in ("prune", "cluster") for s in steps) else "size_bytes"
    if shrinks and last.get(key) and base.get(key):
        value = round(last[key] / base[key], 4)
        results.append(
            {
                "name": "max_size_ratio (default)",
                "limit": 1.0,
                "value": value,
                "passed": last[key] <= base[key],
                "note": f"final {key.replace('_', ' ')} over {base['name']}'s; the recipe names no gates "
                "(gates: {} turns this off)",
            }
        )
    if any(s.get("type") == "quantize" for s in steps) and _trained_with_accuracy(steps):
        # A fine-tune changes the outputs on purpose (a pruned or clustered model retrained beats the original's
        # accuracy with a cosine to it below 0.99): the promise is then the accuracy, not the original's outputs.
        first = steps[0]
        drop = first["accuracy"]["value"] - last["accuracy"]["value"]
        results.append(
            {
                "name": "max_accuracy_drop (default)",
                "limit": DEFAULT_MAX_DROP,
                "value": round(drop, 6),
                "passed": drop <= DEFAULT_MAX_DROP + 1e-12,
                "note": "a finetune changed the outputs on purpose, so the default promise is the eval accuracy "
                "(within 1 pt of the original's), not the cosine to the original; the recipe names no gates",
            }
        )
    elif any(s.get("type") == "quantize" for s in steps):
        results += fidelity_gates(last.get("fidelity") or {})
    return results


# (gate name, the kinds it judges, the per-output figure, the limit, higher is better, what the figure is)
_FIDELITY_JUDGES = (
    (
        "min_fidelity_cosine",
        ("classes", "sequence", "embedding", "tensor"),
        "cosine_mean",
        DEFAULT_MIN_COSINE,
        True,
        "cosine",
    ),
    (
        "min_top1_agreement",
        ("classes", "labels"),
        ("top1_agreement", "agreement"),
        DEFAULT_MIN_AGREEMENT,
        True,
        "top-1 agreement",
    ),
    (
        "min_position_agreement",
        ("sequence",),
        "position_agreement",
        DEFAULT_MIN_AGREEMENT,
        True,
        "agreement per position",
    ),
    (
        "max_value_error",
        ("value",),
        "max_relative_error",
        DEFAULT_MAX_VALUE_ERROR,
        False,
        "max error / the original's range",
    ),
)


def fidelity_gates(fidelity: dict, limits: dict | None = None) -> list[dict]:
    """Gates on a quantized artifact's fidelity, each output judged in its own terms (measure.output_kind): class
    scores by top-1 agreement (and cosine), sequences by agreement per position (and cosine), a value by its error
    relative to the original's range, embeddings and other tensors by cosine. The worst output decides; the gate
    names it. With `limits` ({gate name: limit}, the recipe's gates) only those gates, else every judgement that
    applies to the outputs with its default limit."""
    outputs = fidelity.get("outputs")
    if outputs is None:  # a report from before per-output fidelity: its first output's cosine
        outputs = [{"name": "output_0", "kind": "classes", "cosine_mean": fidelity.get("cosine_mean")}]
    default = limits is None
    suffix = " (default)" if default else ""
    results = []
    for name, kinds, keys, limit, higher, what in _FIDELITY_JUDGES:
        if limits is not None:
            if limits.get(name) is None:
                continue
            limit = limits[name]
        keys = (keys,) if isinstance(keys, str) else keys
        judged = [o for o in outputs if o.get("kind") in kinds]
        if not judged:
            if limits is not None:  # the user asked for it: say why it cannot hold
                kinds_seen = ", ".join(f"{o.get('name')} ({o.get('kind')})" for o in outputs) or "none"
                note = f"no output is judged by {what} (outputs: {kinds_seen})"
                results.append({"name": name + suffix, "limit": limit, "value": None, "passed": False, "note": note})
            continue
        figures = [(next((o.get(k) for k in keys if o.get(k) is not None), None), o) for o in judged]
        missing = [o for v, o in figures if v is None]
        worst_value, worst = (None, missing[0]) if missing else (min if higher else max)(figures, key=lambda f: f[0])
        passed = worst_value is not None and (worst_value >= limit - 1e-12 if higher else worst_value <= limit + 1e-12)
        label = f"output {worst.get('name')!r} ({worst.get('kind')})"
        note = f"{what}, worst of {len(judged)} outputs: {label}" if len(judged) > 1 else f"{what} of {label}"
        if worst.get("note"):
            note += f": {worst['note']}"
        if default:
            note += "; the recipe names no gates"
        results.append({"name": name + suffix, "limit": limit, "value": worst_value, "passed": passed, "note": note})
    return results


def _trained_with_accuracy(steps: list[dict]) -> bool:
    """A finetune in the chain, and a fraction-valued accuracy (accuracy, top5) measured on the original and last step."""
    first, last = steps[0], steps[-1]
    measured = [(s.get("accuracy") or {}).get("metric") for s in (first, last)]
    return any(s.get("type") == "finetune" for s in steps) and all(m in ("accuracy", "top5") for m in measured)


def check_gates(gates, steps: list[dict], defaults: bool = False, baseline: int = 0) -> list[dict]:
    """The recipe's gates; with defaults (the recipe has no `gates:` at all) the default ones instead."""
    first, last = steps[0], steps[-1]
    if defaults:
        return default_gates(steps, baseline) + _pass_gates(steps)
    results = []
    if gates.max_accuracy_drop is not None:
        if first["accuracy"] is None or last["accuracy"] is None:
            results.append(
                {
                    "name": "max_accuracy_drop",
                    "limit": gates.max_accuracy_drop,
                    "value": None,
                    "passed": False,
                    "note": "no labelled eval data (data.eval with labels)",
                }
            )
        else:
            sign = 1 if higher_is_better(first["accuracy"]["metric"]) else -1
            drop = sign * (first["accuracy"]["value"] - last["accuracy"]["value"])
            results.append(
                {
                    "name": "max_accuracy_drop",
                    "limit": gates.max_accuracy_drop,
                    "value": round(drop, 6),
                    "passed": drop <= gates.max_accuracy_drop + 1e-12,
                }
            )
    asked = {name: getattr(gates, name, None) for name, *_ in _FIDELITY_JUDGES}
    if any(v is not None for v in asked.values()):
        results += fidelity_gates(last.get("fidelity") or {}, asked)
    if gates.max_size_bytes is not None:
        results.append(
            {
                "name": "max_size_bytes",
                "limit": gates.max_size_bytes,
                "value": last["size_bytes"],
                "passed": last["size_bytes"] <= gates.max_size_bytes,
            }
        )
    if gates.min_speedup is not None:
        speedups = [
            first["latency"][b]["p50_ms"] / last["latency"][b]["p50_ms"]
            for b in first["latency"]
            if b in last["latency"]
        ]
        value = round(min(speedups), 4) if speedups else None
        results.append(
            {
                "name": "min_speedup",
                "limit": gates.min_speedup,
                "value": value,
                "passed": value is not None and value >= gates.min_speedup,
                "note": "slowest batch size, p50",
            }
        )
    if gates.max_perplexity_increase is not None:
        results.append(_perplexity_gate(gates.max_perplexity_increase, first, last))
    return results + _pass_gates(steps)


def _pass_gates(steps: list[dict]) -> list[dict]:
    # A pass can hold its own promise to the user (a quantize target): it lists gates in details["gates"].
    return [
        {**gate, "name": f"{step['name']}: {gate['name']}"}
        for step in steps[1:]
        for gate in (step.get("details") or {}).get("gates") or []
    ]


def _perplexity_gate(limit: float, first: dict, last: dict) -> dict:
    """Relative rise of the eval perplexity over the original's: (last - first) / first."""
    gate = {"name": "max_perplexity_increase", "limit": limit, "value": None, "passed": False}
    before, after = first.get("accuracy") or {}, last.get("accuracy") or {}
    if before.get("metric") != "perplexity" or after.get("metric") != "perplexity":
        return {**gate, "note": "no perplexity measured (data.eval text with a causal-lm model, metric: perplexity)"}
    value = (after["value"] - before["value"]) / before["value"]
    return {**gate, "value": round(value, 6), "passed": value <= limit + 1e-12, "note": "fraction of fp32 perplexity"}


def near_gate_warnings(gates: list[dict]) -> list[str]:
    """Gates that passed with little headroom. For scores bounded by 1 (cosine, agreement), headroom is measured against 1 - limit."""
    out = []
    for g in gates:
        value, limit = g["value"], g["limit"]
        if not (g["passed"] and isinstance(value, (int, float)) and isinstance(limit, (int, float)) and limit):
            continue
        bounded = "cosine" in g["name"] or "agreement" in g["name"]  # both at most 1
        scale = 1 - limit if bounded and 0 < limit < 1 else abs(limit)
        if abs(value - limit) <= 0.05 * scale:
            out.append(f"gate {g['name']} passed within 5% of its limit ({value} vs {limit})")
    return out
