"""What the search does after its base candidates, from the best of them: write the best without ORT's
pre-processing, send regions the profile shows slower in int8 back to fp32 (latency), keep a CNN's first convs in
fp32, and send the most sensitive nodes back to fp32 one by one until the target holds (accuracy).

Each function takes the running engine.Search (`search`): its budget, its trials and its notes."""

from __future__ import annotations

import shutil
from dataclasses import replace

from optcli.passes.quantize.search.candidates import quantizable_nodes
from optcli.passes.quantize.search.evaluation import head

# A candidate must be this much faster than the best one meeting the target (or fp32) to be worth a fallback.
NOISE = 0.95


def improve(search, fp32) -> None:
    """The fallbacks in order, each from the best trial so far, while the budget allows."""
    # What hand-tuning found on MiniLM: ORT's pre-processing can make the int8 graph slower; try the best without it.
    best = search.choose()
    if best is not None and "raw" in search.sources and best.settings.source == "input" and search.can_try():
        search.try_settings(replace(best.settings, source="raw"))
    best = search.choose()
    if best is not None and search.space.fallback and search.can_try():
        latency_fallback(search, best)
    best = search.choose()
    if best is not None and not best.meets and best.settings.source == "folded" and search.space.fallback:
        stem_fallback(search, best)
    done = [t for t in search.trials if t.settings is not None and t.metric is not None]
    if search.space.fallback and done and not any(t.meets for t in done) and not search.can_try():
        search.notes.append(
            "fallback skipped: " + ("time budget reached" if search.budget_spent() else "max_trials reached")
        )
    if search.space.fallback and done and search.can_try():
        base, best_latency = fallback_base(done, fp32, search.goal, search.config.allow_slower)
        if base is not None:
            accuracy_fallback(search, base, best_latency)


def fallback_base(done: list, fp32, goal, allow_slower: bool):
    """The trial the accuracy fallback starts from (the best-scoring one missing the target that is clearly
    faster than what already meets it, or than fp32), and the latency a fallback trial must beat."""
    meeting = [t for t in done if t.meets]
    # A candidate whose latency could not be measured ranks by its metric alone (no None < None).
    best_latency = min((t.latency_ms for t in meeting if t.latency_ms is not None), default=None)
    # Fallback can only pay off from a candidate faster than the best one that already meets the target.
    ceiling = best_latency if best_latency is not None else (fp32.latency_ms if not allow_slower else None)
    # Within timing noise (5%) of the ceiling, falling back nodes can only lose: skip those.
    pool = [t for t in done if not t.meets and (ceiling is None or (t.latency_ms or 0) < NOISE * ceiling)]
    if not pool:
        return None, best_latency
    return max(pool, key=lambda t: t.metric if goal.higher_better else -t.metric), best_latency


def rank(search, base, nodes: list[str]) -> list[str]:
    """Quantize-one-node sensitivity: metric lost when only this node is int8 (subset of data.eval)."""
    n = search.space.sensitivity_samples
    count = sum(len(next(iter(b.values()))) for b in head(search.ev.batches, n))
    reference_value = search.ev.score([r[:count] for r in search.ev.reference])
    for i, node in enumerate(nodes):
        if search.out_of_budget():
            search.notes.append(
                f"time budget reached while ranking: {len(nodes) - i} of {len(nodes)} nodes unranked (ranked last)"
            )
            break
        others = frozenset(x for x in nodes if x != node) | base.exclude
        path = search.write_candidate(replace(base, exclude=others), "sensitivity")
        try:
            value, _ = search.ev.measure(path, subset=n, timed=False)
        except Exception as e:
            search.ctx.warn(f"sensitivity of {node} not measured: {type(e).__name__}: {str(e)[:120]}")
            continue
        drop = reference_value - value if search.goal.higher_better else value - reference_value
        search.sensitivity[node] = float(drop)
    shutil.rmtree(search.work / "sensitivity", ignore_errors=True)
    return sorted(nodes, key=lambda x: -search.sensitivity.get(x, float("-inf")))


def accuracy_fallback(search, base, best_latency: float | None) -> None:
    """The most sensitive nodes back to fp32, one more per trial, until the target holds."""
    nodes = quantizable_nodes(search.sources[base.settings.source], base.settings, set(base.settings.exclude))
    if not nodes:
        return
    limit = int(search.space.max_fallback_fraction * len(nodes))
    search.ctx.log(f"{search.ctx.step_name}: ranking {len(nodes)} nodes by sensitivity ({base.name})")
    order = rank(search, base.settings, nodes)
    search.quantizable_count = len(nodes)
    for k in range(1, limit + 1):
        if not search.can_try():
            search.notes.append(
                "fallback stopped: " + ("time budget reached" if search.budget_spent() else "max_trials reached")
            )
            return
        trial = search.try_settings(replace(base.settings, exclude=base.settings.exclude | frozenset(order[:k])))
        trial.slower_in_int8 = list(base.slower_in_int8)
        if trial.meets:
            return
        if best_latency is not None and trial.latency_ms is not None and trial.latency_ms > best_latency:
            search.notes.append(f"fallback stopped at {k} nodes: already slower than a candidate that meets the target")
            return
    search.notes.append(
        f"fallback stopped at the limit of {limit} nodes (max_fallback_fraction {search.space.max_fallback_fraction})"
    )


def latency_fallback(search, trial, rounds: int = 2) -> None:
    """Write the regions the profile shows slower in int8 back in fp32; re-measure; repeat while it pays."""
    current = trial
    for _ in range(rounds):
        if current.path is None or current.settings is None or not search.can_try():
            return
        source = search.sources[current.settings.source]
        quantized = set(quantizable_nodes(source, current.settings, set(current.settings.exclude)))
        try:
            comparison = search.compare(current)
        except Exception as e:  # the profiler is an aid; a model it cannot profile is still measured end to end
            search.notes.append(f"latency fallback skipped: profiling failed ({type(e).__name__}: {str(e)[:120]})")
            return
        slow = comparison.slower(quantized)
        if not slow:
            search.notes.append(
                f"latency fallback: no int8 region of {current.name} is slower than fp32 in the profile"
            )
            return
        if set(slow) >= quantized:
            # Nothing int8 would be left: that candidate is the input with extra Q/DQ, not an int8 model.
            search.notes.append(
                f"latency fallback: every int8 region of {current.name} ({len(quantized)}) is slower than fp32 in "
                "the profile; int8 does not pay for this model on this CPU"
            )
            return
        new = _without_slow_regions(search, current, comparison, slow, len(quantized))
        if new.latency_ms is None or current.latency_ms is None or new.latency_ms >= current.latency_ms:
            return
        current = new


def _without_slow_regions(search, current, comparison, slow: list[str], quantized: int):
    """One latency-fallback trial: `current` with its slow regions in fp32, the figures kept for the report."""
    cost = {r["node"]: r for r in comparison.rows}
    for n in slow:
        search.slow_figures[n] = {"fp32_ms": cost[n]["fp32_ms"], "int8_ms": cost[n]["int8_ms"], "from": current.name}
    extra = sum(cost[n]["int8_ms"] - cost[n]["fp32_ms"] for n in slow)
    settings = replace(current.settings, exclude=current.settings.exclude | frozenset(slow), tag="latency-fallback")
    fallen = sorted(set(current.slower_in_int8) | set(slow))
    search.notes.append(
        f"latency fallback from {current.name}: {len(slow)} of {quantized} int8 regions cost "
        f"{extra:.3f} ms more than fp32 in the profile; written back in fp32 and re-measured"
    )
    new = search.try_settings(settings)
    new.slower_in_int8 = fallen
    return new


def stem_fallback(search, base) -> None:
    """A CNN's first convs (few channels, full resolution) are where int8 loses most accuracy and gains least
    speed: keep the first 1, 2, 4, 8 ... compute nodes fp32 until the target holds. One trial per step, so it
    fits a budget that ranking every node by sensitivity (one quantization per node) does not."""
    source = search.sources[base.settings.source]
    nodes = quantizable_nodes(source, base.settings, set(base.settings.exclude))
    limit = int(search.space.max_fallback_fraction * len(nodes))
    k = 1
    while k <= limit and search.can_try():
        trial = search.try_settings(
            replace(base.settings, exclude=base.settings.exclude | frozenset(nodes[:k]), tag=f"stem-fp32x{k}")
        )
        trial.slower_in_int8 = list(base.slower_in_int8)
        search.stem_fp32 |= set(nodes[:k])
        if trial.meets:
            search.notes.append(f"stem fallback: the first {k} compute nodes in fp32 meet the target")
            return
        k *= 2
    search.notes.append("stem fallback: the target was not met with up to " + f"{k // 2} leading nodes in fp32")
