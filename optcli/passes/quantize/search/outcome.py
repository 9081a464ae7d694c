"""What the search leaves in the report: the `search` block of the step's details (every candidate, the fallback
nodes, the plan, the profile of the chosen model), its gates, and the warnings a user must read. The block's shape
is the report's contract: keys are added, never renamed."""

from __future__ import annotations

from dataclasses import replace

from optcli.abtest import FAILS, HOLDS, INCONCLUSIVE, INCONCLUSIVE_HINT
from optcli.passes.quantize import profile as prof
from optcli.passes.quantize.search.candidates import quantizable_nodes
from optcli.passes.quantize.search.engine import fmt


def search_block(search, fp32, chosen, exclude: set[str], ev, ratio, speed: str, searched_s: float, profile) -> dict:
    """ctx.details["search"]: the search as it ran, for the report and for CI."""
    goal = search.goal
    fallen = sorted(chosen.settings.exclude - frozenset(exclude), key=lambda n: -search.sensitivity.get(n, 0.0))
    return {
        "metric": goal.metric,
        "target": goal.threshold,
        "baseline": goal.baseline,
        "higher_is_better": goal.higher_better,
        "chosen": chosen.name,
        "chosen_config": chosen.settings.summary(),
        "candidates": [t.row(t is chosen) for t in search.trials],
        "fallback_nodes": [
            {"node": n, "sensitivity": round(search.sensitivity[n], 6) if n in search.sensitivity else None}
            for n in fallen
        ],
        "quantizable_nodes": search.quantizable_count,
        "sensitivity": {n: round(v, 6) for n, v in sorted(search.sensitivity.items(), key=lambda kv: -kv[1])},
        "fp32_latency_ms": fp32.latency_ms,
        "versus_fp32": None
        if ratio is None
        else {
            "time_ratio": round(ratio.value, 4),
            "interval": ratio.interval,
            "verdict": speed,
            "rounds": ratio.rounds,
            "runs": ratio.runs,
        },
        "race": search.race or None,
        "latency_batch": ev.latency_batch,
        "threads": ev.threads,
        "trials": search.trials_used(),
        "seconds": round(searched_s, 3),
        "notes": search.notes,
        "plan": search.plan,
        "skipped": {"count": sum(s["count"] for s in search.skipped), "why": [s["why"] for s in search.skipped]},
        "latency_fallback_nodes": [{"node": n, **search.slow_figures.get(n, {})} for n in chosen.slower_in_int8],
        "profile": profile,
    }


def target_gate(goal, chosen) -> dict:
    return {
        "name": f"target {goal.metric} {goal.relation()} {goal.threshold:.6g}",
        "limit": goal.threshold,
        "value": round(chosen.metric, 6),
        "passed": chosen.meets,
    }


def side_by_side(ratio) -> str:
    if ratio is None:
        return "not timed side by side"
    return (
        f"side by side int8/fp32 time {ratio.value:.3f}× (95% interval {ratio.interval[0]}-{ratio.interval[1]}, "
        f"{ratio.rounds} rounds)"
    )


def slower_note(fp32, chosen, ev, ratio, speed: str, profile: dict | None) -> str:
    """Why int8 is not faster here, with the figures that say so."""
    note = (
        f"int8 is not faster than fp32 here: {chosen.name} p50 {fmt(chosen.latency_ms)} ms vs fp32 {fmt(fp32.latency_ms)} ms "
        f"(batch {ev.latency_batch}, {ev.threads} threads); {side_by_side(ratio)}"
    )
    if speed == INCONCLUSIVE:
        note += f": inconclusive, {INCONCLUSIVE_HINT}"
    if profile:
        note += (
            f"; profiled kernel time int8 {profile['int8_total_ms']:.3f} ms vs fp32 {profile['fp32_total_ms']:.3f} ms, "
            f"{profile['fused']['int8_kernels']} int8 kernels and {profile['fused']['quantize_linear']} "
            f"QuantizeLinear / {profile['fused']['dequantize_linear']} DequantizeLinear in the session"
        )
    return note


def speed_gate(ratio, speed: str, note: str) -> dict:
    """ "int8 faster than fp32": the verdict, not `passed`, is the pass's word (the run turns inconclusive into
    passed as the user chose)."""
    return {
        "name": "int8 faster than fp32",
        "limit": 1.0,
        "value": round(ratio.value, 4) if ratio is not None else None,
        "interval": ratio.interval if ratio is not None else None,
        "verdict": speed,
        "passed": speed != FAILS,
        "note": note,
    }


def record_gates(config, ctx, goal, fp32, chosen, ev, ratio, speed: str, profile: dict | None) -> None:
    """ctx.details["gates"] and the warnings a missed target or a slower int8 deserve."""
    gates = [target_gate(goal, chosen)]
    if not chosen.meets:
        ctx.warn(
            f"no candidate met {goal.metric} {goal.relation()} {goal.threshold:.6g}; kept the best, {chosen.name} "
            f"({goal.metric} {chosen.metric:.6g}, p50 {fmt(chosen.latency_ms)} ms vs fp32 {fmt(fp32.latency_ms)} ms)"
        )
    faster = speed == HOLDS
    note = "" if faster else slower_note(fp32, chosen, ev, ratio, speed, profile)
    if not faster:
        ctx.warn(
            note
            + ("; kept because allow_slower: true" if config.allow_slower else "; set allow_slower: true to accept it")
        )
    if not config.allow_slower:
        if faster:
            note = f"int8/fp32 time ratio at batch {ev.latency_batch}; {side_by_side(ratio)}"
        gates.append(speed_gate(ratio, speed, note))
    ctx.details["gates"] = gates


def nonfinite_tensors(cache: dict) -> list[str]:
    """Tensors the static candidates' calibration found holding inf/NaN/huge values (ort.quantize_onnx's cache)."""
    return sorted({t for k, v in cache.items() if k != "dir" and k[0] == "inf" for t in v})


def chosen_profile(search, chosen, exclude: set[str], cache: dict) -> dict | None:
    """The report's view of what the session runs for the chosen model: per-op-type and per-region fp32 vs int8 ms,
    which compute nodes stayed fp32 and why."""
    source = search.sources[chosen.settings.source]
    try:
        comparison = search.compare(chosen)
    except Exception as e:
        search.notes.append(f"profile of the chosen model not taken ({type(e).__name__}: {str(e)[:120]})")
        return None
    every = set(quantizable_nodes(source, replace(chosen.settings, exclude=frozenset()), set()))
    quantized = set(quantizable_nodes(source, chosen.settings, set(chosen.settings.exclude)))
    why = why_fp32(search, chosen, every - quantized, exclude, set(nonfinite_tensors(cache)))
    fp32_nodes = set(why)
    ordered = sorted(comparison.rows, key=lambda r: -abs(r["int8_ms"] - r["fp32_ms"]))
    return {
        "fp32_total_ms": round(comparison.fp32_total_ms, 4),
        "int8_total_ms": round(comparison.int8_total_ms, 4),
        "unattributed_ms": {"fp32": round(comparison.fp32_other_ms, 4), "int8": round(comparison.int8_other_ms, 4)},
        "fused": prof.fused_counts(comparison.session_ops),
        "session_ops": comparison.session_ops,
        "op_types": prof.op_type_table(comparison, quantized, why),
        "regions": [
            {**r, "int8": r["node"] in quantized, "why_fp32": why.get(r["node"])}
            for r in ordered[:40]
            if r["node"] in quantized or r["node"] in fp32_nodes or r["node"] in every
        ],
    }


def why_fp32(search, chosen, kept: set[str], exclude: set[str], nonfinite: set[str]) -> dict[str, str]:
    """Why each compute node the chosen model keeps in fp32 stayed there (first reason that applies)."""
    why: dict[str, str] = {}
    for node in kept:
        if node in exclude:
            why[node] = "excluded in the recipe"
        elif node in chosen.slower_in_int8:
            why[node] = "slower in int8 here (profile)"
        elif node in search.sensitivity:
            why[node] = "accuracy (sensitivity fallback)"
        elif node in search.stem_fp32:
            why[node] = "accuracy (first convs kept fp32)"
        elif node in nonfinite:
            why[node] = "inf/NaN on calibration data"
    return why
