"""Weight-only quantization of a decoder LLM (an onnxruntime-genai folder): its parts, its calibration, its score.

A decoder written by onnxruntime-genai's model builder takes input_ids, attention_mask and past key/values and
returns logits and the present key/values; genai_config.json and the tokenizer files sit beside model.onnx and
must follow every quantized copy (the search's trials too) for onnxruntime-genai, and optcli.llm's perplexity, to
load it. GPTQ's calibration and the mixed search's perplexity read the LLM run's text (ctx.data.tokens, read by
optcli.llm.run at preflight) with the run's window (report.llm context / stride).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from optcli.errors import BadInput

GENAI_CONFIG = "genai_config.json"
PAST = "past_key_values."


def is_decoder(proto) -> bool:
    """A graph with a KV cache: past key/values among its inputs (the builder's and optimum's naming)."""
    return any(i.name.startswith(PAST) or i.name.startswith("past_key") for i in proto.graph.input)


def lm_head(proto) -> str | None:
    """The MatMul that writes the logits: the builder names it /lm_head/MatMul; else the last MatMul of the graph
    whose output reaches the `logits` output through shape-only ops."""
    names = [n.name for n in proto.graph.node if n.op_type == "MatMul" and "lm_head" in n.name]
    if names:
        return names[-1]
    producer = {o: n for n in proto.graph.node for o in n.output}
    node = producer.get("logits")
    while node is not None and node.op_type != "MatMul":
        node = producer.get(node.input[0]) if node.op_type in ("Reshape", "Add", "Cast", "Identity") else None
    return node.name if node is not None else None


def embeddings(proto) -> list[str]:
    """Gather nodes reading a constant 2-D table (token embeddings)."""
    shapes = {t.name: len(t.dims) for t in proto.graph.initializer}
    return [n.name for n in proto.graph.node if n.op_type == "Gather" and shapes.get(n.input[0]) == 2]


def share_tied_embeddings(proto) -> list[str]:
    """A tied decoder (Qwen2-0.5B / 1.5B, Llama-3.2-1B...) reads its embedding table as Transpose(lm_head weight):
    once the lm_head is MatMulNBits, that Gather still held the float weight (for Qwen2-0.5B, 545 MB of a 862 MB
    int4 folder). As onnxruntime-genai's builder does, the Gather becomes GatherBlockQuantized on the lm_head's own
    quantized blocks and scales: one table, no copy. Only for symmetric blocks (no zero points) that divide the
    hidden size. Returns the Gather nodes rewritten, changing proto in place."""
    from onnx import helper, numpy_helper

    from optcli.onnxgraph import links

    inits = {t.name: t for t in proto.graph.initializer}
    producer, consumers = links(proto.graph.node)
    # ORT's weight-only quantizer names a MatMulNBits' blocks <weight>_Q4 / <weight>_Q8
    heads = {
        n.input[1]: n
        for n in proto.graph.node
        if n.op_type == "MatMulNBits" and (len(n.input) < 4 or not n.input[3]) and n.input[1] in inits
    }
    done = []
    for gather in [n for n in proto.graph.node if n.op_type == "Gather"]:
        t = producer.get(gather.input[0])
        if t is None or t.op_type != "Transpose" or t.input[0] not in inits:
            continue
        weight = t.input[0]
        head = heads.get(f"{weight}_Q4") or heads.get(f"{weight}_Q8")
        if head is None:
            continue
        attr = {a.name: helper.get_attribute_value(a) for a in head.attribute}
        k, n_out, bits, block = attr.get("K"), attr.get("N"), attr.get("bits", 4), attr.get("block_size")
        if not (k and n_out and block and bits in (4, 8) and k % block == 0):
            continue
        shape_name = f"{gather.name}/tied_shape"
        proto.graph.initializer.append(numpy_helper.from_array(np.array([n_out, k * bits // 8], np.int64), shape_name))
        table = f"{gather.name}/tied_table"
        reshape = helper.make_node("Reshape", [head.input[1], shape_name], [table], name=f"{gather.name}/TiedReshape")
        shared = helper.make_node(
            "GatherBlockQuantized",
            [table, gather.input[1], head.input[2]],
            list(gather.output),
            name=f"{gather.name}/TiedQuantized",
            domain="com.microsoft",
            bits=bits,
            block_size=block,
            gather_axis=0,
            quantize_axis=1,
        )
        at = list(proto.graph.node).index(gather)
        proto.graph.node.remove(gather)
        proto.graph.node.insert(at, shared)
        proto.graph.node.insert(at, reshape)
        if consumers.get(t.output[0]) == [gather]:  # the Transpose fed this Gather alone: it and its weight go
            proto.graph.node.remove(t)
            if not any(weight in n.input for n in proto.graph.node):
                proto.graph.initializer.remove(inits[weight])
        done.append(gather.name)
    return done


def copy_side_files(source_dir: Path, target_dir: Path, model_names: set[str]) -> list[str]:
    """genai_config.json, tokenizer and processing files beside the input model, copied beside the output."""
    copied = []
    for f in sorted(source_dir.iterdir()):
        if f.is_file() and f.name not in model_names and not f.name.endswith((".onnx", ".onnx.data", ".data")):
            shutil.copyfile(f, target_dir / f.name)
            copied.append(f.name)
    return copied


def trial_path(work: Path, name: str, source: Path | None) -> Path:
    """Where a trial copy of `source` is written: a folder with the decoder's side files for a decoder (its perplexity
    loads the folder), a plain file otherwise."""
    if source is None or not (Path(source).parent / GENAI_CONFIG).is_file():
        return Path(work) / f"{name}.onnx"
    folder = Path(work) / name
    folder.mkdir(parents=True, exist_ok=True)
    copy_side_files(Path(source).parent, folder, {Path(source).name, Path(source).name + ".data"})
    return folder / Path(source).name


def head_size(model_dir: Path) -> int | None:
    """The cache's last dimension, which the builder leaves symbolic in the graph: genai_config.json says it."""
    import json

    file = Path(model_dir) / GENAI_CONFIG
    if not file.is_file():
        return None
    return json.loads(file.read_text()).get("model", {}).get("decoder", {}).get("head_size")


def feeds(inputs, window: np.ndarray, head: int | None = None) -> dict[str, np.ndarray]:
    """One prefill of `window` with an empty cache, for a graph's inputs (GPTQ's calibration batches)."""
    out = {}
    n = len(window)
    for i in inputs:
        name = i.name
        if name == "input_ids":
            out[name] = window[None].astype(np.int64)
        elif name == "attention_mask":
            out[name] = np.ones((1, n), dtype=np.int64)
        elif name == "position_ids":
            out[name] = np.arange(n, dtype=np.int64)[None]
        elif name.startswith("past_key"):
            dims = [d.dim_value or d.dim_param for d in i.type.tensor_type.shape.dim]
            last = dims[3] if isinstance(dims[3], int) and dims[3] > 0 else head
            if not isinstance(dims[1], int) or last is None:
                raise BadInput(
                    f"decoder input {name}: cache shape {dims} is not fixed and no genai_config.json says it"
                )
            dtype = np.float16 if i.type.tensor_type.elem_type == 10 else np.float32
            out[name] = np.zeros([1, dims[1], 0, last], dtype=dtype)
        else:
            raise BadInput(
                f"decoder input {name!r} is not one optcli knows how to feed (input_ids, attention_mask, ...)"
            )
    return out


def llm_settings(recipe):
    """report.llm as the LLM run reads it (optcli.llm.run.settings; imported from config: run sits a layer up)."""
    from optcli.llm.config import LlmReport

    return getattr(recipe.report, "llm", None) or LlmReport()


def eval_tokens(ctx) -> np.ndarray:
    """The eval text's tokens: what the LLM run read at preflight (ctx.data.tokens)."""
    tokens = getattr(ctx.data, "tokens", None)
    if tokens is None:
        raise BadInput("a decoder's weight-only search scores perplexity on data.eval.text: set it in the recipe")
    return np.asarray(tokens, dtype=np.int64)


def span(context: int, stride: int, windows: int | None) -> int | None:
    """Tokens that `windows` sliding windows cover (None: all)."""
    return None if windows is None else context + stride * (max(1, windows) - 1)


@dataclass
class PerplexityEvaluation:
    """The weight-only search's evaluation for a decoder: `measure` scores a trial's model.onnx (its folder holds the
    decoder's side files), on the first `subset` windows; `reference` is the input decoder's perplexity on all of
    them (`score` is the identity so the search reads the baseline the way it reads a metric's)."""

    tokens: np.ndarray
    reference_dir: Path
    context: int
    stride: int
    threads: int | None = None
    metric: str = "perplexity"
    reference: float = 0.0
    _baselines: dict = field(default_factory=dict)

    def measure(self, path: Path, subset: int | None = None, timed: bool = False) -> tuple[float, None]:
        from optcli.llm.perplexity import perplexity

        folder = Path(path) if Path(path).is_dir() else Path(path).parent
        n = span(self.context, self.stride, subset)
        return perplexity(folder, self.tokens[:n], self.context, self.stride, threads=self.threads), None

    def baseline(self, subset: int | None = None) -> float:
        """The reference's perplexity on the same windows a trial was scored on (a rise compares like with like)."""
        if subset not in self._baselines:
            self._baselines[subset] = self.measure(self.reference_dir, subset)[0]
        return self._baselines[subset]

    def score(self, value: float) -> float:
        return value


def evaluation(model_dir: Path, ctx, windows: int | None) -> PerplexityEvaluation:
    """Perplexity of the input decoder on the eval text, with the run's window (report.llm context / stride)."""
    llm = llm_settings(ctx.recipe)
    tokens = eval_tokens(ctx)
    n = span(llm.context, llm.stride, windows)
    ev = PerplexityEvaluation(tokens[:n], Path(model_dir), llm.context, llm.stride, llm.threads)
    ev.reference = ev.baseline()
    return ev


def calibration_feeds(model_dir: Path, ctx, samples: int) -> list[dict[str, np.ndarray]]:
    """GPTQ's calibration: `samples` windows of report.llm.context tokens from data.calibration.text when the recipe
    has one (through the decoder's tokenizer), else from the eval text."""
    from optcli.onnxgraph import load_model

    source = getattr(ctx.recipe.data, "calibration", None)
    if source is not None and getattr(source, "text", None) is not None:
        from optcli.llm.perplexity import text_tokens

        tokens = text_tokens(Path(source.tokenizer or model_dir), Path(source.text))
    else:
        tokens = eval_tokens(ctx)
    context = llm_settings(ctx.recipe).context
    starts = range(0, max(1, len(tokens) - context + 1), context)
    chunks = [tokens[s : s + context] for s in list(starts)[:samples]]
    graph_inputs = load_model(Path(model_dir) / "model.onnx", external_data=False).graph.input
    head = head_size(model_dir)
    return [feeds(graph_inputs, np.asarray(w), head) for w in chunks]


def int8_dynamic(source: Path, target: Path, config, int8, ctx) -> dict:
    """Dynamic int8 of a decoder's MatMuls (weights int8 per the CPU's choice, activations quantized per token at run
    time), with onnxruntime.quantization.quantize_dynamic. No pre-processing: ORT's quant_pre_process runs symbolic
    shape inference, which does not know GroupQueryAttention's outputs; MatMul with a constant weight only (the
    attention's activations stay float). The embedding table stays float (int8 Gather saves bytes, not time)."""
    import logging

    from onnxruntime.quantization import QuantType, quantize_dynamic

    from optcli.artifact import artifact_files

    kinds = {"int8": QuantType.QInt8, "uint8": QuantType.QUInt8}
    large = sum(f.stat().st_size for f in artifact_files(source)) > 2**31 - 2**20
    logging.getLogger().setLevel(max(logging.getLogger().level, logging.ERROR))  # its "run pre-processing" advice
    try:
        quantize_dynamic(
            str(source),
            str(target),
            weight_type=kinds[int8.weight_type],
            per_channel=config.per_channel,
            reduce_range=int8.reduce_range,
            op_types_to_quantize=["MatMul"],
            nodes_to_exclude=list(config.exclude),
            use_external_data_format=large,
            extra_options={"MatMulConstBOnly": True, **config.extra_options},
        )
    except Exception as e:
        from optcli.errors import PassFailed

        raise PassFailed(
            ctx.step_name, f"int8 dynamic on the decoder failed: {type(e).__name__}: {str(e)[:300]}"
        ) from None
    return {"mode": "dynamic", "op_types": ["MatMul"], "per_channel": config.per_channel, "preprocess": "skipped"}
