"""Shared by the digits benchmarks: re-measure ONNX artifacts side by side and print one table.

Every model is timed in the same interleaved loop (so machine load hits all alike) and scored on the held-out split.
"""

from __future__ import annotations

import statistics
from pathlib import Path

import numpy as np

BATCHES = (1, 32)


def measure(artifacts: dict[str, Path], test_npz: Path, threads: int, repeats: int) -> dict[str, dict]:
    from optcli.measure import latency, metric_value, onnx_runner, predict
    from optcli.model import InputSpec

    inputs = [InputSpec("x", (1, 1, 8, 8), "float32")]
    test = np.load(test_npz)
    rows = {}
    for name, path in artifacts.items():
        runner = onnx_runner(path, inputs, threads)
        logits = predict(runner, ({"x": test["x"][i : i + 64]} for i in range(0, len(test["x"]), 64)))
        rows[name] = {
            "runner": runner,
            "size": path.stat().st_size,
            "accuracy": metric_value("accuracy", logits, test["y"]),
            "p50": {b: [] for b in BATCHES},
        }
    for _ in range(repeats):
        for row in rows.values():
            lat, _ = latency(row["runner"], list(BATCHES), warmup=10, runs=200)
            for b in BATCHES:
                row["p50"][b].append(lat[f"batch_{b}"]["p50_ms"])
    return rows


def print_table(rows: dict[str, dict], baseline: str) -> None:
    base = rows[baseline]
    b1, b32 = (statistics.median(base["p50"][b]) for b in BATCHES)
    print(
        f"{'model':<24}{'size KB':>9}{'size x':>8}{'acc':>8}{'Δacc pt':>9}{'b1 ms':>8}{'b1 x':>7}{'b32 ms':>8}{'b32 speed-up':>14}"
    )
    for name, row in rows.items():
        p1, p32 = (statistics.median(row["p50"][b]) for b in BATCHES)
        print(
            f"{name:<24}{row['size'] / 1000:>9.1f}{row['size'] / base['size']:>8.2f}{row['accuracy']:>8.4f}"
            f"{100 * (row['accuracy'] - base['accuracy']):>9.2f}{p1:>8.3f}{b1 / p1:>7.2f}{p32:>8.3f}{b32 / p32:>14.2f}"
        )
