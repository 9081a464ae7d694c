"""Digits CNN: optcli static int8 vs the fp32 ONNX export, measured side by side in one run.

    python benchmarks/bench_digits_int8.py [--repeats 5] [--threads 2]

Trains the example CNN (width 32) on scikit-learn's digits, runs optcli's static int8 recipe, then
re-measures both the fp32 export and the int8 artifact with ONNX Runtime, alternating them so machine
load hits both alike: median p50 over repeats, accuracy on the held-out split, file sizes.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import yaml


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    from optcli.artifact import InputSpec
    from optcli.examples.digits import make_example
    from optcli.measure import latency, metric_value, onnx_runner, predict

    work = Path(tempfile.mkdtemp(prefix="optcli-bench-digits-"))
    make_example(work / "example", width=32, epochs=8)
    recipe = {
        "model": {"path": str(work / "example" / "digits_cnn.pt"), "factory": "optcli.examples.digits:build_cnn",
                  "inputs": [{"name": "x", "shape": [1, 1, 8, 8], "dtype": "float32"}]},
        "data": {"calibration": {"path": str(work / "example" / "digits_calib.npz"), "samples": 256},
                 "eval": {"path": str(work / "example" / "digits_test.npz"), "labels": "y"}},
        "passes": [{"type": "export", "opset": 18}, {"type": "quantize", "mode": "static", "per_channel": True}],
        "report": {"latency": {"batch_sizes": [1, 32], "warmup": 5, "runs": 30, "threads": args.threads}},
    }
    (work / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    out = work / "out"
    subprocess.run([sys.executable, "-m", "optcli", "run", str(work / "recipe.yaml"), "-o", str(out), "--quiet"], check=True)

    fp32, int8 = out / "steps" / "1-export" / "model.onnx", out / "model.onnx"
    inputs = [InputSpec("x", (1, 1, 8, 8), "float32")]
    test = np.load(work / "example" / "digits_test.npz")
    rows = {}
    for name, path in (("fp32 onnx (baseline)", fp32), ("optcli static int8", int8)):
        runner = onnx_runner(path, inputs, args.threads)
        logits = predict(runner, ({"x": test["x"][i : i + 64]} for i in range(0, len(test["x"]), 64)))
        rows[name] = {"runner": runner, "size": path.stat().st_size, "accuracy": metric_value("accuracy", logits, test["y"]), "p50": {1: [], 32: []}}
    for _ in range(args.repeats):
        for row in rows.values():
            lat, _ = latency(row["runner"], [1, 32], warmup=10, runs=200)
            for b in (1, 32):
                row["p50"][b].append(lat[f"batch_{b}"]["p50_ms"])

    base = rows["fp32 onnx (baseline)"]
    print(f"digits CNN (width 32), ONNX Runtime, {args.threads} threads, median p50 over {args.repeats} repeats x 200 runs")
    print(f"{'model':<24}{'size KB':>9}{'size x':>8}{'acc':>8}{'Δacc pt':>9}{'b1 ms':>8}{'b1 x':>7}{'b32 ms':>8}{'b32 speed-up':>14}")
    for name, row in rows.items():
        p1, p32 = statistics.median(row["p50"][1]), statistics.median(row["p50"][32])
        b1, b32 = statistics.median(base["p50"][1]), statistics.median(base["p50"][32])
        print(f"{name:<24}{row['size'] / 1000:>9.1f}{row['size'] / base['size']:>8.2f}{row['accuracy']:>8.4f}"
              f"{100 * (row['accuracy'] - base['accuracy']):>9.2f}{p1:>8.3f}{b1 / p1:>7.2f}{p32:>8.3f}{b32 / p32:>14.2f}")
    drop = base["accuracy"] - rows["optcli static int8"]["accuracy"]
    print(f"target: static int8 accuracy within 1 point of fp32 -> {'met' if drop <= 0.01 else 'MISSED'} (drop {100 * drop:.2f} pt)")


if __name__ == "__main__":
    main()
