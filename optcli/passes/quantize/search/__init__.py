"""Accuracy-aware int8: find the fastest int8 model that stays inside a stated metric target.

1. Base candidates (dynamic / static QDQ, per-channel / per-tensor, calibration method, SmoothQuant alpha) are each
   written with onnxruntime.quantization and measured on the written file: metric on data.eval, latency, size.
2. If a faster candidate misses the target, nodes fall back to fp32 greedily: nodes are ranked by sensitivity
   (quantize-one-node: the metric drop when only that node is int8, on a subset of data.eval), then the most
   sensitive ones are excluded one more per trial, re-measuring each time, until the target holds.
3. Latency fallback: ONNX Runtime's profiler times the fp32 graph and the int8 candidate node by node (profile.py);
   regions (a Conv/Gemm/MatMul and the ops hanging off it) that cost more in int8 than their fp32 twin, such as
   Quantize/Dequantize islands around HardSwish or Resize, are written back in fp32 and the result re-measured.
4. The fastest candidate meeting the target wins. Int8 slower than fp32 is never kept silently.
Everything is bounded by max_trials and time_budget_s.

CNNs (graphs with Conv) get their own candidates: static QDQ only (dynamic int8 turns Conv into ConvInteger, which
has no fast kernel in ONNX Runtime: issue #12854), BatchNorm folded into the convs first, op-type subsets
(Conv / Conv+Gemm / +MatMul / all ops but the post-processing tail), asymmetric vs symmetric uint8 activations
(U8S8 is what the session fuses into QLinearConv), reduce_range from the CPU's ISA (isa.py; no VNNI: 7-bit weights).

The package, by seam: goal.py (the target, which trial wins, the speed verdict), evaluation.py (measuring a
candidate), candidates.py (what is tried, on which graph), engine.py (trials within the budget), fallbacks.py
(what follows the base candidates), outcome.py (the report block, gates and warnings). This face runs them.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from optcli.passes.quantize.ort import quantize_onnx
from optcli.passes.quantize.search.candidates import plan, quantizable_nodes
from optcli.passes.quantize.search.engine import Search, Trial, estimate_s, fmt, plan_line
from optcli.passes.quantize.search.evaluation import Evaluation, evaluation_for, race_ratios, time_ratio
from optcli.passes.quantize.search.goal import Goal, contenders, faster_verdict, make_goal, race_winner
from optcli.passes.quantize.search.outcome import chosen_profile, nonfinite_tensors, record_gates, search_block

__all__ = ["Evaluation", "Goal", "Search", "Trial", "estimate_s", "evaluation_for", "make_goal", "plan_line"]


def run_search(model, config, ctx, source: Path, target: Path, exclude: set[str], calib) -> None:
    """Run the search, write the chosen model to `target`, and record the search block and its gates in ctx.details."""
    ev = evaluation_for(model, config, ctx)
    goal = make_goal(config.target, ev.score(ev.reference))
    cache = {"dir": ctx.step_dir / "candidates"}
    cache["dir"].mkdir(exist_ok=True)
    candidates, sources, notes = plan(config, ctx, model, source, exclude, calib is not None, cache["dir"])

    def write(src, dst, settings, calib_batches, smooth_batches):
        return quantize_onnx(src, dst, settings, config, calib_batches, smooth_batches, ctx, cache=cache)

    search = Search(config, ctx, source, model, write, ev, goal, calib, sources)
    search.notes.extend(notes)
    planned = min(len(candidates), config.search.max_trials)
    with ctx.progress.task(f"{ctx.step_name}: search trials", total=planned) as search.progress:
        fp32, chosen = search.run(candidates)
    chosen = race_contenders(search, chosen)
    # chosen is always an int8 candidate written to disk (run() refuses when none is)
    assert chosen.settings is not None and chosen.path is not None
    if search.quantizable_count is None:
        chosen_source = search.sources[chosen.settings.source]
        search.quantizable_count = len(quantizable_nodes(chosen_source, chosen.settings, set(exclude)))
    searched_s = search.elapsed()  # the budget governs trials; the profile of the chosen model is timed on its own
    profile = chosen_profile(search, chosen, exclude, cache)
    if profile is not None:
        profile["seconds"] = round(search.elapsed() - searched_s, 3)
    shutil.copyfile(chosen.path, target)
    shutil.rmtree(search.work, ignore_errors=True)
    # A fresh A/B for the gate, not the race's figure: the lowest of several noisy ratios is biased low.
    ratio = time_ratio(source, target, ev)
    speed = faster_verdict(ratio)
    if chosen.latency_ms is None:
        search.notes.append(
            f"latency not measured at batch {ev.latency_batch}: candidates ranked by {goal.metric} alone"
        )
    ctx.details["search"] = search_block(search, fp32, chosen, exclude, ev, ratio, speed, searched_s, profile)
    screened = nonfinite_tensors(cache)
    if screened:
        ctx.details["nonfinite_tensors"] = screened
        ctx.warn(
            f"static candidates: {len(screened)} tensors hold inf/NaN/huge values on calibration data (e.g. attention masks); "
            "the nodes touching them were left in float"
        )
    record_gates(config, ctx, goal, fp32, chosen, ev, ratio, speed, profile)
    ctx.log(
        f"{ctx.step_name}: chose {chosen.name} ({goal.metric} {chosen.metric:.6g}, p50 {fmt(chosen.latency_ms)} ms, "
        f"fp32 {fmt(fp32.latency_ms)} ms)"
    )


def race_contenders(search: Search, chosen: Trial) -> Trial:
    """The final choice between trials whose p50s are too close to rank (goal.contenders), by one interleaved A/B of
    all of them against fp32; recorded in search.race. The p50 choice stands when there is one contender or the
    race could not time them."""
    pool = contenders(search.trials, search.goal)
    if len(pool) < 2:
        return chosen
    ratios = race_ratios(search.source, [t.path for t in pool], search.ev)
    if not ratios:
        return chosen
    winner = pool[race_winner(ratios)]
    search.race = [
        {"name": t.name, "latency_ms": t.latency_ms, "time_ratio": round(r.value, 4), "interval": r.interval}
        for t, r in zip(pool, ratios, strict=True)
    ]
    if winner is not chosen:
        search.notes.append(
            f"{winner.name} chosen over {chosen.name} (faster p50 {fmt(chosen.latency_ms)} ms vs "
            f"{fmt(winner.latency_ms)} ms, taken one after the other): side by side they ran at "
            + ", ".join(f"{e['time_ratio']:.3f}x" for e in search.race)
            + " fp32's time"
        )
    return winner
