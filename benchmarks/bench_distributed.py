"""Digits CNN fine-tune: samples/s with 1 worker vs N workers (torch elastic launch + DDP), one run.

    python benchmarks/bench_distributed.py [--repeats 3] [--epochs 3] [--batch 64]

CPU: 1 worker (in the optcli process, all cores) vs 2 workers (gloo, cores shared between them).
GPU machine: also 1 GPU vs every GPU (NCCL). Each configuration is a real `optcli run` of the same
recipe; the figure is the report's training samples/s (global samples / rank 0's training time of
each epoch, so process start-up is left out) with the step's wall seconds (start-up included) beside
it. The per-worker batch stays fixed, so N workers take N times the global batch (weak scaling);
scaling efficiency = samples/s with N workers / (N x samples/s of one worker with the same threads
per worker). Median over repeats, configurations alternated so machine load hits all alike. On a
loaded machine one process spreading OpenMP threads over every core suffers most (its threads wait
on each other at every op), so the all-cores row is printed too: check `uptime` beside the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch", type=int, default=64, help="per-worker batch")
    parser.add_argument("--width", type=int, default=32, help="DigitsCNN width")
    args = parser.parse_args()

    import torch

    from optcli.examples.digits import make_example

    work = Path(tempfile.mkdtemp(prefix="optcli-bench-dist-"))
    make_example(work / "example", width=args.width, epochs=2, formats=("pt",))
    cores = os.cpu_count() or 1
    recipe = {
        "model": {
            "path": str(work / "example" / "digits_cnn.pt"),
            "factory": "optcli.examples.digits:build_cnn",
            "factory_kwargs": {"width": args.width},
            "inputs": [{"name": "x", "shape": [1, 1, 8, 8], "dtype": "float32"}],
        },
        "data": {
            "train": {"path": str(work / "example" / "digits_train.npz"), "batch_size": args.batch},
            "eval": {"path": str(work / "example" / "digits_test.npz"), "labels": "y"},
        },
        "passes": [{"type": "finetune", "epochs": args.epochs, "device": "cpu"}],
        # The runner sets torch's threads from here; all cores, so one worker is not starved against two.
        "report": {"latency": {"batch_sizes": [1], "warmup": 1, "runs": 3, "threads": cores}},
    }
    path = work / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))

    # Each of 2 CPU workers gets cores // 2 threads, so the baseline is one worker with that many threads
    # (OMP_NUM_THREADS); one worker on every core is shown beside it, as one optcli process runs today.
    half = max(1, cores // 2)
    configs = [
        (f"cpu, 1 worker x {half} thr", 1, [], {"OMP_NUM_THREADS": str(half)}),
        (f"cpu, 2 workers x {half} thr", 2, ["--nproc-per-node", "2"], {}),
        (f"cpu, 1 worker x {cores} thr", 1, [], {"OMP_NUM_THREADS": str(cores)}),
    ]
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus:
        configs += [
            ("cuda, 1 GPU", 1, ["--set", "passes.0.device=cuda"], {}),
            (f"cuda, {gpus} GPUs (nccl)", gpus, ["--set", "passes.0.device=cuda", "--nproc-per-node", "auto"], {}),
        ]
    rows = {name: {"n": n, "sps": [], "wall": [], "block": None} for name, n, _, _ in configs}
    for rep in range(args.repeats):
        for index, (name, _, flags, env) in enumerate(configs):
            out = work / f"out-{rep}-{index}"
            proc = subprocess.run(
                [sys.executable, "-m", "optcli", "run", str(path), "-o", str(out), "--json", "--quiet", *flags],
                capture_output=True,
                text=True,
                env={**os.environ, **env},
            )
            if proc.returncode != 0:
                sys.exit(f"{name}: optcli run failed ({proc.returncode}): {proc.stderr.strip()}")
            step = json.loads(proc.stdout)["steps"][-1]
            block = step["details"]["training"]
            rows[name]["sps"].append(block["samples_per_s"])
            rows[name]["wall"].append(step["seconds"])
            rows[name]["block"] = block

    print(
        f"digits CNN (width {args.width}) fine-tune, {args.epochs} epochs, {args.batch} samples per worker per step, "
        f"{cores} CPU cores (load average {os.getloadavg()[0]:.1f} at the end), median over {args.repeats} repeats"
    )
    print(
        f"{'configuration':<28}{'world':>6}{'global batch':>13}{'samples/s':>11}{'per worker':>11}{'scaling eff.':>13}{'step wall s':>12}  devices"
    )
    for kind in ("cpu", "cuda"):
        base = next((r for name, r in rows.items() if name.startswith(kind) and r["n"] == 1), None)
        for name, r in rows.items():
            if not name.startswith(kind):
                continue
            sps, b = statistics.median(r["sps"]), r["block"]
            per_worker = sps / r["n"]
            eff = sps / (r["n"] * statistics.median(base["sps"])) if base else float("nan")
            devices = ", ".join(sorted(set(b["devices"])))
            print(
                f"{name:<28}{b['world_size']:>6}{b['global_batch']:>13}{sps:>11.0f}{per_worker:>11.0f}"
                f"{eff:>13.2f}{statistics.median(r['wall']):>12.2f}  {devices}"
            )
    if not gpus:
        print("no CUDA GPU visible: the 1-GPU / all-GPU rows need a GPU machine")


if __name__ == "__main__":
    main()
