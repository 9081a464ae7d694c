"""Decoder LLM int4: the model builder's int4 beside optcli's int4 (defaults, and a perplexity target), int8 and fp32.

    python benchmarks/bench_llm.py                    # trains the quality model first (cached), then the table
    python benchmarks/bench_llm.py --quick            # fewer rounds and windows: checks the script works
    python benchmarks/bench_llm.py --json build/bench_llm.json

The model is the small Qwen2 decoder llm_quality_model.py trains here on the standard library's docstrings; the
text scored is its held-out split (modules it never saw). Rows, all from the same folder in one run:
  fp32              onnxruntime-genai's model builder, -p fp32 -e cpu (the reference for perplexity and agreement)
  builder int4      the builder's -p int4 -e cpu as it ships (round-to-nearest, block 32, symmetric, lm_head int4)
  optcli int4 lm4   RTN with lm_head: int4 (the builder's int4, made by optcli's pass)
  optcli int4       optcli's weight-only int4 on the fp32 export, `weights: int4` alone: the decoder defaults of
                    docs/llm-int4.md (the builder's int4 -- RTN, symmetric blocks of 32, accuracy_level 4 -- with
                    the lm_head in int8)
  optcli int4 gptq  algorithm: gptq, calibrated on a slice of the training text (never the held-out one)
  optcli int4 gptq lm4   the same with lm_head: int4, the builder's size exactly
  gptq lm4 in order      the same in column order (act_order: false)
  optcli int4 awq   algorithm: awq (optcli's activation-aware scales and clipping, then RTN), calibrated on the same
                    slice of the training text as gptq
  optcli int4 awq lm4    the same with lm_head: int4, the builder's size exactly
  optcli int4 target   gptq with target {metric: perplexity, max_increase: half the builder's rise}: the fewest
                    MatMuls in int8 (the lm_head among the candidates), ranked by their measured perplexity rise
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
# The generation children import optcli: this checkout's, not whichever the interpreter has installed.
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(HERE.parent), os.environ.get("PYTHONPATH")) if p)
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


def quantize(fp32: Path, out: Path, tokens, calib: Path, window: int, **settings) -> tuple[Path, dict]:
    """optcli's quantize pass on the fp32 decoder folder, called as `optcli run` calls it after `decoder: fp32`
    (its data: the eval text's tokens; GPTQ calibrates on data.calibration.text)."""
    from optcli.llm.config import LlmReport
    from optcli.model import Model
    from optcli.passes.base import Context
    from optcli.passes.quantize import apply
    from optcli.passes.quantize.config import Config

    out.mkdir(parents=True, exist_ok=True)
    recipe = SimpleNamespace(
        data=SimpleNamespace(eval=None, calibration=SimpleNamespace(text=calib, tokenizer=None, samples=16)),
        report=SimpleNamespace(llm=LlmReport(context=window, stride=window // 2, threads=THREADS), target="cpu"),
        passes=[],
    )
    ctx = Context(
        recipe=recipe,
        step_name="2-quantize",
        step_dir=out,
        reference=None,
        data=SimpleNamespace(tokens=tokens),
        log=lambda m: print(f"  {m}", file=sys.stderr),
    )
    model = apply(Model(format="genai", inputs=[], path=fp32), Config(**settings), ctx)
    for w in ctx.warnings:
        print(f"  warning: {w}", file=sys.stderr)
    return Path(model.path), ctx.details


def size(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.iterdir() if f.name.startswith("model.onnx"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--minutes", type=float, default=24.0, help="the quality model's training budget (CPU min)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--prompts", type=int, default=4, help="K prompts from the held-out text")
    parser.add_argument("--prompt", type=int, default=64, help="prompt tokens")
    parser.add_argument("--new", type=int, default=64, help="new tokens")
    parser.add_argument("--windows", type=int, default=48, help="perplexity windows of 128 tokens (stride 64)")
    parser.add_argument("--work", type=Path, default=HERE.parent / "build" / "bench_llm")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--folder", type=Path, help="another Hugging Face decoder folder instead (with --text)")
    parser.add_argument("--text", type=Path, help="with --folder: the text scored and calibrated on")
    parser.add_argument(
        "--rows",
        help="comma-separated optcli rows to run (default: all); fp32 and the builder's int4 always run. For a "
        "real-size random folder, where GPTQ and the target search take long and perplexity means nothing",
    )
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.prompts, args.windows = 1, 2, 8

    import numpy as np
    from llm_quality_model import ensure

    from optcli.llm.generate import greedy_agreement, measure_in_child
    from optcli.llm.perplexity import perplexity, text_tokens

    if args.folder:
        trained = {"folder": str(args.folder), "held_out_text": str(args.text), "train_text": str(args.text)}
        trained.update(parameters=0, steps=0, minutes=0)
    else:
        trained = ensure(args.minutes)
    folder, held, train_text = Path(trained["folder"]), Path(trained["held_out_text"]), Path(trained["train_text"])
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    cache = work / "cache"
    calib = work / "calibration.txt"  # GPTQ's / AWQ's calibration: a slice of the training text, never the held-out one
    calib.write_text(train_text.read_text()[:200_000])
    window = 128
    t0 = time.perf_counter()
    rows: dict[str, Path] = {}
    rows["fp32"] = builder(folder, work / "fp32", "fp32", cache)
    rows["builder int4"] = builder(folder, work / "builder_int4", "int4", cache)
    ids = text_tokens(folder, held)
    scored = ids[: window + window // 2 * (args.windows - 1)]

    def ppl(name: str) -> float:
        return perplexity(rows[name], scored, window, window // 2, threads=THREADS)

    scores = {"fp32": ppl("fp32"), "builder int4": ppl("builder int4")}
    rise = scores["builder int4"] - scores["fp32"]
    notes = {}
    for name, settings in (
        ("optcli int4", {"weights": "int4"}),  # the decoder defaults: the builder's int4 with lm_head int8
        ("optcli int4 lm4", {"weights": "int4", "lm_head": "int4"}),  # RTN at the builder's size
        ("optcli int4 gptq", {"weights": "int4", "algorithm": "gptq"}),
        # the builder's size exactly: every MatMul int4, the lm_head too
        ("optcli int4 gptq lm4", {"weights": "int4", "algorithm": "gptq", "lm_head": "int4"}),
        # GPTQ in column order (act_order: false), what optcli ran before act-order became its default
        (
            "gptq lm4 in order",
            {"weights": "int4", "algorithm": "gptq", "lm_head": "int4", "act_order": False},
        ),
        ("optcli int4 awq", {"weights": "int4", "algorithm": "awq"}),
        ("optcli int4 awq lm4", {"weights": "int4", "algorithm": "awq", "lm_head": "int4"}),
        (
            "optcli int4 target",
            {
                "weights": "int4",
                "algorithm": "gptq",
                "target": {"metric": "perplexity", "max_increase": max(rise / 2 / scores["fp32"], 1e-8)},
                "search": {"eval_samples": args.windows, "sensitivity_samples": max(4, args.windows // 4)},
            },
        ),
        ("int8 dynamic", {"mode": "dynamic"}),
    ):
        if args.rows and name not in args.rows.split(","):
            continue
        step = work / name.replace(" ", "_")
        shutil.rmtree(step, ignore_errors=True)
        rows[name], notes[name] = quantize(rows["fp32"], step, scored, calib, window, **settings)
        scores[name] = ppl(name)
    quantize_s = time.perf_counter() - t0

    # K prompts of --prompt tokens from the held-out text, evenly spread; every model generates in a fresh child
    # process (optcli.llm.generate, what `optcli run` measures with), rounds interleaved in rotated order.
    starts = np.linspace(0, len(ids) - args.prompt - 1, args.prompts).astype(int)
    prompts = [ids[s : s + args.prompt].tolist() for s in starts]
    runs: dict[str, list[dict]] = {name: [] for name in rows}
    names = list(rows)
    for r in range(args.rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            runs[name].append(measure_in_child(rows[name], prompts, args.new, THREADS, work))
    table = []
    for name in rows:
        table.append(
            {
                "row": name,
                "size_bytes": size(rows[name]),
                "peak_rss_bytes": max(run["peak_rss_bytes"] for run in runs[name]),
                "ttft_ms": round(statistics.median(run["ttft_ms"] for run in runs[name]), 2),
                "decode_tok_s": round(statistics.median(run["decode_tokens_per_s"] for run in runs[name]), 1),
                "perplexity": round(scores[name], 3),
                "greedy_agreement": round(greedy_agreement(runs["fp32"][0]["tokens"], runs[name][0]["tokens"]), 3),
            }
        )
    base = table[0]
    print(
        f"\n{trained['parameters'] / 1e6:.1f}M-parameter Qwen2 trained here ({trained['steps']} steps, "
        f"{trained.get('cpu_minutes', trained['minutes'])} CPU min); perplexity on {args.windows} held-out windows of "
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
    # The goal: at the builder's size or smaller, optcli's int4 loses at most half the perplexity the builder's does.
    builder_row = next(r for r in table if r["row"] == "builder int4")
    builder_rise = builder_row["perplexity"] - base["perplexity"]
    for row in table:
        if row["row"].startswith(("optcli int4", "gptq")) and row["size_bytes"] <= builder_row["size_bytes"]:
            rise = row["perplexity"] - base["perplexity"]
            met = rise <= builder_rise / 2
            print(
                f"goal: {row['row']} ({row['size_bytes'] / 1e6:.2f} MB <= builder's {builder_row['size_bytes'] / 1e6:.2f}"
                f" MB): perplexity rise {rise:+.3f} vs half the builder's {builder_rise / 2:+.3f}: "
                f"{'met' if met else 'not met'}"
            )
    search = (notes.get("optcli int4 target") or {}).get("search") or {}
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
