"""Digits CNN: optcli static int8 vs the fp32 ONNX export, measured side by side in one run.

    python benchmarks/bench_digits_int8.py [--repeats 5] [--threads 2]

Trains the example CNN (width 32) on scikit-learn's digits, runs optcli's static int8 recipe, then
re-measures both the fp32 export and the int8 artifact with ONNX Runtime, alternating them so machine
load hits both alike: median p50 over repeats, accuracy on the held-out split, file sizes.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    from digits_compare import measure, print_table

    from optcli.examples.digits import make_example

    work = Path(tempfile.mkdtemp(prefix="optcli-bench-digits-"))
    make_example(work / "example", width=32, epochs=8)
    recipe = {
        "model": {
            "path": str(work / "example" / "digits_cnn.pt"),
            "factory": "optcli.examples.digits:build_cnn",
            "inputs": [{"name": "x", "shape": [1, 1, 8, 8], "dtype": "float32"}],
        },
        "data": {
            "calibration": {"path": str(work / "example" / "digits_calib.npz"), "samples": 256},
            "eval": {"path": str(work / "example" / "digits_test.npz"), "labels": "y"},
        },
        "passes": [{"type": "export", "opset": 18}, {"type": "quantize", "mode": "static", "per_channel": True}],
        "report": {"latency": {"batch_sizes": [1, 32], "warmup": 5, "runs": 30, "threads": args.threads}},
    }
    (work / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    out = work / "out"
    subprocess.run(
        [sys.executable, "-m", "optcli", "run", str(work / "recipe.yaml"), "-o", str(out), "--quiet"], check=True
    )

    fp32, int8 = out / "steps" / "1-export" / "model.onnx", out / "model.onnx"
    rows = measure(
        {"fp32 onnx (baseline)": fp32, "optcli static int8": int8},
        work / "example" / "digits_test.npz",
        args.threads,
        args.repeats,
    )
    base = rows["fp32 onnx (baseline)"]
    print(
        f"digits CNN (width 32), ONNX Runtime, {args.threads} threads, median p50 over {args.repeats} repeats x 200 runs"
    )
    print_table(rows, "fp32 onnx (baseline)")
    drop = base["accuracy"] - rows["optcli static int8"]["accuracy"]
    print(
        f"target: static int8 accuracy within 1 point of fp32 -> {'met' if drop <= 0.01 else 'MISSED'} (drop {100 * drop:.2f} pt)"
    )


if __name__ == "__main__":
    main()
