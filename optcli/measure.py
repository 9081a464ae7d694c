"""Size, parameters, latency, accuracy and fidelity of an artifact as written to disk."""

from __future__ import annotations

import os
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np

from optcli.artifact import artifact_files
from optcli.environment import providers_for
from optcli.model import InputSpec, Model, batch_refusal, example_inputs, feeds_for_batch, fixed_batch, split_batches
from optcli.onnx_check import session_or_upgraded

# Inputs 1.. of these ops are scales / zero points, not weights.
_QUANT_PARAM_INPUTS = {
    "QuantizeLinear": {1, 2},
    "DequantizeLinear": {1, 2},
    "DynamicQuantizeLinear": set(),
    "MatMulInteger": {2, 3},
    "ConvInteger": {2, 3},
    "QLinearMatMul": {1, 2, 4, 5, 6, 7},
    "QLinearConv": {1, 2, 4, 5, 6, 7},
    "MatMulNBits": {2, 3, 4},
    "GatherBlockQuantized": {2, 3},
}


class Runner:
    """Runs a model on numpy feeds; ONNX Runtime for ONNX, torch for torch."""

    def __init__(
        self,
        fn: Callable[[dict], list[np.ndarray]],
        inputs: list[InputSpec],
        engine: str,
        output_names: list[str] | None = None,
    ):
        self._fn = fn
        self.inputs = inputs
        self.engine = engine
        self.output_names = output_names  # None: the outputs are named by position (torch)

    def __call__(self, feeds: dict) -> list[np.ndarray]:
        return self._fn(feeds)


def onnx_runner(path: Path, inputs: list[InputSpec], threads: int, providers: list[str] | None = None) -> Runner:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    session, upgraded = session_or_upgraded(path, opts, providers)
    names = {i.name for i in session.get_inputs()}
    # A graph converted without keep_io_types takes fp16 inputs; the data and the reference stay float32.
    half = {i.name for i in session.get_inputs() if i.type == "tensor(float16)"}

    def run(feeds):
        return session.run(
            None, {k: (v.astype(np.float16) if k in half else v) for k, v in feeds.items() if k in names}
        )

    return Runner(
        run,
        inputs,
        f"onnxruntime {ort.__version__}" + (f" ({upgraded})" if upgraded else ""),
        [o.name for o in session.get_outputs()],
    )


def torch_runner(module, inputs: list[InputSpec], threads: int) -> Runner:
    import torch

    if hasattr(module, "eval") and not _is_graph_module(module):
        module.eval()

    def run(feeds):
        # Threads are set per call and put back: measurement must not change how later training runs.
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            with torch.inference_mode():
                out = module(*[torch_argument(s, feeds[s.name]) for s in inputs])
        finally:
            torch.set_num_threads(previous)
        return [t.detach().float().numpy() if t.is_floating_point() else t.numpy() for t in flatten_outputs(out)]

    return Runner(run, inputs, f"torch {torch.__version__}")


def torch_argument(spec: InputSpec, arr: np.ndarray):
    """What forward takes for this input: a tensor, or the Python number a TorchScript schema asks for."""
    import torch

    if spec.python:
        return {"int": int, "float": float, "bool": bool}[spec.python](np.asarray(arr).item())
    return torch.from_numpy(np.ascontiguousarray(arr))


def _is_graph_module(module) -> bool:
    # torch.export's unlifted modules refuse .eval(); they were exported in eval mode already.
    return type(module).__name__ == "GraphModule"


def flatten_outputs(out) -> list:
    import torch

    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    if hasattr(out, "to_tuple"):
        out = out.to_tuple()
    flat = []
    for item in out:
        flat.extend(flatten_outputs(item))
    return flat


def runner_for(model: Model, threads: int, providers: list[str] | None = None) -> Runner:
    if model.format == "onnx":
        assert model.path is not None, "an ONNX model is always a file (ORT loads it from disk)"
        return onnx_runner(model.path, model.inputs, threads, providers)
    return torch_runner(model.module, model.inputs, threads)


def reload_folder(path: Path, task: str):
    """A Hugging Face folder a step wrote, read back as any folder is (its task as the original's)."""
    from optcli.config import ModelSpec
    from optcli.hf.load import load_folder

    return load_folder(ModelSpec(path=path, task=task or None))


def load_written(
    path: Path, inputs: list[InputSpec], threads: int, providers: list[str] | None = None, task: str = ""
) -> Runner:
    """A runner on a step artifact read back from disk (ONNX, torch.export, or a Hugging Face folder)."""
    if path.suffix == ".onnx":
        return onnx_runner(path, inputs, threads, providers)
    if path.is_dir():
        return torch_runner(reload_folder(path, task).module, inputs, threads)
    import torch

    return torch_runner(torch.export.load(str(path)).module(), inputs, threads)


# --------------------------------------------------------------------------- size


def size_on_disk(path: Path) -> dict:
    files = artifact_files(path)
    size = sum(f.stat().st_size for f in files)
    compressed = 0
    for f in files:
        comp = zlib.compressobj(6)
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 22):
                compressed += len(comp.compress(chunk))
        compressed += len(comp.flush())
    return {"size_bytes": size, "compressed_bytes": compressed, "files": [f.name for f in files]}


def parameter_counts(path: Path, module=None) -> dict:
    """Weights held by the artifact (scales, zero points, shape constants and buffers left out)."""
    if path.suffix == ".onnx":
        total, nonzero = _onnx_weights(path)
    else:
        total, nonzero = _torch_weights(path, module)
    return {
        "parameters": total,
        "nonzero_parameters": nonzero,
        "sparsity": round(1 - nonzero / total, 6) if total else 0.0,
    }


_WEIGHT_DTYPES = (1, 10, 11, 16, 3, 2, 5, 21, 22)  # float types, int8/uint8/int16, uint4/int4


def onnx_weight_tensors(proto) -> list[tuple[str, np.ndarray]]:
    """(name, array) of every weight a graph holds: initializers, and tensors built by nodes (`Constant`,
    `ConstantOfShape` with a constant shape), as some exporters write them, in the main graph and inside If / Loop /
    Scan bodies (a weight there is as much the model's as one outside). Scales and zero points of quantize ops,
    shape vectors and scalars are left out."""
    from onnx import numpy_helper

    from optcli.onnx_check import all_graphs, all_nodes

    graphs, nodes = all_graphs(proto), all_nodes(proto)
    skip = set()
    for node in nodes:  # a branch's quantize op may read its scale from the outer graph
        for idx in _QUANT_PARAM_INPUTS.get(node.op_type, ()):
            if idx < len(node.input):
                skip.add(node.input[idx])
    found: list[tuple[str, np.ndarray]] = []
    known: dict[str, np.ndarray] = {}
    for init in (t for g in graphs for t in g.initializer):
        arr = numpy_helper.to_array(init)
        known[init.name] = arr
        if init.name not in skip and init.data_type in _WEIGHT_DTYPES and arr.size > 1:
            found.append((init.name, arr))
    for node in nodes:  # topological order within each graph: a ConstantOfShape's shape is known before it
        if node.op_type == "Constant" and node.output:
            attr = next((a for a in node.attribute if a.name == "value" and a.HasField("t")), None)
            if attr is None:
                continue
            arr = numpy_helper.to_array(attr.t)
            known[node.output[0]] = arr
            if node.output[0] not in skip and attr.t.data_type in _WEIGHT_DTYPES and arr.size > 1:
                found.append((node.output[0], arr))
        elif node.op_type == "ConstantOfShape" and node.input and node.input[0] in known:
            shape = [int(d) for d in np.asarray(known[node.input[0]]).reshape(-1)]
            attr = next((a for a in node.attribute if a.name == "value" and a.HasField("t")), None)
            fill = numpy_helper.to_array(attr.t).reshape(-1)[:1] if attr is not None else np.zeros(1, np.float32)
            size = int(np.prod(shape)) if shape else 1
            if size > 1 and node.output[0] not in skip and 0 < size <= 1 << 31:
                found.append((node.output[0], np.broadcast_to(fill.astype(fill.dtype), (size,))))
    logical = blocked_weights(proto, known)
    return [(name, logical.get(name, arr)) for name, arr in found]


def blocked_weights(proto, known: dict) -> dict[str, np.ndarray]:
    """Packed weights of MatMulNBits / GatherBlockQuantized as the weights they stand for: one value per weight,
    the quantized value minus its block's zero point (0 exactly where the weight is 0), so counts and sparsity are
    those of the model, not of its bytes (two int4 weights per byte)."""
    from optcli.onnx_check import all_nodes

    out = {}
    for node in all_nodes(proto):
        attrs = {a.name: a.i for a in node.attribute}
        if node.op_type == "MatMulNBits" and node.input[1] in known:
            k, n, bits, block = attrs["K"], attrs["N"], attrs.get("bits", 4), attrs["block_size"]
            packed = np.asarray(known[node.input[1]], dtype=np.uint8).reshape(n, -1)
            q = _unpack(packed, bits).reshape(n, -1, block)
            blocks = q.shape[1]
            zp_name = node.input[3] if len(node.input) > 3 else ""
            if zp_name and zp_name in known and known[zp_name].dtype == np.uint8:
                zp = _unpack(np.asarray(known[zp_name]).reshape(n, -1), bits)[:, :blocks]
            else:
                zp = np.full((n, blocks), 1 << (bits - 1))  # symmetric blocks: the midpoint of the unsigned range
            out[node.input[1]] = (q.astype(np.int16) - zp[..., None]).reshape(n, -1)[:, :k]
        elif node.op_type == "GatherBlockQuantized" and node.input[0] in known:
            data = np.asarray(known[node.input[0]])
            if data.dtype.name not in ("uint4", "int4") or data.ndim != 2:
                continue
            axis, block = attrs.get("quantize_axis", 1), attrs.get("block_size", 128)
            zp_name = node.input[3] if len(node.input) > 3 else ""
            zp = np.asarray(known[zp_name]).astype(np.int16) if zp_name in known else 8 * (data.dtype.name == "uint4")
            if np.ndim(zp):
                zp = np.repeat(zp, block, axis=axis).take(range(data.shape[axis]), axis=axis)
            out[node.input[0]] = data.astype(np.int16) - zp
    return out


def _unpack(packed: np.ndarray, bits: int) -> np.ndarray:
    """Little-end-first fields of `bits` bits in each byte, along the last axis."""
    if bits == 8:
        return packed
    per = 8 // bits
    fields = [(packed >> (bits * j)) & ((1 << bits) - 1) for j in range(per)]
    return np.stack(fields, axis=-1).reshape(*packed.shape[:-1], -1)


def _onnx_weights(path: Path) -> tuple[int, int]:
    from optcli.onnxgraph import load_model

    proto = load_model(path)
    total = nonzero = 0
    for _, arr in onnx_weight_tensors(proto):
        total += arr.size
        nonzero += int(np.count_nonzero(arr))
    return total, nonzero


def _torch_weights(path: Path, module=None) -> tuple[int, int]:
    import torch

    if path.suffix == ".pt2":
        program = torch.export.load(str(path))
        tensors = [program.state_dict[n] for n in program.graph_signature.parameters if n in program.state_dict]
    elif module is not None:
        tensors = [p for _, p in module.named_parameters()]
    else:
        return 0, 0
    total = sum(t.numel() for t in tensors)
    nonzero = sum(int(torch.count_nonzero(t)) for t in tensors)
    return total, nonzero


# --------------------------------------------------------------------------- latency


def load_average() -> float | None:
    """The 1-minute load average when a latency loop ends (None where the OS has none): above the core count,
    other work was competing for the CPU while timing, and the report says so."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def latency(
    runner: Runner, batch_sizes: list[int], warmup: int, runs: int, progress=None, label: str = "latency"
) -> tuple[dict, list[str]]:
    """p50/p90/p99 and throughput per batch size; batch sizes the model cannot take are skipped with a note.
    progress: an optcli.progress.Feedback, shown one task per batch size."""
    from optcli.progress import SILENT

    results: dict = {}
    notes: list[str] = []
    for batch in batch_sizes:
        feeds = feeds_for_batch(runner.inputs, batch, seed=batch)
        if feeds is None:
            refusal = batch_refusal(runner.inputs, batch)
            assert refusal is not None, "feeds_for_batch returns None exactly where batch_refusal says why"
            notes.append(refusal)
            continue
        times = []
        with (progress or SILENT).task(f"{label} batch {batch}", total=warmup + runs) as task:
            for _ in range(warmup):
                runner(feeds)
                task.advance()
            for _ in range(runs):
                t0 = time.perf_counter()
                runner(feeds)
                times.append((time.perf_counter() - t0) * 1000)
                task.advance()
        p50, p90, p99 = np.percentile(times, [50, 90, 99])
        results[f"batch_{batch}"] = {
            "p50_ms": round(float(p50), 6),
            "p90_ms": round(float(p90), 6),
            "p99_ms": round(float(p99), 6),
            "throughput_per_s": round(batch * 1000 / float(p50), 2),
            "runs": runs,
            "load_average": load_average(),
        }
    return results, notes


# --------------------------------------------------------------------------- accuracy and fidelity


def predict(runner: Runner, batches) -> list[np.ndarray]:
    """Run every batch; return each output concatenated over batches."""
    outs: list[list[np.ndarray]] = []
    for feeds in batches:
        result = runner(feeds)
        if not outs:
            outs = [[] for _ in result]
        for slot, arr in zip(outs, result, strict=False):
            slot.append(arr)
    return [np.concatenate(s) if s[0].ndim else s[0] for s in outs]


def metric_value(metric: str, outputs: list[np.ndarray], labels: np.ndarray) -> float:
    logits = outputs[0]
    if metric == "accuracy":
        hits = logits.argmax(-1) == labels
        if labels.ndim >= 2 and labels.dtype.kind in "iu":  # per-token labels: padding / later sub-words carry -100
            from optcli.textdata import IGNORE_INDEX

            keep = labels != IGNORE_INDEX
            return float(hits[keep].mean()) if keep.any() else float("nan")
        return float(hits.mean())
    if metric == "top5":
        top = np.argsort(-logits, axis=-1)[:, :5]
        return float((top == labels[:, None]).any(-1).mean())
    if metric == "mse":
        return float(((logits.reshape(labels.shape) - labels) ** 2).mean())
    if metric == "perplexity":
        from optcli.textdata import perplexity

        return perplexity(logits, labels)
    from optcli.artifact import import_ref

    return float(import_ref(metric, "data.eval.metric")(outputs, labels))


def neighbour_agreement(reference: np.ndarray, output: np.ndarray) -> float | None:
    """Embeddings: for each example, is its nearest other example (cosine) the same under both models?"""
    if len(reference) < 3:
        return None

    def nearest(e):
        e = e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)
        sim = e @ e.T
        np.fill_diagonal(sim, -np.inf)
        return sim.argmax(1)

    return round(float((nearest(reference) == nearest(output)).mean()), 6)


# What each kind of output means, and so how its drift is judged (optcli.gates holds the limits).
OUTPUT_KINDS = {
    "classes": "class scores [N, C]: top-1 agreement",
    "sequence": "class scores per position [N, T, C]: argmax agreement per position",
    "value": "one value per sample ([N], [N, 1]: a probability, a regression): error relative to the spread",
    "embedding": "embeddings: cosine and nearest-neighbour agreement",
    "labels": "integer or boolean outputs: exact agreement per sample",
    "scores": "[N, C] or [N, T, C] floats nothing marks as class scores (logits or features?): cosine",
    "tensor": "any other tensor: cosine",
}
CLASS_TASKS = ("text-classification", "image-classification", "token-classification", "causal-lm")


def output_kind(reference: np.ndarray, task: str = "", class_labels: bool = False) -> str:
    """What an output means, read from the original model's values: one of OUTPUT_KINDS.

    [N, C] floats are class scores only with evidence, because a pooled embedding has the same shape and an argmax
    over its dimensions means nothing: a classification task, rows that are probabilities (softmax), or labelled
    eval data scored by accuracy (`class_labels`: the first output is then the class scores). Without it they are
    `scores`, judged by cosine with their top-1 agreement reported."""
    if reference.dtype.kind in "iub":
        return "labels"
    if reference.ndim <= 1 or reference[:1].size == 1:
        return "value"
    if task == "feature-extraction":
        return "embedding"
    if reference.ndim not in (2, 3):
        return "tensor"
    rows = reference.reshape(-1, reference.shape[-1]).astype(np.float64)
    if reference.ndim == 2 and (rows < 0).any() and np.allclose(np.linalg.norm(rows, axis=1), 1.0, atol=1e-3):
        return "embedding"  # rows of unit length with both signs: sentence-transformers' Normalize
    probabilities = (rows >= 0).all() and np.allclose(rows.sum(1), 1.0, atol=1e-3)
    if task in CLASS_TASKS or probabilities or class_labels:
        return "classes" if reference.ndim == 2 else "sequence"
    return "scores"


def _rows_cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    denom = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return np.where(denom > 0, (a * b).sum(1) / np.where(denom > 0, denom, 1), 1.0)


def output_fidelity(
    reference: np.ndarray, output: np.ndarray, kind: str, name: str = "", mask: np.ndarray | None = None
) -> dict:
    """One output's drift from the original's, in that output's terms (its kind, from output_kind)."""
    entry: dict = {"name": name, "kind": kind}
    if reference.shape != output.shape:
        return {
            **entry,
            "cosine_mean": None,
            "max_abs_error": None,
            "note": f"shape {output.shape} differs from {reference.shape}",
        }
    n = reference.shape[0] if reference.ndim else 1
    if kind == "labels":
        same = (reference.reshape(n, -1) == output.reshape(n, -1)).all(1)
        return {**entry, "cosine_mean": None, "max_abs_error": None, "agreement": round(float(same.mean()), 6)}
    ref, out = reference.astype(np.float64), output.astype(np.float64)
    a, b = ref.reshape(n, -1), out.reshape(n, -1)
    err = np.abs(a - b)
    entry["max_abs_error"] = float(err.max()) if err.size else 0.0
    if kind == "value":
        # A one-element row's cosine is only its sign agreement: the error, relative to how far the
        # original's values spread over these inputs (its range), says how far a prediction moved.
        spread = float(ref.max() - ref.min()) if ref.size else 0.0
        spread = spread or float(np.abs(ref).max(initial=0.0)) or 1.0
        return {
            **entry,
            "cosine_mean": None,
            "mean_abs_error": float(err.mean()) if err.size else 0.0,
            "spread": spread,
            "max_relative_error": round(entry["max_abs_error"] / spread, 6),
        }
    entry["cosine_mean"] = round(float(_rows_cosine(a, b).mean()), 6)
    if kind == "embedding":
        entry["neighbour_top1_agreement"] = neighbour_agreement(a, b)
    elif kind == "classes" or (kind == "scores" and ref.ndim == 2):
        entry["top1_agreement"] = round(float((ref.argmax(1) == out.argmax(1)).mean()), 6)
    elif kind in ("sequence", "scores"):
        same = ref.argmax(-1) == out.argmax(-1)
        if mask is not None and mask.shape == same.shape and mask.any():
            same = same[mask.astype(bool)]  # padding is not a prediction
        entry["position_agreement"] = round(float(same.mean()), 6)
    return entry


def _worst(entries: list[dict], key: str, lowest: bool = True):
    values = [e[key] for e in entries if e.get(key) is not None]
    if not values:
        return None
    return min(values) if lowest else max(values)


def fidelity(
    reference: list[np.ndarray],
    outputs: list[np.ndarray],
    task: str = "",
    mask: np.ndarray | None = None,
    names: list[str] | None = None,
    class_labels: bool = False,
) -> dict:
    """How far every output drifted from the original model's on the same inputs, each judged in its own terms.

    `outputs` lists one entry per output ({name, kind, cosine_mean, max_abs_error} and the kind's figure:
    top1_agreement, position_agreement, neighbour_top1_agreement, max_relative_error, agreement). The top-level
    keys are the worst over the outputs that have them: the lowest cosine_mean (value outputs have none: a
    one-element cosine is 1 whenever the signs agree), the highest max_abs_error, the lowest top1_agreement
    (class scores, and per position for sequences: a token classifier's or a causal LM's logits, over the
    positions `mask`, the eval data's attention_mask, keeps), the lowest neighbour_top1_agreement (embeddings).
    class_labels: labelled eval data scored by accuracy, so the first output holds class scores.
    """
    names = list(names or [])
    entries = []
    for i, (ref, out) in enumerate(zip(reference, outputs, strict=False)):
        name = names[i] if i < len(names) else f"output_{i}"
        kind = output_kind(ref, task, class_labels and i == 0)
        entries.append(output_fidelity(ref, out, kind, name, mask))
    if len(outputs) != len(reference):
        note = f"{len(outputs)} outputs against the original's {len(reference)}"
        entries.append({"name": "", "kind": "tensor", "cosine_mean": None, "max_abs_error": None, "note": note})
    agreements = [e.get("top1_agreement", e.get("position_agreement", e.get("agreement"))) for e in entries]
    result = {
        "cosine_mean": _worst(entries, "cosine_mean"),
        "max_abs_error": _worst(entries, "max_abs_error", lowest=False),
        "top1_agreement": min((a for a in agreements if a is not None), default=None),
    }
    if any(e["kind"] == "embedding" for e in entries):
        result["neighbour_top1_agreement"] = _worst(entries, "neighbour_top1_agreement")
    notes = [f"{e['name']}: {e['note']}" if e["name"] else e["note"] for e in entries if e.get("note")]
    if notes:
        result["note"] = "; ".join(notes)
    result["outputs"] = entries
    return result


# Label-free targets a quantize search can aim at: the fidelity figure each reads, and whether higher is better.
FIDELITY_METRICS = {
    "cosine": ("cosine_mean", True),
    "top1_agreement": ("top1_agreement", True),  # class scores, and per position for sequences
    "value_error": ("max_relative_error", False),  # a probability or a regression: max error over its range
}


def fidelity_metric(metric: str, fid: dict) -> float:
    """One of FIDELITY_METRICS read from a fidelity() result (the worst output's); nan where no output has it."""
    key, _ = FIDELITY_METRICS[metric]
    if metric == "value_error":
        values = [o[key] for o in fid.get("outputs") or [] if o.get(key) is not None]
        value = max(values) if values else None
    else:
        value = fid.get(key)
    return float("nan") if value is None else float(value)


def generated_batches(inputs: list[InputSpec], samples: int, seed: int) -> list[dict]:
    """`samples` generated inputs in batches the model takes (32 at most; one batch per run where it pins one)."""
    fixed = fixed_batch(inputs)
    if fixed is None:
        return split_batches(example_inputs(inputs, batch=samples, seed=seed), inputs, 32)
    return [example_inputs(inputs, batch=fixed, seed=seed + i) for i in range(max(1, samples // fixed))]


class Evaluator:
    """Measures artifacts the same way every step: same inputs, same threads, same reference outputs."""

    def __init__(self, recipe, original: Model, data, log, progress=None):
        self.recipe = recipe
        self.progress = progress
        self.spec = recipe.report.latency
        self.providers = providers_for(recipe.report.target)
        self.eval = data.eval
        self.log = log
        if self.eval is not None:
            self.inputs_note = f"data.eval ({len(self.eval)} samples)"
            self.labels = self.eval.labels
            self.metric = self.eval.metric
        else:
            self.inputs_note = f"{recipe.report.fidelity_samples} generated inputs"
            self.labels, self.metric = None, None
        self.generated = (
            generated_batches(original.inputs, recipe.report.fidelity_samples, recipe.seed)
            if self.eval is None
            else None
        )
        self.reference_outputs: list[np.ndarray] | None = None
        self.task = original.task

    def description(self) -> str:
        if self.labels is not None:
            return f"{self.metric} on {self.inputs_note}; fidelity vs the original on the same inputs"
        return f"fidelity only (no labelled eval data): original vs optimized on {self.inputs_note}"

    def _batches(self, inputs):
        fixed = fixed_batch(inputs)
        if self.eval is not None:
            return (feeds for feeds, _ in self.eval.batches(batch_size=fixed))
        assert self.generated is not None, "without eval data the inputs were generated"
        return iter(self.generated)

    def measure(self, path: Path, model: Model, runner=None) -> dict:
        runner = runner or load_written(path, model.inputs, self.spec.threads, self.providers, self.task)
        outputs = predict(runner, self._batches(model.inputs))
        if self.reference_outputs is None:
            if self.labels is not None and outputs:  # the original's outputs: do the labels fit them? (exit 2)
                from optcli.data import check_labels_fit

                check_labels_fit(self.labels, outputs[0].shape[1:], self.metric, f"{self.eval.where}: labels")
            self.reference_outputs = outputs
        row = {**size_on_disk(path), **parameter_counts(path, model.module)}
        lat, notes = latency(
            runner, self.spec.batch_sizes, self.spec.warmup, self.spec.runs, self.progress, f"{path.name}: latency"
        )
        row["latency"] = lat
        row["latency_notes"] = notes
        row["engine"] = runner.engine
        row["accuracy"] = (
            {"metric": self.metric, "value": metric_value(self.metric, outputs, self.labels)}
            if self.labels is not None
            else None
        )
        mask = self.eval.arrays.get("attention_mask") if self.eval is not None else None
        class_labels = self.labels is not None and self.metric in ("accuracy", "top5")
        row["fidelity"] = fidelity(self.reference_outputs, outputs, self.task, mask, runner.output_names, class_labels)
        return row
