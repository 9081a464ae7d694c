"""What `optcli init` writes for a causal-LM folder the decoder export supports: export with the KV cache,
int4 weights, perplexity and generation measured against the fp32 decoder. Nothing is loaded (a 7B folder is
read from its config.json only)."""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from optcli.hf.folder import raw_config
from optcli.llm.config import LlmReport


def exportable(path: Path) -> bool:
    """A causal-LM folder the decoder export takes (its architecture and a tokenizer); else init writes the
    one-pass recipe as before."""
    from optcli.errors import BadInput
    from optcli.llm.export import check_exportable

    try:
        check_exportable(path)
    except BadInput:
        return False
    return True


def llm_recipe(path: Path, recipe_dir: Path, data: Path | None = None) -> str:
    config = raw_config(path)
    limit = next((v for k in ("max_position_embeddings", "n_positions") if isinstance(v := config.get(k), int)), 0)
    defaults = LlmReport()
    context = min(defaults.context, limit) if limit else defaults.context
    llm = {
        "context": context,
        "stride": min(defaults.stride, context // 2 or 1),
        "prompt_tokens": min(defaults.prompt_tokens, max(1, context // 2)),
        "new_tokens": defaults.new_tokens,
        "prompts": defaults.prompts,
    }
    text = _shown(data, recipe_dir) if data is not None else "eval.txt"
    recipe = {
        "model": {"path": _shown(path, recipe_dir)},
        "data": {"eval": {"text": text}},
        "passes": [{"type": "decoder", "precision": "int4", "block_size": 32}],
        "report": {"llm": llm},
        "gates": {"max_perplexity_increase": 0.05},
    }
    arch = (config.get("architectures") or ["?"])[0]
    header = (
        f"# optcli recipe for the causal LM {path.name} ({arch}, written by optcli init)\n"
        "# The folder is exported with a KV cache by onnxruntime-genai's model builder, once in fp32 (the reference)\n"
        "# and once with int4 weights (MatMulNBits); out/decoder runs in onnxruntime_genai as it is.\n"
        f"# {text}: plain text (a few thousand tokens or more) for sliding-window perplexity and generation prompts.\n"
        "# Each step reports perplexity, time to first token, decode tokens/s, greedy agreement and peak memory;\n"
        "# gates.min_decode_speedup: 2.0 would fail the run unless int4 decodes twice as fast, timed side by side.\n"
        "# `optcli passes` lists every option; `optcli validate` checks this file.\n"
    )
    return header + yaml.safe_dump(recipe, sort_keys=False)


def _shown(path: Path, recipe_dir: Path) -> str:
    if path.is_absolute():
        return str(path)
    return os.path.relpath(os.path.abspath(path), recipe_dir)
