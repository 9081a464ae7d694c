"""`optcli bench`: latency percentiles of a model file, ONNX Runtime for ONNX, torch otherwise."""

from __future__ import annotations

from pathlib import Path


def bench_model(path: Path, shapes: list[str], batch_sizes: list[int], threads: int, warmup: int, runs: int) -> dict:
    import os

    from optcli.artifact import load_any
    from optcli.measure import latency, runner_for
    from optcli.report.summary import busy_note

    model = load_any(path, shapes)
    runner = runner_for(model, threads)
    results, notes = latency(runner, batch_sizes, warmup, runs)
    return {
        "path": str(path),
        "engine": runner.engine,
        "threads": threads,
        "warmup": warmup,
        "runs": runs,
        "inputs": [{"name": s.name, "shape": list(s.shape), "dtype": s.dtype} for s in model.inputs],
        "latency": results,
        "notes": notes,
        # The run report's rule (p99/p50 jitter, load average above the cores), so bench says it as loudly.
        "busy": busy_note(
            {"environment": {"cpu_count": os.cpu_count()}, "steps": [{"name": path.name, "latency": results}]}
        ),
    }
