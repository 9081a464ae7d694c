"""Sliding-window perplexity of a decoder folder on one token stream, the way LLM papers and transformers' guide
measure it: windows of `context` tokens every `stride` tokens, each token scored once, with up to
context - stride tokens of left context (https://huggingface.co/docs/transformers/perplexity).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from optcli.errors import BadInput


def text_tokens(tokenizer_folder: Path, text_path: Path) -> np.ndarray:
    """The whole text file as one token stream through the folder's own tokenizer (lines joined by newlines)."""
    from optcli.hf import offline
    from optcli.hf.load import load_tokenizer

    try:
        text = Path(text_path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise BadInput(f"{text_path}: not UTF-8 text (byte {e.start}); save it as UTF-8") from None
    if not text.strip():
        raise BadInput(f"{text_path}: holds no text")
    tokenizer = load_tokenizer(Path(tokenizer_folder))
    with offline():
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return np.asarray(ids, dtype=np.int64)


def windows(n: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, scored) per window: the last `scored` positions of ids[begin:end] are predicted there."""
    out, previous_end = [], 0
    for begin in range(0, n, stride):
        end = min(begin + context, n)
        scored = end - previous_end
        if begin == 0:
            scored -= 1  # the first token has nothing to be predicted from
        if scored > 0:
            out.append((begin, end, scored))
        previous_end = end
        if end == n:
            break
    return out


def check_long_enough(n: int, context: int, where: str) -> None:
    if n < context + 1:
        raise BadInput(
            f"{where}: the text is {n} tokens, shorter than one perplexity window of {context + 1}; "
            f"give more text or lower report.llm.context"
        )


def perplexity(
    decoder_dir: Path,
    token_ids: np.ndarray,
    context: int,
    stride: int,
    providers=("CPUExecutionProvider",),
    threads: int | None = None,
) -> float:
    """exp(mean next-token negative log-likelihood) of `token_ids` under the decoder in `decoder_dir`.

    Each window is a prefill from an empty KV cache (past key/values of length 0), so the figure is the model's as
    onnxruntime-genai runs it, graph for graph."""
    from optcli.llm.decoder import Decoder

    if not 0 < stride <= context:
        raise BadInput(f"report.llm.stride must be between 1 and the context ({context}), not {stride}")
    ids = np.asarray(token_ids, dtype=np.int64).ravel()
    check_long_enough(len(ids), context, str(decoder_dir))
    decoder = Decoder(decoder_dir, providers, threads)
    total, count = 0.0, 0
    for begin, end, scored in windows(len(ids), context, stride):
        logits, _ = decoder(ids[begin:end])
        logits = logits[0, -scored - 1 : -1].astype(np.float64)
        target = ids[end - scored : end]
        shifted = logits - logits.max(-1, keepdims=True)
        log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
        total -= float(log_probs[np.arange(scored), target].sum())
        count += scored
    return math.exp(total / count)
