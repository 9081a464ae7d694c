"""The decoder export for architectures onnxruntime-genai's model builder does not take: torch.export (the ONNX
exporter's dynamo path) of the transformers model wrapped so the KV cache is explicit inputs and outputs, and a
genai_config.json describing them, so the folder runs in onnxruntime-genai like a builder's.

Listed architectures only: each one is checked here against transformers (tests/test_llm.py) before it is.
`python -m optcli.llm.torch_export HF_FOLDER OUT_DIR PRECISION` runs it in a child process (export.py).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from optcli.exporter_table import torchlib_table_built_once

ARCHITECTURES = ("GPT2LMHeadModel",)
# onnxruntime-genai picks its model class by type; "phi" is a plain decoder-only one (input_ids, attention_mask,
# position_ids, past_key_values.N.key/value in, logits and present.N.key/value out), GPT-like as GPT-2 is.
# ("gpt2" there means the old combined past_N cache layout, which this export does not write.)
GENAI_TYPE = "phi"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json")


def _dims(config) -> tuple[int, int, int, int]:
    layers = config.num_hidden_layers
    heads = config.num_attention_heads
    return layers, heads, config.hidden_size // heads, config.hidden_size


def export(hf_folder: Path, out_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, DynamicCache

    model = AutoModelForCausalLM.from_pretrained(str(hf_folder), dtype=torch.float32, local_files_only=True).eval()
    layers, heads, head_size, hidden = _dims(model.config)

    class WithCache(torch.nn.Module):
        """forward(ids, mask, positions, *past) -> (logits, *present): the cache as plain tensors."""

        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask, position_ids, *past):
            cache = DynamicCache(config=self.inner.config)
            for layer in range(layers):
                cache.update(past[2 * layer], past[2 * layer + 1], layer)
            out = self.inner(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                past_key_values=cache,
                use_cache=True,
            )
            present = [t for layer in out.past_key_values.layers for t in (layer.keys, layer.values)]
            return (out.logits, *present)

    kv = [f"{layer}.{kind}" for layer in range(layers) for kind in ("key", "value")]
    # Example shapes away from 0 and 1 (torch.export would fix those); the graph still takes an empty cache.
    seq, past_len = 3, 2
    example = (
        torch.zeros(1, seq, dtype=torch.int64),
        torch.ones(1, seq + past_len, dtype=torch.int64),
        torch.arange(past_len, past_len + seq)[None],
        *[torch.zeros(1, heads, past_len, head_size) for _ in kv],
    )
    batch, free = torch.export.Dim("batch", min=1, max=1024), torch.export.Dim.DYNAMIC
    token_axes = {0: batch, 1: free}
    with torchlib_table_built_once():
        program = torch.onnx.export(
            WithCache(model),
            example,
            input_names=["input_ids", "attention_mask", "position_ids", *(f"past_key_values.{n}" for n in kv)],
            output_names=["logits", *(f"present.{n}" for n in kv)],
            dynamic_shapes=(token_axes, token_axes, token_axes, tuple({0: batch, 2: free} for _ in kv)),
            dynamo=True,
            opset_version=18,
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    assert program is not None, "dynamo=True without a file argument returns the ONNXProgram"
    program.save(str(out_dir / "model.onnx"), external_data=True)
    write_genai_config(model.config, out_dir, layers, heads, head_size, hidden)
    for name in TOKENIZER_FILES:
        if (hf_folder / name).is_file():
            shutil.copy(hf_folder / name, out_dir / name)


def write_genai_config(config, out_dir: Path, layers: int, heads: int, head_size: int, hidden: int) -> None:
    context = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", 2048)
    eos = config.eos_token_id if config.eos_token_id is not None else 0
    genai = {
        "model": {
            "bos_token_id": config.bos_token_id if config.bos_token_id is not None else eos,
            "eos_token_id": eos,
            "pad_token_id": config.pad_token_id if config.pad_token_id is not None else eos,
            "context_length": context,
            "type": GENAI_TYPE,
            "vocab_size": config.vocab_size,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": "model.onnx",
                "head_size": head_size,
                "hidden_size": hidden,
                "num_attention_heads": heads,
                "num_hidden_layers": layers,
                "num_key_value_heads": heads,
                "inputs": {
                    "input_ids": "input_ids",
                    "attention_mask": "attention_mask",
                    "position_ids": "position_ids",
                    "past_key_names": "past_key_values.%d.key",
                    "past_value_names": "past_key_values.%d.value",
                },
                "outputs": {
                    "logits": "logits",
                    "present_key_names": "present.%d.key",
                    "present_value_names": "present.%d.value",
                },
            },
        },
        # No shared past/present buffer: that layout needs GroupQueryAttention's in-place cache, which a plain
        # exported attention does not have.
        "search": {
            "do_sample": False,
            "max_length": context,
            "min_length": 0,
            "num_beams": 1,
            "num_return_sequences": 1,
            "past_present_share_buffer": False,
            "top_k": 1,
            "top_p": 1.0,
            "temperature": 1.0,
            "repetition_penalty": 1.0,
            "early_stopping": True,
            "length_penalty": 1.0,
            "diversity_penalty": 0.0,
            "no_repeat_ngram_size": 0,
        },
    }
    (out_dir / "genai_config.json").write_text(json.dumps(genai, indent=4))


def quantize_weights(out_dir: Path, bits: int, block_size: int, accuracy_level: int | None) -> None:
    """MatMulNBits weight-only int4/int8 (round-to-nearest, symmetric) on the exported decoder, in place: ONNX
    Runtime's quantizer, the one the builder runs too."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    path = out_dir / "model.onnx"
    model = onnx.load(str(path))
    gemm_to_matmul(model)
    # algo_config None: the quantizer's default round-to-nearest, as the builder's `algo_config=default`
    quantizer = MatMulNBitsQuantizer(
        model, bits=bits, block_size=block_size, is_symmetric=True, accuracy_level=accuracy_level
    )
    quantizer.process()
    for f in out_dir.glob("model.onnx*"):
        f.unlink()
    onnx.save_model(
        quantizer.model.model, str(path), save_as_external_data=True, location="model.onnx.data", size_threshold=1024
    )


def gemm_to_matmul(model) -> None:
    """Gemm(A, W, b) -> MatMul(A, W) + b in place, where W is a weight: the exporter writes GPT-2's Conv1D layers as
    Gemm, and ONNX Runtime's MatMulNBits quantizer takes MatMul only."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    weights = {t.name: t for t in model.graph.initializer}
    nodes = []
    for node in model.graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        plain = attrs.get("alpha", 1.0) == 1.0 and attrs.get("beta", 1.0) == 1.0 and not attrs.get("transA", 0)
        if node.op_type != "Gemm" or not plain or node.input[1] not in weights:
            nodes.append(node)
            continue
        if attrs.get("transB", 0):
            w = weights[node.input[1]]
            t = numpy_helper.from_array(np.ascontiguousarray(numpy_helper.to_array(w).T), w.name)
            w.CopyFrom(t)
        product = f"{node.name or node.output[0]}_matmul"
        bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
        nodes.append(
            helper.make_node("MatMul", node.input[:2], [product if bias else node.output[0]], name=f"{product}_node")
        )
        if bias:
            nodes.append(helper.make_node("Add", [product, bias], [node.output[0]], name=f"{product}_bias"))
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    onnx.checker.check_model(model)


def main(argv: list[str]) -> None:
    hf_folder, out_dir, precision, block_size, accuracy_level = argv
    from optcli.hf import offline

    with offline():
        export(Path(hf_folder), Path(out_dir))
    if precision != "fp32":
        level = int(accuracy_level) if accuracy_level != "none" else None
        quantize_weights(Path(out_dir), 4 if precision == "int4" else 8, int(block_size), level)


if __name__ == "__main__":
    main(sys.argv[1:])
