"""Decoder LLMs: a causal-LM Hugging Face folder to a decoder with a KV cache that onnxruntime-genai runs, measured
the way LLM users measure (sliding-window perplexity, time to first token, decode tokens/s, greedy agreement,
peak resident memory).

export.py writes the decoder (onnxruntime-genai's model builder), decoder.py runs it with plain ONNX Runtime
(past key/values handled), perplexity.py and generate.py measure it, memory.py keeps the machine alive,
passes.py is the `decoder` pass, run.py the run of an LLM recipe, starter.py what `optcli init` writes for one.
Nothing here imports torch, onnxruntime or transformers at module level.
"""

from __future__ import annotations

from pathlib import Path

GENAI_CONFIG = "genai_config.json"
FORMAT = "genai"  # a decoder folder: model.onnx (+ external data), genai_config.json, tokenizer files


def is_decoder_folder(path: Path) -> bool:
    """A folder onnxruntime-genai loads: genai_config.json beside the ONNX decoder."""
    path = Path(path)
    return path.is_dir() and (path / GENAI_CONFIG).is_file()
