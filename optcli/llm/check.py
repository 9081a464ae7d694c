"""The exported decoder checked against transformers: logits of the prefill and of greedy decode steps through the
KV cache, on the same tokens (transformers' greedy choices feed both, so one divergence cannot hide the rest)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

DECODE_STEPS = 8
# Largest logit error allowed, as a fraction of the largest logit. fp32 export against fp32 transformers: the
# builder fuses attention (GroupQueryAttention) and rotary embeddings, so sums run in another order; the tiny
# decoders of every architecture tested land near 5e-7, a wrong graph (a cache misread, a rotary off by one) near 1.
TOLERANCE = 1e-4


def check_logits(hf_folder: Path, decoder_dir: Path, prompt: list[int], steps: int = DECODE_STEPS) -> dict:
    """{"max_abs_error", "relative_error" (over the logits' max magnitude), "tolerance", "steps", "passed"}."""
    import torch

    from optcli.hf import offline
    from optcli.llm.decoder import Decoder

    with offline():
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(hf_folder), dtype=torch.float32, local_files_only=True)
    model.eval()
    decoder = Decoder(decoder_dir)
    errors, scale = [], 0.0
    with torch.no_grad():
        out = model(torch.tensor([prompt]), use_cache=True)
        expected, cache = out.logits[0].numpy(), out.past_key_values
        got, past = decoder(np.asarray(prompt))
        errors.append(float(np.abs(got[0] - expected).max()))
        scale = max(scale, float(np.abs(expected).max()))
        token = int(expected[-1].argmax())
        for _ in range(steps):
            out = model(torch.tensor([[token]]), past_key_values=cache, use_cache=True)
            expected, cache = out.logits[0].numpy(), out.past_key_values
            got, past = decoder(np.asarray([token]), past)
            errors.append(float(np.abs(got[0] - expected).max()))
            scale = max(scale, float(np.abs(expected).max()))
            token = int(expected[-1].argmax())
    worst = max(errors)
    relative = worst / scale if scale else worst
    return {
        "max_abs_error": worst,
        "relative_error": relative,
        "tolerance": TOLERANCE,
        "prefill_tokens": len(prompt),
        "steps": steps,
        "passed": relative <= TOLERANCE,
    }
