"""Digits CNN: 50% channel prune + KD fine-tune + static int8 (configs/digits_prune_kd_int8.yaml) vs the dense fp32 model, one run.

    python benchmarks/bench_compress_digits.py [--repeats 5] [--threads 2]

Trains the example CNN (width 32) on scikit-learn's digits, then runs two recipes through the optcli CLI:
the shipped configs/digits_prune_kd_int8.yaml, and the same recipe with its passes replaced by a plain
export (the dense fp32 ONNX baseline, same exporter and opset). All ONNX artifacts are re-measured here
with ONNX Runtime, alternating between them so machine load hits each alike: median p50 over repeats,
accuracy on the held-out split, file sizes. The dense torch model's accuracy is printed as well.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "digits_prune_kd_int8.yaml"


def optcli_run(work: Path, out: str, extra: list[str]) -> dict:
    example = work / "example"
    paths = [
        f"model.path={example / 'digits_cnn.pt'}",
        f"data.train.path={example / 'digits_train.npz'}",
        f"data.calibration.path={example / 'digits_calib.npz'}",
        f"data.eval.path={example / 'digits_test.npz'}",
    ]
    cmd = [sys.executable, "-m", "optcli", "run", str(CONFIG), "-o", str(work / out), "--quiet", "--json"]
    for item in paths + extra:
        cmd += ["--set", item]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode not in (0, 1):  # 1: a gate failed; the figures below still say by how much
        sys.exit(f"optcli run failed ({proc.returncode}): {proc.stderr.strip()}")
    return json.loads(proc.stdout)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    from digits_compare import measure, print_table

    from optcli.examples.digits import make_example

    work = Path(tempfile.mkdtemp(prefix="optcli-bench-compress-"))
    make_example(work / "example", width=32, epochs=8, formats=("pt",))
    optcli_run(work, "dense", ["passes=[{type: export, opset: 18}]"])
    compressed = optcli_run(work, "compressed", [])

    artifacts = {
        "dense fp32 (baseline)": work / "dense" / "model.onnx",
        "pruned+KD fp32": work / "compressed" / "steps" / "3-export" / "model.onnx",
        "pruned+KD int8": work / "compressed" / "model.onnx",
    }
    rows = measure(artifacts, work / "example" / "digits_test.npz", args.threads, args.repeats)
    test_size = len(np.load(work / "example" / "digits_test.npz")["y"])

    steps = {s["name"]: s for s in compressed["steps"]}
    training = steps["2-finetune"]["details"]["training"]
    torch_dense = steps["original"]["accuracy"]["value"]
    print(
        f"digits CNN (width 32) on {test_size} held-out digits; ONNX Runtime, {args.threads} threads, "
        f"median p50 over {args.repeats} repeats x 200 runs"
    )
    print(
        f"dense torch fp32 accuracy (optcli's 'original' step): {torch_dense:.4f}; "
        f"pruned-only accuracy before fine-tune: {steps['1-prune']['accuracy']['value']:.4f}; "
        f"parameters {steps['original']['parameters']:,} -> {steps['2-finetune']['parameters']:,}"
    )
    print(
        f"fine-tune: {len(training['epochs'])} epochs (best {training['best_epoch']}), {training['seconds']:.1f} s, "
        f"{training['samples_per_s']:.0f} samples/s"
    )
    base = rows["dense fp32 (baseline)"]
    print_table(rows, "dense fp32 (baseline)")
    drop = base["accuracy"] - rows["pruned+KD int8"]["accuracy"]
    print(
        f"target: prune + KD + int8 accuracy within 1 point of dense fp32 -> {'met' if drop <= 0.01 else 'MISSED'} "
        f"(drop {100 * drop:.2f} pt; negative = better than dense)"
    )


if __name__ == "__main__":
    main()
