"""A TPE study vs a grid over the same space (lr, epochs, sparsity of configs/digits_prune_kd_int8.yaml): both
fronts' hypervolume side by side, and trials per minute with 1, 2 and 4 workers.

    python benchmarks/bench_sweep.py                 # 40 TPE trials (--jobs 2, then a third worker joins) vs a 40-point grid
    python benchmarks/bench_sweep.py --quick         # 12 vs 12, 4 trials per throughput run: minutes, not an hour
    python benchmarks/bench_sweep.py --tiny          # 4 vs 4 (a 2 x 1 x 2 grid), for a loaded shared machine
    python benchmarks/bench_sweep.py --throughput-only   # trials/min only, on a cheap recipe (no fine-tune)

Trains the example CNN (width 32) once, then drives the optcli CLI as a user would: `optcli sweep --space ...
--sampler tpe --jobs 2`, a third `optcli sweep ... --worker` started from another process while those run, and
`optcli sweep --space <grid> --sampler grid --jobs 2`. The hypervolume is over the study's own objectives
(accuracy up, p50 latency down, size down), each normalized by one reference taken from both studies together
(worst value seen, 10% beyond), so the two figures are comparable; higher is better. Throughput: the same
small grid run with 1, 2 and 4 local workers, each in a fresh OUT (its own step cache), trials / wall minute.
Latency runs are cut (report.latency: batch 1, 20 runs) to keep trials short; the figures are ratios between
runs on one machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "digits_prune_kd_int8.yaml"
SPACE = {
    "passes.1.lr": {"low": 1.0e-4, "high": 2.0e-2, "log": True},
    "passes.1.epochs": {"low": 5, "high": 12},
    "passes.0.sparsity": {"low": 0.25, "high": 0.75},
}
GRIDS = {  # the same ranges, enumerated: 4 x 2 x 5 = 40 points, or 3 x 2 x 2 = 12 with --quick
    40: {
        "passes.1.lr": [1e-4, 1e-3, 5e-3, 2e-2],
        "passes.1.epochs": [5, 12],
        "passes.0.sparsity": [0.25, 0.375, 0.5, 0.625, 0.75],
    },
    12: {"passes.1.lr": [1e-4, 2e-3, 2e-2], "passes.1.epochs": [5, 12], "passes.0.sparsity": [0.25, 0.75]},
    4: {"passes.1.lr": [1e-3, 1e-2], "passes.1.epochs": [5], "passes.0.sparsity": [0.25, 0.75]},
}
# throughput: 12 distinct trials, so a worker's start-up (imports, its own process) is not most of the figure
SMALL = {"passes.1.lr": [1e-3, 5e-3], "passes.1.epochs": [5], "passes.0.sparsity": [0.25, 0.35, 0.45, 0.55, 0.65, 0.75]}


def sets(example: Path) -> list[str]:
    items = [
        f"model.path={example / 'digits_cnn.pt'}",
        f"data.train.path={example / 'digits_train.npz'}",
        f"data.calibration.path={example / 'digits_calib.npz'}",
        f"data.eval.path={example / 'digits_test.npz'}",
        "report.latency={batch_sizes: [1], warmup: 3, runs: 20, threads: 1}",
    ]
    return [a for item in items for a in ("--set", item)]


def sweep_cmd(out: Path, space: Path, example: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "optcli",
        "sweep",
        str(CONFIG),
        "-o",
        str(out),
        "--space",
        str(space),
        "-q",
        *sets(example),
        *extra,
    ]


def run(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode not in (0, 1):  # 1: no variant passes the gates; the fronts still count
        sys.exit(f"{' '.join(cmd[:6])} ... failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")


def front(out: Path) -> tuple[list[list[float]], list[str], dict]:
    sweep = json.loads((out / "sweep.json").read_text())
    study = sweep["study"]
    points = [r["objective_values"] for r in sweep["variants"] if r["pareto"]]
    return points, study["directions"], study["counts"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="12 trials each, 4 per throughput run")
    parser.add_argument("--tiny", action="store_true", help="4 trials each (a loaded shared machine)")
    parser.add_argument("--trials", type=int, default=None)
    parser.add_argument("--workers", default="1,2,4", help="worker counts for the throughput runs (none: skip them)")
    parser.add_argument(
        "--objectives",
        default=None,
        help="comma-separated study objectives, e.g. metric,size (default: the study's own, metric, latency, size)",
    )
    parser.add_argument(
        "--throughput-only",
        action="store_true",
        help="only trials/min with 1, 2, 4 workers, on a cheap recipe (export + dynamic int8 of the digits CNN, "
        "8 grid points): for a machine too loaded for the fine-tuning recipe",
    )
    args = parser.parse_args()
    size = 4 if args.tiny else 12 if args.quick else 40
    trials = args.trials or size
    grid = GRIDS[size]

    from optcli.examples.digits import make_example

    work = Path(tempfile.mkdtemp(prefix="optcli-bench-sweep-"))
    example = work / "example"
    if args.throughput_only:
        make_example(example, width=16, epochs=4, formats=("pt",))
        cheap_throughput(work, example, [int(x) for x in args.workers.split(",")])
        return
    make_example(example, width=32, epochs=8, formats=("pt",))
    (work / "space.yaml").write_text(json.dumps(SPACE))
    (work / "grid.yaml").write_text(json.dumps(grid))
    (work / "small.yaml").write_text(json.dumps(SMALL))

    # TPE: two local workers, a third joins from another process once they are under way
    tpe = work / "tpe"
    objectives = [a for o in (args.objectives or "").split(",") if o for a in ("--objective", o)]
    t0 = time.perf_counter()
    pair = subprocess.Popen(
        sweep_cmd(
            tpe, work / "space.yaml", example, "--sampler", "tpe", "--trials", str(trials), "--jobs", "2", *objectives
        ),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    while not (tpe / "study.json").exists() and pair.poll() is None:
        time.sleep(0.5)
    third = sweep_cmd(
        tpe, work / "space.yaml", example, "--sampler", "tpe", "--trials", str(trials), "--worker", *objectives
    )
    run(third)
    pair.wait()
    tpe_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    run(sweep_cmd(work / "grid", work / "grid.yaml", example, "--sampler", "grid", "--jobs", "2", *objectives))
    grid_s = time.perf_counter() - t0

    fronts = {"tpe": front(tpe), "grid": front(work / "grid")}
    hv = normalized_hypervolumes({k: pts for k, (pts, _, _) in fronts.items()}, fronts["tpe"][1])
    # The same trials judged on accuracy and size alone: both are deterministic for a trial's values, while the
    # p50 latency of these variants (all the same dense int8 graph) differs by the machine's noise only.
    pairs = {k: metric_size_front(work / k) for k in ("tpe", "grid")}
    hv_pair = normalized_hypervolumes(pairs, ["maximize", "minimize"])

    print(f"CPU: {cpu_name()}, {os.cpu_count()} cores; load average {os.getloadavg()[0]:.1f}", flush=True)
    print(f"space: {json.dumps(SPACE)}", flush=True)
    print(f"{'study':<28}{'trials done':>12}{'front':>7}{'hypervolume':>13}{'wall s':>9}", flush=True)
    for key, label, secs in (
        ("tpe", "TPE, --jobs 2 + 1 worker", tpe_s),
        ("grid", f"grid ({len(list(_points(grid)))} points), --jobs 2", grid_s),
    ):
        pts, _, counts = fronts[key]
        print(f"{label:<28}{counts['complete']:>12}{len(pts):>7}{hv[key]:>13.4f}{secs:>9.0f}", flush=True)
    names = ", ".join(json.loads((tpe / "sweep.json").read_text())["study"]["objectives"])
    print(f"hypervolume TPE / grid: {hv['tpe'] / hv['grid']:.3f} (objectives {names}, normalized, reference 1.1)")
    print(
        f"on accuracy and size alone (same trials): TPE {hv_pair['tpe']:.4f}, grid {hv_pair['grid']:.4f}, "
        f"TPE / grid {hv_pair['tpe'] / hv_pair['grid']:.3f}; fronts {len(pairs['tpe'])} and {len(pairs['grid'])} points",
        flush=True,
    )
    for key in ("tpe", "grid"):
        print(f"  {key} front (accuracy, bytes): {sorted(pairs[key], reverse=True)}", flush=True)
    if args.workers == "none":
        return

    rates = {}
    for n in [int(x) for x in args.workers.split(",")]:
        out = work / f"throughput-{n}"
        t0 = time.perf_counter()
        run(sweep_cmd(out, work / "small.yaml", example, "--sampler", "grid", "--jobs", str(n)))
        minutes = (time.perf_counter() - t0) / 60
        rates[n] = front(out)[2]["complete"] / minutes
    base = rates[min(rates)]
    print("workers  trials/min  vs 1 worker", flush=True)
    for n, r in rates.items():
        print(f"{n:>7}  {r:>10.2f}  {r / base:>10.2f}x", flush=True)


def normalized_hypervolumes(fronts: dict[str, list], dirs: list[str]) -> dict[str, float]:
    """Each front's hypervolume after one normalization taken from all fronts together (0 best .. 1 worst per
    objective, reference 1.1), so the figures compare."""
    from optcli.verbs.study.front import hypervolume

    everything = [p for pts in fronts.values() for p in pts]
    columns = list(zip(*everything, strict=True))
    worst = [min(v) if d == "maximize" else max(v) for v, d in zip(columns, dirs, strict=True)]
    best = [max(v) if d == "maximize" else min(v) for v, d in zip(columns, dirs, strict=True)]
    span = [abs(w - b) or 1.0 for w, b in zip(worst, best, strict=True)]
    norm = lambda p: [abs(x - b) / s for x, b, s in zip(p, best, span, strict=True)]  # noqa: E731
    return {
        k: hypervolume([norm(p) for p in pts], ["minimize"] * len(dirs), [1.1] * len(dirs)) for k, pts in fronts.items()
    }


def metric_size_front(out: Path) -> list[tuple[float, int]]:
    """The (accuracy up, size down) Pareto front of a study's finished trials."""
    rows = json.loads((out / "sweep.json").read_text())["variants"]
    points = {(r["metric"], r["size_bytes"]) for r in rows if r["state"] == "complete" and r["metric"] is not None}
    return [p for p in points if not any(q != p and q[0] >= p[0] and q[1] <= p[1] for q in points)]


def cheap_throughput(work: Path, example: Path, workers: list[int]) -> None:
    import yaml

    recipe = {
        "model": {
            "path": str(example / "digits_cnn.pt"),
            "factory": "optcli.examples.digits:build_cnn",
            "factory_kwargs": {"width": 16},
            "inputs": [{"name": "x", "shape": [1, 1, 8, 8], "dtype": "float32"}],
        },
        "data": {
            "calibration": {"path": str(example / "digits_calib.npz"), "samples": 64},
            "eval": {"path": str(example / "digits_test.npz"), "labels": "y"},
        },
        "passes": [{"type": "export"}, {"type": "quantize", "mode": "dynamic"}],
        "report": {"latency": {"batch_sizes": [1], "warmup": 1, "runs": 10, "threads": 1}},
    }
    (work / "cheap.yaml").write_text(yaml.safe_dump(recipe))
    space = {"passes.1.per_channel": [True, False], "passes.1.reduce_range": [False, True], "passes.0.opset": [17, 18]}
    (work / "cheap-space.yaml").write_text(json.dumps(space))
    print(f"CPU: {cpu_name()}, {os.cpu_count()} cores; load average {os.getloadavg()[0]:.1f}", flush=True)
    print("recipe: export + dynamic int8 of the digits CNN (width 16); 8 grid points per run", flush=True)
    rates = {}
    for n in workers:
        out = work / f"cheap-{n}"
        cmd = [sys.executable, "-m", "optcli", "sweep", str(work / "cheap.yaml"), "-o", str(out)]
        cmd += ["--space", str(work / "cheap-space.yaml"), "--sampler", "grid", "--jobs", str(n), "-q"]
        t0 = time.perf_counter()
        run(cmd)
        minutes = (time.perf_counter() - t0) / 60
        rates[n] = front(out)[2]["complete"] / minutes
        print(f"{n} workers: {front(out)[2]['complete']} trials in {minutes * 60:.0f} s", flush=True)
    base = rates[min(rates)]
    print("workers  trials/min  vs 1 worker", flush=True)
    for n, r in rates.items():
        print(f"{n:>7}  {r:>10.2f}  {r / base:>10.2f}x", flush=True)


def _points(grid: dict):
    import itertools

    return itertools.product(*grid.values())


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


if __name__ == "__main__":
    main()
