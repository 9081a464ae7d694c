"""Decoder LLM int4: the model builder's int4 beside optcli's int4 (defaults, and a perplexity target), int8 and fp32.

    python benchmarks/bench_llm.py                    # trains the quality model first (cached), then the table
    python benchmarks/bench_llm.py --quick            # fewer rounds and windows: checks the script works
    python benchmarks/bench_llm.py --json build/bench_llm.json

The model is the small Qwen2 decoder llm_quality_model.py trains here on the standard library's docstrings; the
text scored is its held-out split (modules it never saw). Rows, all from the same folder in one run:
  fp32              onnxruntime-genai's model builder, -p fp32 -e cpu (the reference for perplexity and agreement)
  builder int4      the builder's -p int4 -e cpu as it ships (round-to-nearest, block 32, symmetric, lm_head int4)
  optcli int4       optcli's weight-only int4 on the fp32 export with the decoder defaults documented in
                    docs/llm-int4.md (GPTQ calibrated on the training text, block 32, lm_head int8, embeddings int4)
  optcli int4 target   the same with target {metric: perplexity, max_drop: half the builder's rise}: the fewest
                    MatMuls in int8, ranked by their measured perplexity rise
  int8 dynamic      optcli's dynamic int8 of the decoder's MatMuls
Columns: size (model files on disk), peak RSS of a process that loads the model and generates, time to first token
(prompt of --prompt tokens), decode tokens/s (--new tokens, batch 1, KV cache, greedy), perplexity on the held-out
text (sliding windows), greedy agreement with fp32 (share of the first 32 generated tokens identical, K prompts).
Timing is interleaved: each round runs every model once in a fresh process, in rotated order; a figure is the
median over rounds. Generation runs in onnxruntime-genai with 2 intra-op threads.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
PY = sys.executable
THREADS = 2


def builder(folder: Path, out: Path, precision: str, cache: Path) -> Path:
    if not (out / "genai_config.json").is_file():
        subprocess.run(
            [PY, "-m", "onnxruntime_genai.models.builder", "-i", str(folder), "-o", str(out), "-p", precision]
            + ["-e", "cpu", "-c", str(cache)],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    return out


def context(step_dir: Path, text: Path, calib_text: Path, window: int):
    """What the quantize pass reads of a run, for an in-process call (the decoder's CLI path is the llm branch's)."""
    from optcli.passes.base import silent_feedback

    source = SimpleNamespace(text=text, max_length=window, samples=None)
    calib = SimpleNamespace(text=calib_text, max_length=window, samples=16)
    recipe = SimpleNamespace(
        data=SimpleNamespace(eval=source, calibration=calib),
        report=SimpleNamespace(latency=SimpleNamespace(threads=THREADS), target="cpu"),
    )
    return SimpleNamespace(
        step_name="2-quantize",
        step_dir=step_dir,
        recipe=recipe,
        details={},
        warnings=[],
        warn=lambda m: print(f"  warning: {m}", file=sys.stderr),
        log=lambda m: print(f"  {m}", file=sys.stderr),
        progress=silent_feedback(),
    )


def optcli_int4(fp32: Path, out: Path, text: Path, calib: Path, window: int, **settings) -> tuple[Path, dict]:
    from optcli.passes.quantize.config import Config
    from optcli.passes.quantize.decoder import copy_side_files
    from optcli.passes.quantize.weight_mix import run_search
    from optcli.passes.quantize.weight_only import quantize_weights

    out.mkdir(parents=True, exist_ok=True)
    config = Config(weights="int4", **settings)
    ctx = context(out, text, calib, window)
    model = SimpleNamespace(path=fp32 / "model.onnx")
    target = out / "model.onnx"
    if config.target is not None:
        details = run_search(model, config, ctx, model.path, target, set())
    else:
        details = quantize_weights(model, target, config, set(), ctx)
    copy_side_files(fp32, out, {"model.onnx", "model.onnx.data"})
    return out, {**details, **({"search": ctx.details.get("search")} if "search" in ctx.details else {})}


def optcli_int8(fp32: Path, out: Path) -> Path:
    from optcli.passes.quantize.config import Config
    from optcli.passes.quantize.decoder import copy_side_files, int8_dynamic
    from optcli.passes.quantize.isa import choose_int8

    out.mkdir(parents=True, exist_ok=True)
    config = Config()
    int8_dynamic(fp32 / "model.onnx", out / "model.onnx", config, choose_int8(config), context(out, out, out, 8))
    copy_side_files(fp32, out, {"model.onnx", "model.onnx.data"})
    return out


def size(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.iterdir() if f.name.startswith("model.onnx"))


def set_threads(folder: Path) -> None:
    config_file = folder / "genai_config.json"
    config = json.loads(config_file.read_text())
    config["model"]["decoder"]["session_options"]["intra_op_num_threads"] = THREADS
    config_file.write_text(json.dumps(config, indent=1))


def child(folder: str, prompts_file: str, new: int) -> None:
    """One process: load, generate for every prompt, print TTFT / decode tok/s / tokens / peak RSS as JSON."""
    import numpy as np
    import onnxruntime_genai as og

    prompts = json.loads(Path(prompts_file).read_text())
    model = og.Model(folder)
    rows = []
    for i, prompt in enumerate([prompts[0]] + prompts):  # the first run warms up
        params = og.GeneratorParams(model)
        total = len(prompt) + new
        params.set_search_options(max_length=total, min_length=total, do_sample=False, batch_size=1)
        gen = og.Generator(model, params)
        t0 = time.perf_counter()
        gen.append_tokens(np.asarray(prompt, dtype=np.int32)[None])
        gen.generate_next_token()
        tokens = [int(gen.get_next_tokens()[0])]
        t1 = time.perf_counter()
        while not gen.is_done():
            gen.generate_next_token()
            tokens.append(int(gen.get_next_tokens()[0]))
        t2 = time.perf_counter()
        if i:
            rows.append({"ttft_s": t1 - t0, "decode_tok_s": (len(tokens) - 1) / (t2 - t1), "tokens": tokens})
        del gen
    status = Path("/proc/self/status").read_text()
    rss = next(int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("VmHWM"))
    print(json.dumps({"rows": rows, "peak_rss": rss}))


def agreement(tokens: list[list[int]], reference: list[list[int]], first: int = 32) -> float:
    pairs = zip(tokens, reference, strict=True)
    same = [sum(a == b for a, b in zip(t[:first], r[:first], strict=False)) / first for t, r in pairs]
    return sum(same) / len(same)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--minutes", type=float, default=18.0, help="the quality model's training budget (CPU min)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--prompts", type=int, default=4, help="K prompts from the held-out text")
    parser.add_argument("--prompt", type=int, default=64, help="prompt tokens")
    parser.add_argument("--new", type=int, default=64, help="new tokens")
    parser.add_argument("--windows", type=int, default=48, help="perplexity windows of 128 tokens (stride 64)")
    parser.add_argument("--work", type=Path, default=HERE.parent / "build" / "bench_llm")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--folder", type=Path, help="another Hugging Face decoder folder instead (with --text)")
    parser.add_argument("--text", type=Path, help="with --folder: the text scored and calibrated on")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], args.child[1], int(args.child[2]))
        return
    if args.quick:
        args.rounds, args.prompts, args.windows = 1, 2, 8

    import numpy as np
    from llm_quality_model import ensure

    from optcli.passes.quantize import decoder

    if args.folder:
        trained = {"folder": str(args.folder), "held_out_text": str(args.text), "train_text": str(args.text)}
        trained.update(parameters=0, steps=0, minutes=0)
    else:
        trained = ensure(args.minutes)
    folder, held, train_text = Path(trained["folder"]), Path(trained["held_out_text"]), Path(trained["train_text"])
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    cache = work / "cache"
    calib = work / "calibration.txt"  # GPTQ's calibration: a slice of the training text, never the held-out one
    calib.write_text(train_text.read_text()[:200_000])
    window = 128
    t0 = time.perf_counter()
    rows: dict[str, Path] = {}
    rows["fp32"] = builder(folder, work / "fp32", "fp32", cache)
    rows["builder int4"] = builder(folder, work / "builder_int4", "int4", cache)
    ids = decoder.token_ids(held, rows["fp32"])
    chunks = decoder.windows(ids, window, window // 2, args.windows)
    ppl = {"fp32": decoder.perplexity(rows["fp32"] / "model.onnx", chunks, THREADS)}
    ppl["builder int4"] = decoder.perplexity(rows["builder int4"] / "model.onnx", chunks, THREADS)
    rise = ppl["builder int4"] - ppl["fp32"]
    defaults = {"algorithm": "gptq", "block_size": 32, "lm_head": "int8", "embeddings": "int4"}
    notes = {}
    shutil.rmtree(work / "optcli_int4", ignore_errors=True)
    rows["optcli int4"], notes["optcli int4"] = optcli_int4(
        rows["fp32"], work / "optcli_int4", held, calib, window, **defaults
    )
    shutil.rmtree(work / "optcli_int4_target", ignore_errors=True)
    target = {"metric": "perplexity", "max_drop": max(rise / 2, 1e-6)}
    no_head = {k: v for k, v in defaults.items() if k != "lm_head"}  # the search decides the lm_head too
    rows["optcli int4 target"], notes["optcli int4 target"] = optcli_int4(
        rows["fp32"],
        work / "optcli_int4_target",
        held,
        calib,
        window,
        target=target,
        search={"eval_samples": args.windows, "sensitivity_samples": max(4, args.windows // 4)},
        **no_head,
    )
    shutil.rmtree(work / "int8_dynamic", ignore_errors=True)
    rows["int8 dynamic"] = optcli_int8(rows["fp32"], work / "int8_dynamic")
    for name in rows:
        set_threads(rows[name])
        if name not in ppl:
            ppl[name] = decoder.perplexity(rows[name] / "model.onnx", chunks, THREADS)
    quantize_s = time.perf_counter() - t0

    # K prompts of --prompt tokens from the held-out text, evenly spread.
    starts = np.linspace(0, len(ids) - args.prompt - 1, args.prompts).astype(int)
    prompts_file = work / "prompts.json"
    prompts_file.write_text(json.dumps([ids[s : s + args.prompt].tolist() for s in starts]))
    runs: dict[str, list[dict]] = {name: [] for name in rows}
    names = list(rows)
    for r in range(args.rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            out = subprocess.run(
                [PY, __file__, "--child", str(rows[name]), str(prompts_file), str(args.new)],
                check=True,
                capture_output=True,
                text=True,
            )
            runs[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
    reference_tokens = [row["tokens"] for row in runs["fp32"][0]["rows"]]
    table = []
    for name in rows:
        ttft = statistics.median(statistics.median(x["ttft_s"] for x in run["rows"]) for run in runs[name])
        tps = statistics.median(statistics.median(x["decode_tok_s"] for x in run["rows"]) for run in runs[name])
        table.append(
            {
                "row": name,
                "size_bytes": size(rows[name]),
                "peak_rss_bytes": max(run["peak_rss"] for run in runs[name]),
                "ttft_ms": round(ttft * 1000, 2),
                "decode_tok_s": round(tps, 1),
                "perplexity": round(ppl[name], 3),
                "greedy_agreement": round(agreement([x["tokens"] for x in runs[name][0]["rows"]], reference_tokens), 3),
            }
        )
    base = table[0]
    print(
        f"\n{trained['parameters'] / 1e6:.1f}M-parameter Qwen2 trained here ({trained['steps']} steps, "
        f"{trained.get('cpu_minutes', trained['minutes'])} CPU min); perplexity on {len(chunks)} held-out windows of "
        f"{window}; prompt {args.prompt}, {args.new} new tokens, {args.prompts} prompts, {args.rounds} rounds, "
        f"{THREADS} threads"
    )
    print(
        f"{'row':<20}{'size MB':>9}{'peak RSS MB':>12}{'TTFT ms':>9}{'tok/s':>8}{'x fp32':>7}{'ppl':>9}{'Δppl':>8}"
        f"{'agree':>7}"
    )
    for row in table:
        print(
            f"{row['row']:<20}{row['size_bytes'] / 1e6:>9.2f}{row['peak_rss_bytes'] / 1e6:>12.0f}{row['ttft_ms']:>9.1f}"
            f"{row['decode_tok_s']:>8.1f}{row['decode_tok_s'] / base['decode_tok_s']:>7.2f}{row['perplexity']:>9.3f}"
            f"{row['perplexity'] - base['perplexity']:>+8.3f}{row['greedy_agreement']:>7.2f}"
        )
    search = (notes["optcli int4 target"].get("search") or {}) if isinstance(notes["optcli int4 target"], dict) else {}
    print(f"target search: {search.get('chosen')} (target perplexity <= {search.get('target')})")
    sens = list((search.get("sensitivity") or {}).items())[:6]
    if sens:
        print("most sensitive MatMuls (perplexity rise alone at int4): " + ", ".join(f"{n} {v:+.3f}" for n, v in sens))
    print(f"quantization and perplexity took {quantize_s:.0f} s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"model": trained, "rows": table, "notes": notes}, indent=1, default=str))


if __name__ == "__main__":
    main()
