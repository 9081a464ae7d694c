"""Two runs of the same recipe on a machine kept busy agree on their speed verdict, and compare flags no regression.

    python -m optcli.examples.digits build/example      # once
    python benchmarks/bench_verdicts.py [--min-speedup 1.0] [--runs 100]

Runs configs/digits_static_int8.yaml twice with a min_speedup gate while a bounded busy loop (one numpy matmul
loop pinned to a core) competes for the CPU, then `optcli compare` of the two reports with
--max-latency-regression 0.05. Prints, side by side, each run's min_speedup verdict and 95% interval next to what
the two p50s in its report alone would have said, and the compare check. Exit 1 when the runs disagree (one held,
one failed) or compare flags a regression.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "configs" / "digits_static_int8.yaml"
OUT = REPO / "build" / "bench_verdicts"

BUSY = """
import os, time, numpy as np
os.sched_setaffinity(0, {%d})
a = np.random.default_rng(0).standard_normal((256, 256)).astype(np.float32)
end = time.time() + %d
while time.time() < end:
    a = np.tanh(a @ a)
"""


def start_busy(seconds: int) -> subprocess.Popen:
    """One process of matmuls pinned to the last core, ending by itself after `seconds` (stopped earlier at exit)."""
    core = max(os.sched_getaffinity(0))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", BUSY % (core, seconds)], env=env)


def run(name: str, min_speedup: float, runs: int) -> dict:
    args = [sys.executable, "-m", "optcli", "run", str(RECIPE), "-o", str(OUT / name), "--overwrite", "--quiet"]
    args += ["--set", f"gates.min_speedup={min_speedup}", "--set", f"report.latency.runs={runs}"]
    proc = subprocess.run(args, capture_output=True, text=True)
    if proc.returncode not in (0, 1):
        raise SystemExit(f"{name}: optcli run exited {proc.returncode}: {proc.stderr.strip()}")
    report = json.loads((OUT / name / "report.json").read_text())
    return {"exit": proc.returncode, "report": report}


def p50_speedup(report: dict) -> float:
    """What the report's two p50s alone say (baseline p50 / final p50, slowest batch): the old gate's figure."""
    steps = report["steps"]
    base = next(s for s in steps if s.get("format") == "onnx")
    final = steps[-1]
    return min(base["latency"][k]["p50_ms"] / final["latency"][k]["p50_ms"] for k in final["latency"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--min-speedup", type=float, default=1.0)
    parser.add_argument("--runs", type=int, default=100, help="report.latency.runs of both runs")
    args = parser.parse_args()
    if not (REPO / "build" / "example" / "digits_cnn.pt").exists():
        raise SystemExit("build/example is missing: run python -m optcli.examples.digits build/example first")
    print(f"cpu: {os.cpu_count()} cores; load before: {os.getloadavg()[0]:.1f}")
    busy = start_busy(600)
    try:
        time.sleep(1)
        results = {name: run(name, args.min_speedup, args.runs) for name in ("run1", "run2")}
        compare = subprocess.run(
            [sys.executable, "-m", "optcli", "compare", str(OUT / "run2" / "report.json")]
            + [str(OUT / "run1" / "report.json"), "--max-latency-regression", "0.05", "--json"],
            capture_output=True,
            text=True,
        )
        load = os.getloadavg()[0]
    finally:
        busy.terminate()
        busy.wait()
    print(f"load while measuring: {load:.1f} (a pinned matmul loop running alongside)")
    print(f"{'run':6} {'exit':>4}  {'min_speedup verdict':20} {'value':>7}  {'95% interval':18} {'p50s alone':>10}")
    verdicts = []
    for name, r in results.items():
        gate = next(g for g in r["report"]["gates"] if g["name"] == "min_speedup")
        old = p50_speedup(r["report"])
        low, high = gate["interval"]
        print(
            f"{name:6} {r['exit']:>4}  {gate['verdict']:20} {gate['value']:>7.3f}  [{low:.3f}, {high:.3f}]"
            f"{'':4} {old:>7.3f} ({'held' if old >= args.min_speedup else 'failed'})"
        )
        verdicts.append(gate["verdict"])
        if r["report"]["summary"].get("busy"):
            print(f"       {r['report']['summary']['busy']}")
    check = json.loads(compare.stdout)["checks"][0] if compare.stdout.strip() else {}
    print(
        f"compare run2 vs run1 --max-latency-regression 0.05: exit {compare.returncode}, {check.get('verdict')} "
        f"{check.get('value')} in {check.get('interval')}"
    )
    agree = not ({"holds", "fails"} <= set(verdicts))
    print(
        f"verdicts agree (never one held and one failed): {agree}; compare flags no regression: "
        f"{compare.returncode == 0}"
    )
    return 0 if agree and compare.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
