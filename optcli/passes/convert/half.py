"""fp16 for an ONNX graph with ONNX Runtime's converter, and the repairs its output needs before it loads and runs right.

The converter (onnxruntime.transformers.float16) leaves three traps, each met on real graphs:
- with keep_io_types the input/output Casts are appended at the end of the node list: not topologically sorted, so
  the ONNX checker and some runtimes refuse the graph; it is re-sorted here with onnx_ir.
- between two nodes kept in fp32 it still routes the tensor through fp16 (Cast to fp16, Cast back): a value above
  65504 becomes inf there, which is exactly what keeping those nodes in fp32 was meant to avoid; such round trips
  are removed.
- it knows nothing about the data: a node whose activations exceed fp16's range (a Pow before a ReduceMean, a
  large attention bias) turns into inf/NaN. The guard runs the fp32 graph on calibration data and keeps in fp32
  every node that produces or reads a tensor past the bound, or whose reduction can sum past it.
"""

from __future__ import annotations

import numpy as np

FP16_MAX = 65504.0
REDUCTIONS = {"ReduceMean", "ReduceSum", "ReduceSumSquare", "ReduceL2", "ReduceLogSumExp", "ReduceL1"}


def tensor_max_abs(proto, batches: list[dict]) -> tuple[dict[str, float], dict[str, int]]:
    """max |x| of every float tensor of the main graph (initializers, activations, outputs) over the batches, and sizes."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, numpy_helper

    found: dict[str, float] = {}
    sizes: dict[str, int] = {}
    for t in proto.graph.initializer:
        if t.data_type == TensorProto.FLOAT:
            arr = numpy_helper.to_array(t)
            if arr.size:
                found[t.name] = float(np.abs(arr).max())
    inferred = onnx.shape_inference.infer_shapes(proto)
    floats = {v.name for v in inferred.graph.value_info if v.type.tensor_type.elem_type == TensorProto.FLOAT}
    produced = {o for n in inferred.graph.node for o in n.output if o}
    outputs = {o.name for o in inferred.graph.output}
    probe = onnx.ModelProto()
    probe.CopyFrom(inferred)
    probe.graph.output.extend(
        onnx.helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in sorted(floats & produced - outputs)
    )
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(probe.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    wanted = {i.name for i in session.get_inputs()}
    for feeds in batches:
        values = session.run(None, {k: v for k, v in feeds.items() if k in wanted})
        for name, value in zip(names, values, strict=True):
            if isinstance(value, np.ndarray) and value.dtype.kind == "f" and value.size:
                peak = float(np.abs(value).max()) if np.isfinite(value).all() else float("inf")
                found[name] = max(found.get(name, 0.0), peak)
                sizes[name] = value.size
    return found, sizes


def overflowing_nodes(proto, max_abs: dict[str, float], bound: float, sizes: dict[str, int]) -> dict[str, str]:
    """Nodes that must stay fp32: node name -> why (the tensor and its peak)."""
    keep: dict[str, str] = {}
    for node in proto.graph.node:
        for name in list(node.input) + list(node.output):
            peak = max_abs.get(name)
            if peak is not None and peak > bound:
                keep.setdefault(node.name, f"{name}: max |x| {peak:.4g} > {bound:g}")
        if node.op_type in REDUCTIONS and node.input and node.output:
            # The sum a reduction accumulates can pass the bound while every input and the mean stay inside it.
            src, dst = node.input[0], node.output[0]
            if src in max_abs and sizes.get(src) and sizes.get(dst):
                reach = max_abs[src] * sizes[src] / sizes[dst]
                if node.op_type == "ReduceSumSquare":
                    reach = max_abs[src] ** 2 * sizes[src] / sizes[dst]
                if reach > bound:
                    keep.setdefault(node.name, f"{node.op_type} over {src}: sum can reach {reach:.4g} > {bound:g}")
    return keep


def drop_fp16_round_trips(proto) -> int:
    """Skip Cast(fp32->fp16) -> Cast(fp16->fp32) chains the converter puts between two fp32 nodes; returns how many."""
    import onnx
    from onnx import TensorProto

    def cast_to(node):
        return next((a.i for a in node.attribute if a.name == "to"), None) if node.op_type == "Cast" else None

    inferred = onnx.shape_inference.infer_shapes(proto)
    types = {v.name: v.type.tensor_type.elem_type for v in list(inferred.graph.value_info) + list(inferred.graph.input)}
    types.update({t.name: t.data_type for t in proto.graph.initializer})
    producer = {o: n for n in proto.graph.node for o in n.output}
    outputs = {o.name for o in proto.graph.output}
    rename: dict[str, str] = {}
    for node in proto.graph.node:
        if cast_to(node) != TensorProto.FLOAT or node.output[0] in outputs:
            continue
        first = producer.get(node.input[0])
        if first is None or cast_to(first) != TensorProto.FLOAT16 or types.get(first.input[0]) != TensorProto.FLOAT:
            continue
        rename[node.output[0]] = first.input[0]
    if not rename:
        return 0
    kept = [n for n in proto.graph.node if not (n.op_type == "Cast" and n.output[0] in rename)]
    for node in kept:
        for k, name in enumerate(node.input):
            if name in rename:
                node.input[k] = rename[name]
    read = {i for n in kept for i in n.input} | outputs
    kept = [n for n in kept if not (cast_to(n) == TensorProto.FLOAT16 and n.output[0] not in read)]
    del proto.graph.node[:]
    proto.graph.node.extend(kept)
    return len(rename)


def sort_graph(proto):
    """Topologically sorted copy (the converter appends its keep-io Casts at the end)."""
    import onnx_ir as ir

    model = ir.serde.deserialize_model(proto)
    model.graph.sort()
    return ir.serde.serialize_model(model)
