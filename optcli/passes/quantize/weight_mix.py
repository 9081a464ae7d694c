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

A decoder (a graph with a KV cache) is scored by perplexity on its text instead (decoder.py): a layer's sensitivity
is the perplexity rise with that MatMul alone at `weights`, and layers are promoted by sensitivity alone, the most
costly first, so a perplexity target is met with the fewest int8 layers (what a user reads in the table).
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


def loss_of(ev, value: float, subset: int | None) -> float:
    """A trial's loss against the original: perplexity rise for a decoder (on the same windows), 1 - cosine
    otherwise."""
    if getattr(ev, "metric", None) == "perplexity":
        return max(0.0, value - ev.baseline(subset))
    return max(0.0, 1.0 - value)


def promotion_order(loss: dict[str, float], counts: dict[str, int], per_weight: bool) -> list[str]:
    """The MatMuls in the order they go to backup: most loss (per weight, or outright) first; unmeasured last."""
    if per_weight:
        return sorted(counts, key=lambda n: (n not in loss, -loss.get(n, 0.0) / counts[n], counts[n]))
    return sorted(counts, key=lambda n: (n not in loss, -loss.get(n, 0.0), counts[n]))


def fewest_promoted(total: int, meets) -> int:
    """The fewest leading layers of the order to promote so that meets(k) holds (bisection, assuming promoting more
    never hurts); total when even promoting all of them misses (the caller reports it)."""
    if meets(0):
        return 0
    lo, hi = 0, total
    if not meets(hi):
        return hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if meets(mid):
            hi = mid
        else:
            lo = mid
    return hi


def rank(
    proto, config, exclude: set[str], ev, ctx, calibration: list[dict] | None = None
) -> tuple[list[str], dict[str, float], dict[str, int]]:
    """MatMuls ordered for promotion, their sensitivities and weight counts."""
    from optcli.artifact import save_onnx
    from optcli.passes.quantize.decoder import trial_path
    from optcli.passes.quantize.weight_only import roles

    # A decoder's trials are folders with its side files (perplexity loads them); others plain files.
    source = Path(ev.reference_dir) / "model.onnx" if hasattr(ev, "reference_dir") else None

    t0 = time.perf_counter()
    fixed = roles(proto, config, ("MatMul",))
    counts = matmul_weights(proto, exclude | fixed.int8 | fixed.fp32)
    # A layer's trial quantizes that layer alone: no embedding table, no lm_head in its own precision.
    alone_config = config.model_copy(update={"embeddings": "fp32", "lm_head": None})
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
            kept = exclude | fixed.int8 | fixed.fp32 | (set(names) - {name})
            alone = write(proto, alone_config, ("MatMul",), kept, frozenset(), ctx, calibration)
            path = save_onnx(alone, trial_path(Path(work), "one", source))
            value, _ = ev.measure(path, subset=subset, timed=False)
            loss[name] = loss_of(ev, value, subset)
            bar.advance(node=name)
    return promotion_order(loss, counts, per_weight=getattr(ev, "metric", None) != "perplexity"), loss, counts


def sensitivity_evaluation(model, config, ctx):
    """What ranks the MatMuls: a decoder's perplexity on its text, else cosine on data.eval."""
    from optcli.onnxgraph import load_model
    from optcli.passes.quantize.decoder import evaluation, is_decoder

    if is_decoder(load_model(model.path, external_data=False)):
        return evaluation(model.path.parent, ctx, config.search.eval_samples)
    return cosine_evaluation(model, config, ctx)


def backup_for_ratio(
    model, proto, config, exclude: set[str], ctx, calibration: list[dict] | None = None
) -> tuple[frozenset[str], dict]:
    """The fewest MatMuls, in promotion order, whose weights make up 1 - ratio of them: kept at backup."""
    t0 = time.perf_counter()
    ev = sensitivity_evaluation(model, config, ctx)
    order, loss, counts = rank(proto, config, exclude, ev, ctx, calibration)
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
    from optcli.passes.quantize.decoder import trial_path
    from optcli.passes.quantize.search.evaluation import evaluation_for
    from optcli.passes.quantize.search.goal import make_goal
    from optcli.passes.quantize.weight_only import (
        activation_aware,
        calibration_for,
        describe,
        float_weight_bytes,
        prepared,
        warn_if_nothing,
    )

    t0 = time.perf_counter()
    proto, ops, opset = prepared(source, config, ctx)
    calibration = calibration_for(model, config, ctx)
    awq = activation_aware(proto, config, exclude, ctx, calibration)
    decoder = config.target.metric == "perplexity"
    ev = sensitivity_evaluation(model, config, ctx) if decoder else evaluation_for(model, config, ctx)
    goal = make_goal(config.target, ev.score(ev.reference))
    counts = matmul_weights(proto, exclude)
    order: list[str] = []
    loss: dict[str, float] = {}
    tried: dict[int, Mix] = {}
    work = Path(tempfile.mkdtemp(dir=ctx.step_dir, prefix="mix-"))

    def trial(k: int) -> Mix:
        if k not in tried:
            start = time.perf_counter()
            mixed = write(proto, config, ops, exclude, frozenset(order[:k]), ctx, calibration)
            path = save_onnx(mixed, trial_path(work, f"mix_{k}", source))
            value, _ = ev.measure(path, subset=config.search.eval_samples, timed=False)
            tried[k] = Mix(k, path, size_on_disk(path)["size_bytes"], value, goal.meets(value))
            tried[k].seconds = time.perf_counter() - start
            ctx.log(f"{ctx.step_name}: {k} MatMuls in {config.backup}: {goal.metric} {value:.6g}")
        return tried[k]

    try:
        chosen = trial(0)
        if not chosen.meets and counts:
            # The target's own evaluation ranks too when it scores cosine or perplexity: the reference is not recomputed.
            ranking = ev if goal.metric in ("cosine", "perplexity") else cosine_evaluation(model, config, ctx)
            order, loss, counts = rank(proto, config, exclude, ranking, ctx, calibration)
            chosen = trial(fewest_promoted(len(order), lambda k: trial(k).meets))
        save_onnx(load_model(chosen.path), target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    details = describe(load_model(target, external_data=False), config, ops, opset, float_weight_bytes(proto))
    warn_if_nothing(details, ops, ctx)
    details["mixed"] = _mix_details(config, order, loss, counts, order[: chosen.promoted], time.perf_counter() - t0)
    if awq is not None:
        details["awq"] = awq
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
