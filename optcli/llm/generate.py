"""Generation measured the way LLM users measure it, with onnxruntime-genai's own generator (batch 1, KV cache,
greedy): time to first token for an N-token prompt, decode tokens/s after it, the tokens themselves (greedy
agreement with the original), and the decode speed-up over the original timed side by side (abtest).

`python -m optcli.llm.generate FOLDER PROMPTS.json NEW_TOKENS THREADS` measures one folder in a child process and
prints JSON with its peak resident memory: the figure is the generating process's own, not optcli's.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path
from typing import cast

import numpy as np

AGREEMENT_TOKENS = 32  # greedy agreement: the share of the first 32 generated tokens identical to the original's


def prompts_from_tokens(token_ids: np.ndarray, count: int, length: int) -> list[list[int]]:
    """`count` prompts of `length` tokens, spread evenly over the token stream (from the eval text)."""
    ids = np.asarray(token_ids).ravel()
    last = len(ids) - length
    if last < 0:
        return []
    starts = np.linspace(0, last, num=count).astype(int) if count > 1 else [0]
    return [ids[s : s + length].tolist() for s in starts]


def load(folder: Path, threads: int | None = None):
    import onnxruntime_genai as og

    config = og.Config(str(folder))
    if threads:
        config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": int(threads)}}}}))
    return og.Model(config)


def generate(model, prompt: list[int], new_tokens: int) -> tuple[list[int], float, float]:
    """(tokens, seconds to the first token, seconds for the tokens after it); greedy, exactly new_tokens long
    (min_length holds the end-of-text token back, so every model is timed on the same count)."""
    import onnxruntime_genai as og

    params = og.GeneratorParams(model)
    total = len(prompt) + new_tokens
    params.set_search_options(max_length=total, min_length=total, do_sample=False)
    generator = og.Generator(model, params)
    t0 = time.perf_counter()
    generator.append_tokens(np.asarray(prompt, dtype=np.int32))
    generator.generate_next_token()
    tokens = [int(generator.get_next_tokens()[0])]
    t1 = time.perf_counter()
    while not generator.is_done():
        generator.generate_next_token()
        tokens.append(int(generator.get_next_tokens()[0]))
    return tokens, t1 - t0, time.perf_counter() - t1


def measure_generation(folder: Path, prompts: list[list[int]], new_tokens: int, threads: int | None = None) -> dict:
    """Median time to first token and decode tokens/s over the prompts (after one warm-up), and the tokens."""
    model = load(folder, threads)
    generate(model, prompts[0], min(new_tokens, 4))  # warm-up: thread pools, first-call allocations
    ttft, rates, tokens = [], [], []
    for prompt in prompts:
        got, first, rest = generate(model, prompt, new_tokens)
        ttft.append(first)
        rates.append((len(got) - 1) / rest if rest > 0 else float("nan"))
        tokens.append(got)
    return {
        "prompt_tokens": len(prompts[0]),
        "new_tokens": new_tokens,
        "prompts": len(prompts),
        "ttft_ms": round(statistics.median(ttft) * 1000, 3),
        "decode_tokens_per_s": round(statistics.median(rates), 2),
        "tokens": tokens,
    }


def greedy_agreement(reference: list[list[int]], tokens: list[list[int]], first: int = AGREEMENT_TOKENS) -> float:
    """The share of the first `first` generated tokens identical, position by position, over all prompts."""
    same = total = 0
    for ref, got in zip(reference, tokens, strict=True):
        n = min(first, len(ref))
        same += sum(1 for a, b in zip(ref[:n], got[:n], strict=False) if a == b)
        total += n
    return same / total if total else float("nan")


def measure_in_child(folder: Path, prompts: list[list[int]], new_tokens: int, threads: int | None, work: Path) -> dict:
    """measure_generation in a child process; adds peak_rss_bytes (the child's, from the kernel)."""
    from optcli.errors import first_line
    from optcli.llm.memory import run_child

    path = Path(work) / "prompts.json"
    path.write_text(json.dumps(prompts))
    try:
        result = run_child("optcli.llm.generate", [str(folder), str(path), str(new_tokens), str(threads or 0)])
    finally:
        path.unlink(missing_ok=True)
    if result.returncode != 0:
        said = [line for line in result.stderr.splitlines() if line.strip()]
        raise RuntimeError(f"generating with {Path(folder).name} failed: {first_line(said[-1] if said else '?')}")
    row = json.loads(result.stdout.strip().splitlines()[-1])
    return {**row, "peak_rss_bytes": result.peak_rss_bytes}


def side_by_side(base: Path, new: Path, prompt: list[int], new_tokens: int, rounds: int, runs: int, threads=None):
    """{"decode": Ratio, "ttft": Ratio}: new/base time of the decode and of the first token, from the same
    generations, interleaved in this process (abtest: A B A B ..., order reversed every other round; < 1: new is
    faster)."""
    from optcli.abtest import interleaved, ratio_interval

    models = [load(base, threads), load(new, threads)]
    first: list[list[float]] = [[], []]

    def call(i):
        def generation():
            _, ttft, decode = generate(models[i], prompt, new_tokens)
            first[i].append(ttft)
            return decode  # the decode seconds only: the prefill is the first token's

        return generation

    decode = interleaved(
        [call(0), call(1)], rounds, runs, warmup=1, timer=lambda c: cast(float, c())
    )  # each call returns its decode seconds
    # interleaved ran each model once to warm up, then `runs` times per round, round by round
    ttft = np.array([np.median(np.reshape(f[1:], (rounds, runs)), axis=1) for f in first]).T
    return {
        "decode": ratio_interval(decode[:, 0], decode[:, 1], runs),
        "ttft": ratio_interval(ttft[:, 0], ttft[:, 1], runs),
    }


def main(argv: list[str]) -> None:
    folder, prompts_path, new_tokens, threads = argv
    prompts = json.loads(Path(prompts_path).read_text())
    row = measure_generation(Path(folder), prompts, int(new_tokens), int(threads) or None)
    print(json.dumps(row))


if __name__ == "__main__":
    main(sys.argv[1:])
