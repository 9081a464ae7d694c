"""Mixed-precision weight-only: the MatMuls whose int4 weights move the outputs most are kept in a backup precision.

NNCF's scheme (compress_weights with `ratio` and `backup_mode`): `ratio` is the share of MatMul weights written at
`weights`, the rest at `backup` (int8 by default). Which layers: each MatMul is quantized alone and the outputs'
cosine to the original measured on data.eval (its sensitivity: 1 - cosine). On all-MiniLM-L6-v2 a layer's local
error (relative error of its weights or of its outputs on calibration data) ranks layers almost at random against
that end effect (Spearman 0.1-0.3): late value projections cost far more than their size says, so it is measured.
Layers are promoted in order of sensitivity per weight: a promotion costs bytes in proportion to its weights and
wins back about its own loss (the losses add up nearly linearly), which makes the order a greedy knapsack.

With a target the search bisects the number of promoted layers for the fewest that meet it (promoting more never
hurt in our runs; the bisection assumes it), so the chosen model is the smallest of the ones in that order.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from optcli.passes.quantize.weight_only import matmul_weights, write


@dataclass
class Mix:
    promoted: int  # how many of the ranked MatMuls are in backup
    path: Path
    size_bytes: int
    metric: float | None = None
    meets: bool = False
    seconds: float = 0.0

    def row(self, weights: str, backup: str, total: int, share: float, chosen: bool) -> dict:
        return {
            "name": f"{weights}, {self.promoted} of {total} MatMuls {backup}",
            "config": {"promoted": self.promoted, "low_bit_share": round(share, 4)},
            "metric": None if self.metric is None else round(self.metric, 6),
            "latency_ms": None,
            "size_bytes": self.size_bytes,
            "seconds": round(self.seconds, 3),
            "chosen": chosen,
            "meets_target": self.meets,
        }


def cosine_evaluation(model, config, ctx):
    """data.eval scored by cosine to the original (the sensitivity measure, whatever the target's metric)."""
    from optcli.passes.quantize.search.evaluation import evaluation_for

    return evaluation_for(model, config, ctx, metric="cosine")


def rank(proto, config, exclude: set[str], ev, ctx) -> tuple[list[str], dict[str, float], dict[str, int]]:
    """MatMuls ordered for promotion (most loss per weight first), their sensitivities and weight counts."""
    from optcli.artifact import save_onnx

    t0 = time.perf_counter()
    counts = matmul_weights(proto, exclude)
    names = list(counts)
    loss: dict[str, float] = {}
    subset = config.search.sensitivity_samples
    with (
        tempfile.TemporaryDirectory(dir=ctx.step_dir) as work,
        ctx.progress.task(f"{ctx.step_name}: sensitivity", total=len(names)) as bar,
    ):
        for name in names:
            if time.perf_counter() - t0 > config.search.time_budget_s:
                ctx.warn(
                    f"sensitivity: search.time_budget_s ({config.search.time_budget_s:g} s) ran out after "
                    f"{len(loss)} of {len(names)} MatMuls; the rest are promoted last, by size"
                )
                break
            alone = write(proto, config, ("MatMul",), exclude | (set(names) - {name}), frozenset(), ctx)
            path = save_onnx(alone, Path(work) / "one.onnx")
            value, _ = ev.measure(path, subset=subset, timed=False)
            loss[name] = max(0.0, 1.0 - value)
            bar.advance(node=name)
    order = sorted(names, key=lambda n: (n not in loss, -loss.get(n, 0.0) / counts[n], counts[n]))
    return order, loss, counts


def backup_for_ratio(model, proto, config, exclude: set[str], ctx) -> tuple[frozenset[str], dict]:
    """The fewest MatMuls, in promotion order, whose weights make up 1 - ratio of them: kept at backup."""
    t0 = time.perf_counter()
    order, loss, counts = rank(proto, config, exclude, cosine_evaluation(model, config, ctx), ctx)
    total = sum(counts.values())
    chosen, kept = [], 0
    for name in order:
        if kept >= (1 - config.ratio) * total:
            break
        chosen.append(name)
        kept += counts[name]
    return frozenset(chosen), _mix_details(config, order, loss, counts, chosen, time.perf_counter() - t0)


def _mix_details(config, order, loss, counts, chosen, seconds: float) -> dict:
    total = sum(counts.values()) or 1
    return {
        "ratio": config.ratio,
        "backup": config.backup,
        "low_bit_share": round(1 - sum(counts[n] for n in chosen) / total, 4),
        "backup_nodes": list(chosen),
        "matmuls": len(counts),
        "sensitivity": {n: round(loss[n], 6) for n in order if n in loss},
        "seconds": round(seconds, 3),
    }


def run_search(model, config, ctx, source: Path, target: Path, exclude: set[str]) -> dict:
    """The fewest promoted MatMuls meeting config.target; writes target, records the search; returns the details."""
    import shutil

    from optcli.artifact import save_onnx
    from optcli.measure import size_on_disk
    from optcli.onnxgraph import load_model
    from optcli.passes.quantize.search.evaluation import evaluation_for
    from optcli.passes.quantize.search.goal import make_goal
    from optcli.passes.quantize.weight_only import describe, float_weight_bytes, prepared, warn_if_nothing

    t0 = time.perf_counter()
    proto, ops, opset = prepared(source, config, ctx)
    ev = evaluation_for(model, config, ctx)
    goal = make_goal(config.target, ev.score(ev.reference))
    counts = matmul_weights(proto, exclude)
    order: list[str] = []
    loss: dict[str, float] = {}
    tried: dict[int, Mix] = {}
    work = Path(tempfile.mkdtemp(dir=ctx.step_dir, prefix="mix-"))

    def trial(k: int) -> Mix:
        if k not in tried:
            start = time.perf_counter()
            path = save_onnx(write(proto, config, ops, exclude, frozenset(order[:k]), ctx), work / f"mix_{k}.onnx")
            value, _ = ev.measure(path, subset=config.search.eval_samples, timed=False)
            tried[k] = Mix(k, path, size_on_disk(path)["size_bytes"], value, goal.meets(value))
            tried[k].seconds = time.perf_counter() - start
            ctx.log(f"{ctx.step_name}: {k} MatMuls in {config.backup}: {goal.metric} {value:.6g}")
        return tried[k]

    try:
        chosen = trial(0)
        if not chosen.meets and counts:
            # The target's own evaluation ranks too when it scores cosine: the reference outputs are not recomputed.
            ranking = ev if goal.metric == "cosine" else cosine_evaluation(model, config, ctx)
            order, loss, counts = rank(proto, config, exclude, ranking, ctx)
            lo, hi = 0, len(order)
            chosen = trial(hi)  # everything promoted: when even this misses, no mix can meet the target
            while chosen.meets and hi - lo > 1:
                mid = (lo + hi) // 2
                if trial(mid).meets:
                    hi = mid
                else:
                    lo = mid
                chosen = trial(hi)
        shutil.copyfile(chosen.path, target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    details = describe(load_model(target, external_data=False), config, ops, opset, float_weight_bytes(proto))
    warn_if_nothing(details, ops, ctx)
    details["mixed"] = _mix_details(config, order, loss, counts, order[: chosen.promoted], time.perf_counter() - t0)
    record_search(ctx, config, goal, chosen, tried, order, loss, counts, time.perf_counter() - t0)
    if not chosen.meets:
        ctx.warn(
            f"no mix met {goal.metric} {goal.relation()} {goal.threshold:.6g}, not even with every MatMul in {config.backup} "
            f"({goal.metric} {chosen.metric:.6g}); kept that one. What stays at {config.weights} is the rest of "
            f"op_types ({', '.join(o for o in ops if o != 'MatMul') or 'none'}): leave those out of op_types, "
            "or use a smaller block_size"
        )
    return details


def record_search(ctx, config, goal, chosen: Mix, tried: dict[int, Mix], order, loss, counts, seconds: float) -> None:
    """ctx.details["search"] (the same block shape as the int8 search's) and the target's gate."""
    total = sum(counts.values()) or 1

    def share(k: int) -> float:
        return 1 - sum(counts[n] for n in order[:k]) / total

    ctx.details["search"] = {
        "metric": goal.metric,
        "target": goal.threshold,
        "baseline": goal.baseline,
        "higher_is_better": goal.higher_better,
        "chosen": f"{chosen.promoted} MatMuls in {config.backup}",
        "candidates": [
            m.row(config.weights, config.backup, len(counts), share(k), m is chosen) for k, m in sorted(tried.items())
        ],
        "sensitivity": {n: round(v, 6) for n, v in sorted(loss.items(), key=lambda kv: -kv[1])},
        "fallback_nodes": [{"node": n, "sensitivity": round(loss[n], 6)} for n in order[: chosen.promoted]],
        "quantized_as": config.weights,
        "kept_in": config.backup,
        "trials": len(tried) + len(loss),
        "seconds": round(seconds, 3),
    }
    ctx.details["gates"] = [
        {
            "name": f"target {goal.metric} {goal.relation()} {goal.threshold:.6g}",
            "limit": goal.threshold,
            "value": None if chosen.metric is None else round(chosen.metric, 6),
            "passed": chosen.meets,
        }
    ]
