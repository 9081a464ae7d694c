"""Does a rewritten ONNX model still load in ONNX Runtime and give the same outputs? Shared by every graph rewrite
(prepare, optimize, quantize's fallback) and by measurement of a graph too old for ONNX Runtime's kernels.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from optcli.artifact import artifact_files
from optcli.errors import first_line

MIN_OPSET = 13  # per-axis QuantizeLinear/DequantizeLinear (per-channel int8) exist from opset 13


class Unloadable(Exception):
    """ONNX Runtime cannot build a session for the model (or run it on the check inputs)."""


def reason(e: BaseException, limit: int = 300) -> str:
    """`Type: first line` of an error, without ORT's code prefix or the temp path it names."""
    text = re.sub(r"Load model from \S+ failed: ?", "", first_line(str(e).replace("[ONNXRuntimeError] : ", ""), limit))
    return f"{type(e).__name__}: {text}"


def default_opset(proto) -> int:
    return next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)


def upgrade(proto, target: int = MIN_OPSET):
    """The model converted to opset `target`: onnx's converter, else onnxscript's; ValueError with both reasons."""
    import onnx
    from onnx import version_converter

    try:
        converted = version_converter.convert_version(proto, target)
        onnx.checker.check_model(converted)
        return converted
    except Exception as e:
        first = reason(e, 200)
    try:
        import onnx_ir as ir
        from onnxscript import version_converter as script_converter

        model = ir.from_proto(proto)
        script_converter.convert_version(model, target, fallback=True)
        converted = ir.to_proto(model)
        if default_opset(converted) != target:
            raise ValueError(f"stayed at opset {default_opset(converted)}")
        onnx.checker.check_model(converted)
        return converted
    except Exception as e:
        raise ValueError(f"onnx.version_converter: {first}; onnxscript: {reason(e, 200)}") from None


def session(model, threads: int = 1, opts=None, providers: list[str] | None = None):
    """An ONNX Runtime session on a path or an in-memory ModelProto; Unloadable with ORT's reason."""
    import onnxruntime as ort

    if opts is None:
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        opts.intra_op_num_threads = threads
    source = model.SerializeToString() if hasattr(model, "SerializeToString") else str(model)
    try:
        return ort.InferenceSession(source, opts, providers=providers or ["CPUExecutionProvider"])
    except Exception as e:  # ORT raises its own Fail / InvalidGraph / NotImplemented types
        raise Unloadable(reason(e)) from None


def session_or_upgraded(path: Path, opts, providers: list[str] | None = None) -> tuple[Any, str | None]:
    """A session on the file; for a graph older than ONNX Runtime's kernels (Add-6, Gemm-6), on an in-memory
    copy upgraded to opset 13. Returns (session, note on the upgrade or None); Unloadable when neither loads."""
    try:
        return session(path, opts=opts, providers=providers), None
    except Unloadable as e:
        from optcli.onnxgraph import load_model

        proto = load_model(path)
        opset = default_opset(proto)
        if not 0 < opset < MIN_OPSET:
            raise
        try:
            upgraded = upgrade(proto, MIN_OPSET)
        except ValueError as why:
            raise Unloadable(f"{e}; upgrading opset {opset} -> {MIN_OPSET} failed: {why}") from None
        return session(
            upgraded, opts=opts, providers=providers
        ), f"opset {opset} upgraded to {MIN_OPSET} in memory to run it ({e})"


def outputs_of(model, feeds: list[dict]) -> list[list[np.ndarray]]:
    sess = session(model)
    names = {i.name for i in sess.get_inputs()}
    try:
        return [sess.run(None, {k: v for k, v in f.items() if k in names}) for f in feeds]
    except Exception as e:
        raise Unloadable(f"it loads but fails on the check inputs ({reason(e)})") from None


def mismatch(reference, got, rtol: float) -> str | None:
    """Why two sets of outputs differ beyond float reordering noise, or None when they agree."""
    for ref_batch, got_batch in zip(reference, got, strict=True):
        if len(ref_batch) != len(got_batch):
            return f"{len(got_batch)} outputs instead of {len(ref_batch)}"
        for i, (a, b) in enumerate(zip(ref_batch, got_batch, strict=True)):
            a, b = np.asarray(a), np.asarray(b)
            if a.shape != b.shape:
                return f"output {i} has shape {b.shape} instead of {a.shape}"
            if a.dtype.kind != "f":
                if not np.array_equal(a, b):
                    return f"output {i} differs in {int((a != b).sum())} of {a.size} values"
                continue
            a64, b64 = a.astype(np.float64), b.astype(np.float64)
            finite = np.isfinite(a64)
            if not np.array_equal(finite, np.isfinite(b64)):
                return f"output {i} has inf/NaN where the input model's has none, or the reverse"
            if finite.any():
                scale = float(np.abs(a64[finite]).max())
                err = float(np.abs(a64[finite] - b64[finite]).max())
                if err > rtol * max(scale, 1e-6):
                    return f"output {i} differs by {err:.3g} (largest value {scale:.3g})"
    return None


def check_feeds(model, data, seed: int = 0, samples: int = 2) -> list[dict]:
    """Inputs to compare a rewrite's outputs on: the first calibration batch, else eval, else generated ones."""
    from optcli.model import example_inputs, fixed_batch

    batch = fixed_batch(model.inputs) or samples
    for dataset in (data.calibration, data.eval):
        if dataset is not None:
            for feeds, _ in dataset.batches(batch_size=batch, limit=batch):
                return [feeds]
    return [example_inputs(model.inputs, batch=batch, seed=seed)]


def model_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in artifact_files(path))


def place(path: Path, folder: Path, move: bool) -> Path:
    """The model file and its external data moved (a file of ours) or copied (the user's input) into `folder`."""
    for f in artifact_files(path):
        if move:
            shutil.move(str(f), folder / f.name)
        else:
            shutil.copyfile(f, folder / f.name)
    return folder / path.name


def nbits_counts(proto) -> dict[int, int]:
    """MatMulNBits nodes by their bits attribute (4 unless written), in subgraphs too."""
    from collections import Counter

    return dict(
        Counter(
            next((a.i for a in n.attribute if a.name == "bits"), 4)
            for n in all_nodes(proto)
            if n.op_type == "MatMulNBits"
        )
    )


def name_nodes(proto) -> None:
    """Give unnamed nodes stable names (op type + position): exclusion lists and block lists work by node name."""
    used = {n.name for n in proto.graph.node if n.name}
    for i, node in enumerate(proto.graph.node):
        if not node.name:
            name = f"{node.op_type}_{i}"
            while name in used:
                name += "_"
            node.name = name
            used.add(name)


def subgraphs(graph):
    """Every graph nested in `graph` (If branches, Loop / Scan bodies), depth first, `graph` itself excluded."""
    import onnx

    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield attr.g
                yield from subgraphs(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield g
                    yield from subgraphs(g)


def all_graphs(proto) -> list:
    """The main graph and every graph nested in it: weights and nodes live in all of them."""
    return [proto.graph, *subgraphs(proto.graph)]


def all_nodes(proto) -> list:
    """Every node of the model, inside If / Loop / Scan bodies too (each graph's nodes in topological order)."""
    return [n for g in all_graphs(proto) for n in g.node]


def all_initializers(proto) -> list:
    return [t for g in all_graphs(proto) for t in g.initializer]


QUANTIZED_OPS = frozenset(
    {
        "QuantizeLinear",
        "DequantizeLinear",
        "DynamicQuantizeLinear",
        "QLinearConv",
        "QLinearMatMul",
        "MatMulInteger",
        "ConvInteger",
    }
)


def holds_int8(proto) -> bool:
    """An ONNX model already quantized (Q/DQ or integer ops, in a branch too): quantizing it again is refused."""
    return any(n.op_type in QUANTIZED_OPS for n in all_nodes(proto))
