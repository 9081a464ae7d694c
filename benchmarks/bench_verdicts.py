"""Runs of the same recipe on a machine kept busy agree on every gate, and compare flags no regression.

    python -m optcli.examples.digits build/example      # once
    python benchmarks/bench_verdicts.py [--repeats 2] [--runs 100]

Three recipes, each run --repeats times while a bounded busy loop (one numpy matmul loop pinned to a core) competes
for the CPU:
  named      configs/digits_static_int8.yaml with gates.min_speedup 1.0 (the user's own speed gate)
  default    the same recipe with no gates: optcli's default gates (size, fidelity, and max_slowdown (default),
             which fails only a final artifact slower than 1.10x its baseline with confidence, twice)
  borderline the default gates on the digits CNN trained at width 16 (the test suite's), whose static int8 really is about
             1.14x fp32's time at batch 1: the true ratio sits right at the default gate's limit, where a point
             figure would flip between held and failed from run to run
Prints each run's verdict per gate with its 95% interval beside what the report's two p50s alone would have said,
then `optcli compare` of the named recipe's last run against its first with --max-latency-regression 0.05.
Exit 1 when runs of one recipe disagree on a gate (one held, one failed) or compare flags a regression.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "configs" / "digits_static_int8.yaml"
EXAMPLE = REPO / "build" / "example"
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


def recipes(folder: Path) -> dict[str, tuple[Path, list[str]]]:
    """name -> (recipe file, --set overrides): the shipped recipe as it is, and copies without gates."""
    folder.mkdir(parents=True, exist_ok=True)
    shipped = yaml.safe_load(RECIPE.read_text())
    # The copies live elsewhere: their paths are made absolute from the shipped recipe's folder.
    shipped["model"]["path"] = str((RECIPE.parent / shipped["model"]["path"]).resolve())
    for part in ("calibration", "eval"):
        shipped["data"][part]["path"] = str((RECIPE.parent / shipped["data"][part]["path"]).resolve())
    default = {k: v for k, v in shipped.items() if k != "gates"}
    (folder / "default.yaml").write_text(yaml.safe_dump(default, sort_keys=False))
    import torch

    from optcli.examples.digits import build_cnn, digits_arrays, train

    # Trained, as the test suite's CNN is: a random net's near-tied scores would fail the default top-1 agreement
    # gate on rounding alone, which is not what this measures.
    arrays = digits_arrays()
    torch.manual_seed(0)
    torch.save(train(build_cnn(width=16), arrays["x_train"], arrays["y_train"]).state_dict(), folder / "cnn16.pt")
    narrow = {
        **default,
        "model": {**default["model"], "path": str(folder / "cnn16.pt"), "factory_kwargs": {"width": 16}},
    }
    narrow["report"] = {"latency": {**default["report"]["latency"], "batch_sizes": [1]}}
    (folder / "borderline.yaml").write_text(yaml.safe_dump(narrow, sort_keys=False))
    return {
        "named": (RECIPE, ["--set", "gates.min_speedup=1.0"]),
        "default": (folder / "default.yaml", []),
        "borderline": (folder / "borderline.yaml", []),
    }


def run(recipe: Path, out: Path, extra: list[str], runs: int) -> dict:
    args = [sys.executable, "-m", "optcli", "run", str(recipe), "-o", str(out), "--overwrite", "--quiet"]
    args += [*extra, "--set", f"report.latency.runs={runs}"]
    proc = subprocess.run(args, capture_output=True, text=True)
    if proc.returncode not in (0, 1):
        raise SystemExit(f"{out.name}: optcli run exited {proc.returncode}: {proc.stderr.strip()}")
    return {"exit": proc.returncode, "report": json.loads((out / "report.json").read_text())}


def p50_ratio(report: dict) -> float:
    """What the report's two p50s alone say: final p50 / baseline p50 at the slowest batch (the old figure)."""
    steps = report["steps"]
    base = next(s for s in steps if s.get("format") == "onnx")
    final = steps[-1]
    return max(final["latency"][k]["p50_ms"] / base["latency"][k]["p50_ms"] for k in final["latency"])


def gate_cell(gate: dict) -> str:
    verdict = gate.get("verdict") or ("holds" if gate["passed"] else "fails")
    interval = gate.get("interval")
    figure = f"{gate['value']:.3f}" if isinstance(gate.get("value"), float) else str(gate.get("value"))
    return f"{verdict} {figure}" + (f" [{interval[0]:.3f}, {interval[1]:.3f}]" if interval else "")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=2, help="runs of each recipe")
    parser.add_argument("--runs", type=int, default=100, help="report.latency.runs of every run")
    parser.add_argument("--only", default="named,default,borderline", help="comma-separated recipes to run")
    args = parser.parse_args()
    if not (EXAMPLE / "digits_cnn.pt").exists():
        raise SystemExit("build/example is missing: run python -m optcli.examples.digits build/example first")
    print(f"cpu: {os.cpu_count()} cores; load before: {os.getloadavg()[0]:.1f}")
    chosen = {k: v for k, v in recipes(OUT / "recipes").items() if k in args.only.split(",")}
    results: dict[str, list[dict]] = {}
    busy = start_busy(3600)
    loads = []
    try:
        time.sleep(1)
        for name, (recipe, extra) in chosen.items():
            results[name] = []
            for i in range(args.repeats):
                results[name].append(run(recipe, OUT / f"{name}{i + 1}", extra, args.runs))
                loads.append(os.getloadavg()[0])
        compare = None
        if "named" in results and args.repeats > 1:
            compare = subprocess.run(
                [sys.executable, "-m", "optcli", "compare", str(OUT / f"named{args.repeats}" / "report.json")]
                + [str(OUT / "named1" / "report.json"), "--max-latency-regression", "0.05", "--json"],
                capture_output=True,
                text=True,
            )
    finally:
        busy.terminate()
        busy.wait()
    print(f"load while measuring: {min(loads):.1f}-{max(loads):.1f} (a pinned matmul loop running alongside)")
    disagree = []
    for name, runs in results.items():
        print(f"\n{name}: {len(runs)} runs of the same recipe")
        names = [g["name"] for g in runs[0]["report"]["gates"]]
        for gate_name in names:
            cells = []
            verdicts = set()
            for r in runs:
                gate = next((g for g in r["report"]["gates"] if g["name"] == gate_name), None)
                cells.append(gate_cell(gate) if gate else "absent")
                if gate:
                    verdicts.add(gate.get("verdict") or ("holds" if gate["passed"] else "fails"))
            if {"holds", "fails"} <= verdicts:
                disagree.append(f"{name}: {gate_name}")
            print(f"  {gate_name:28} " + " | ".join(cells))
        print(f"  {'exit codes':28} " + " | ".join(str(r["exit"]) for r in runs))
        print(f"  {'p50s alone (final/base)':28} " + " | ".join(f"{p50_ratio(r['report']):.3f}" for r in runs))
    ok = not disagree
    if compare is not None:
        check = json.loads(compare.stdout)["checks"][0] if compare.stdout.strip() else {}
        print(
            f"\ncompare named{args.repeats} vs named1 --max-latency-regression 0.05: exit {compare.returncode}, "
            f"{check.get('verdict')} {check.get('value')} in {check.get('interval')}"
        )
        ok = ok and compare.returncode == 0
    print(
        f"\nruns agree on every gate (never one held and one failed): {not disagree}"
        + (f" {disagree}" if disagree else "")
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
