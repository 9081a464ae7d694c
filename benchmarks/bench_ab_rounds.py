"""Do repeated A/B measurements of the same two models agree? Short rounds (the recipe's runs only) against rounds
of at least abtest.MIN_ROUND_SECONDS, side by side in one run, on the digits CNN exported and int8-quantized.

    python -m optcli.examples.digits build/example      # once
    python benchmarks/bench_ab_rounds.py [--repeats 12] [--runs 30] [--width 16]

Each repeat times fp32 vs static int8 at batch 1 with both settings (interleaved: short, long, short, long...).
A 95% interval that excludes the median of all repeats' point estimates is "overconfident": with honest intervals
about 1 repeat in 20 does that. Prints each setting's share of overconfident intervals, the spread of its point
estimates, and its wall time.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "build" / "example"


def build(width: int, out: Path) -> tuple[Path, Path]:
    """The digits CNN of this width exported and static-int8 quantized by optcli itself (allow_slower: the point is
    the measurement, not the gate)."""
    recipe = out / "recipe.yaml"
    recipe.write_text(
        f"""model:
  path: {EXAMPLE / "digits_cnn.pt"}
  factory: optcli.examples.digits:build_cnn
  factory_kwargs: {{width: {width}}}
  inputs: [{{name: x, shape: [1, 1, 8, 8], dtype: float32}}]
data:
  calibration: {{path: {EXAMPLE / "digits_calib.npz"}, samples: 64}}
passes:
  - {{type: export}}
  - {{type: quantize, mode: static, allow_slower: true}}
report:
  latency: {{batch_sizes: [1], warmup: 1, runs: 3, threads: 1}}
gates: {{}}
"""
    )
    if width != 32:  # the example's weights are for the default width: train nothing, a random net times the same
        import torch

        from optcli.examples.digits import build_cnn

        torch.save(build_cnn(width=width).state_dict(), out / "cnn.pt")
        recipe.write_text(recipe.read_text().replace(str(EXAMPLE / "digits_cnn.pt"), str(out / "cnn.pt")))
    cmd = [sys.executable, "-m", "optcli", "run", str(recipe), "-o", str(out / "run"), "--quiet"]
    subprocess.run(cmd, check=True)
    return out / "run" / "steps" / "1-export" / "model.onnx", out / "run" / "steps" / "2-quantize" / "model.onnx"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=12)
    parser.add_argument("--runs", type=int, default=30, help="report.latency.runs the A/B is sized from")
    parser.add_argument("--width", type=int, default=16, help="the CNN's width (16: the test suite's)")
    args = parser.parse_args()
    if not (EXAMPLE / "digits_cnn.pt").exists():
        sys.exit("run `python -m optcli.examples.digits build/example` first")

    from optcli import abtest
    from optcli.measure import onnx_runner
    from optcli.model import InputSpec

    with tempfile.TemporaryDirectory() as tmp:
        fp32, int8 = build(args.width, Path(tmp))
        inputs = [InputSpec(name="x", shape=(1, 1, 8, 8), dtype="float32")]
        runners = [onnx_runner(p, inputs, 1) for p in (fp32, int8)]
        results: dict[str, list] = {"short rounds (runs only)": [], "rounds >= 25 ms": []}
        seconds = dict.fromkeys(results, 0.0)
        long_rounds = abtest.MIN_ROUND_SECONDS
        for _ in range(args.repeats):
            for name in results:
                abtest.MIN_ROUND_SECONDS = long_rounds if name.startswith("rounds") else 0.0
                t0 = time.perf_counter()
                results[name].append(abtest.compare_runners(*runners, [1], 1, args.runs)["batch_1"])
                seconds[name] += time.perf_counter() - t0
        abtest.MIN_ROUND_SECONDS = long_rounds
    print(f"digits CNN width {args.width}, static int8 / fp32 time at b1, {args.repeats} repeats, runs {args.runs}")
    print(f"{'setting':26} {'overconfident':>13} {'ratio median':>12} {'min-max':>13} {'wall s':>7}")
    for name, ratios in results.items():
        center = statistics.median(r.value for r in ratios)
        missed = sum(not (r.low <= center <= r.high) for r in ratios)
        lo, hi = min(r.value for r in ratios), max(r.value for r in ratios)
        print(f"{name:26} {missed:>6}/{len(ratios):<6} {center:>12.3f} {lo:>6.3f}-{hi:<6.3f} {seconds[name]:>7.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
