"""Weight-only quantization of a decoder LLM (an onnxruntime-genai folder): its text, its feeds, its perplexity.

A decoder written by onnxruntime-genai's model builder takes input_ids, attention_mask and past key/values and
returns logits and the present key/values; genai_config.json and the tokenizer files sit beside model.onnx and
must follow the quantized copy for onnxruntime-genai to load it. Calibration (GPTQ's Hessians) and the mixed
search's scores both read the text file of the recipe, tokenized by the folder's own tokenizer.json.

Perplexity here is the search's inner score (one prefill per window with an empty cache, numpy log-softmax):
sliding windows of `context` tokens moved by `stride`, each window scoring only the tokens the previous one did not.
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


def copy_side_files(source_dir: Path, target_dir: Path, model_names: set[str]) -> list[str]:
    """genai_config.json, tokenizer and processing files beside the input model, copied beside the output."""
    copied = []
    for f in sorted(source_dir.iterdir()):
        if f.is_file() and f.name not in model_names and not f.name.endswith((".onnx", ".onnx.data", ".data")):
            shutil.copyfile(f, target_dir / f.name)
            copied.append(f.name)
    return copied


def token_ids(text_path: Path, tokenizer_dir: Path) -> np.ndarray:
    """The whole text file as one token stream (lines joined by newlines), through tokenizer.json of the folder."""
    from tokenizers import Tokenizer

    file = tokenizer_dir / "tokenizer.json"
    if not file.is_file():
        raise BadInput(f"{tokenizer_dir}: no tokenizer.json beside the decoder; export it with its tokenizer")
    text = Path(text_path).read_text(encoding="utf-8", errors="replace")
    return np.asarray(Tokenizer.from_file(str(file)).encode(text).ids, dtype=np.int64)


def windows(ids: np.ndarray, context: int, stride: int, limit: int | None = None) -> list[tuple[np.ndarray, int]]:
    """(window, first scored position) pairs: each window scores only the tokens the one before did not."""
    if len(ids) < context + 1:
        raise BadInput(
            f"the text holds {len(ids)} tokens, fewer than one window of {context + 1}: use a longer text file "
            "or a shorter context"
        )
    out, begin, scored_to = [], 0, 0
    while begin + context <= len(ids) and (limit is None or len(out) < limit):
        out.append((ids[begin : begin + context], max(1, scored_to - begin)))
        scored_to = begin + context
        begin += stride
    return out


def head_size(model_dir: Path) -> int | None:
    """The cache's last dimension, which the builder leaves symbolic in the graph: genai_config.json says it."""
    import json

    file = Path(model_dir) / GENAI_CONFIG
    if not file.is_file():
        return None
    return json.loads(file.read_text()).get("model", {}).get("decoder", {}).get("head_size")


def feeds(inputs, window: np.ndarray, head: int | None = None) -> dict[str, np.ndarray]:
    """One prefill of `window` with an empty cache, for a session's (or graph's) inputs."""
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
            shape = _dims(i)
            last = shape[3] if isinstance(shape[3], int) and shape[3] > 0 else head
            if not isinstance(shape[1], int) or last is None:
                raise BadInput(
                    f"decoder input {name}: cache shape {shape} is not fixed and no genai_config.json says it"
                )
            out[name] = np.zeros([1, shape[1], 0, last], dtype=_float(i))
        else:
            raise BadInput(
                f"decoder input {name!r} is not one optcli knows how to feed (input_ids, attention_mask, ...)"
            )
    return out


def _dims(i) -> list:
    if hasattr(i, "shape"):  # an onnxruntime NodeArg
        return list(i.shape)
    return [d.dim_value or d.dim_param for d in i.type.tensor_type.shape.dim]


def _float(i):
    kind = getattr(i, "type", None)
    if isinstance(kind, str):
        return np.float16 if "float16" in kind else np.float32
    return np.float16 if i.type.tensor_type.elem_type == 10 else np.float32


def nll(logits: np.ndarray, window: np.ndarray, first: int) -> tuple[float, int]:
    """Summed negative log-likelihood of window[first:] under logits (predicting token t from position t-1)."""
    x = logits[0, first - 1 : len(window) - 1].astype(np.float64)
    x -= x.max(axis=-1, keepdims=True)
    logp = x - np.log(np.exp(x).sum(axis=-1, keepdims=True))
    target = window[first:]
    return float(-logp[np.arange(len(target)), target].sum()), len(target)


def perplexity(path: Path, chunks: list[tuple[np.ndarray, int]], threads: int = 2, head: int | None = None) -> float:
    """Perplexity of the decoder at path over chunks; `head`: the cache's head size where no genai_config.json is
    beside path (the search's trial copies)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    total, count = 0.0, 0
    head = head or head_size(Path(path).parent)
    for window, first in chunks:
        logits = session.run(["logits"], feeds(session.get_inputs(), window, head))[0]
        s, k = nll(logits, window, first)
        total, count = total + s, count + k
    return float(np.exp(total / max(count, 1)))


@dataclass
class PerplexityEvaluation:
    """The weight-only search's evaluation for a decoder: `measure` scores an artifact, `reference` is the
    original's perplexity (`score` is the identity so the search reads the baseline the way it reads a metric's)."""

    chunks: list[tuple[np.ndarray, int]]
    reference_path: Path | None = None
    threads: int = 2
    head: int | None = None
    metric: str = "perplexity"
    reference: float = 0.0
    _baselines: dict = field(default_factory=dict)

    def measure(self, path: Path, subset: int | None = None, timed: bool = False) -> tuple[float, None]:
        chunks = self.chunks if subset is None else self.chunks[: max(1, subset)]
        return perplexity(path, chunks, self.threads, self.head), None

    def baseline(self, subset: int | None = None) -> float:
        """The reference's perplexity on the same windows a trial was scored on (a rise compares like with like)."""
        key = None if subset is None or subset >= len(self.chunks) else max(1, subset)
        if key not in self._baselines:
            self._baselines[key] = self.measure(self.reference_path, key)[0]
        return self._baselines[key]

    def score(self, value: float) -> float:
        return value


def text_source(recipe):
    """The recipe's text file for a decoder: data.eval.text, else data.calibration.text."""
    for name in ("eval", "calibration"):
        source = getattr(recipe.data, name, None)
        if source is not None and getattr(source, "text", None) is not None:
            return source
    return None


def evaluation(model_path: Path, reference_path: Path, recipe, samples: int | None) -> PerplexityEvaluation:
    """Perplexity of the reference decoder on the recipe's text, windows of data.eval.max_length, half overlap."""
    source = text_source(recipe)
    if source is None:
        raise BadInput("a perplexity target on a decoder needs data.eval.text (a text file to score perplexity on)")
    context = source.max_length
    chunks = windows(token_ids(source.text, Path(model_path).parent), context, max(1, context // 2), samples)
    threads = recipe.report.latency.threads or 2
    ev = PerplexityEvaluation(chunks, Path(reference_path), threads, head_size(Path(reference_path).parent))
    ev.reference = ev.baseline()
    return ev


def calibration_feeds(model_path: Path, recipe, samples: int) -> list[dict[str, np.ndarray]]:
    """GPTQ's calibration: `samples` windows of the text file (data.calibration.text, else data.eval.text)."""
    import onnx

    source = getattr(recipe.data, "calibration", None)
    if source is None or getattr(source, "text", None) is None:
        source = text_source(recipe)
    if source is None:
        raise BadInput("algorithm: gptq calibrates on text: add data.calibration.text (or data.eval.text)")
    context = source.max_length
    chunks = windows(token_ids(source.text, Path(model_path).parent), context, context, samples)
    graph_inputs = onnx.load(str(model_path), load_external_data=False).graph.input
    head = head_size(Path(model_path).parent)
    return [feeds(graph_inputs, w, head) for w, _ in chunks]


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
