"""SmoothQuant on an ONNX graph: move per-channel activation outliers into the next layer's weights.

For a MatMul y = x @ W with a constant W, y = (x / s) @ (diag(s) W) for any positive per-channel s. Choosing
s_c = max|x_c|^alpha / max|W_c|^(1-alpha) flattens the activation channels that hold outliers (LayerNorm outputs,
GELU outputs feeding an FFN projection), so a per-tensor int8 activation scale keeps its resolution, while the
per-channel weight scales absorb the growth. The division by s is folded into a LayerNormalization's gamma/beta
where the LayerNorm feeds only the smoothed MatMuls (pre-LN blocks); elsewhere (post-LN residuals, activations)
it becomes one Mul by 1/s in front of the MatMuls. In float the graph computes the same function.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, TypeGuard

import numpy as np

from optcli.onnxgraph import links, load_model
from optcli.passes.quantize.activations import tensor_values

if TYPE_CHECKING:
    from onnx import NodeProto


def _groups(proto) -> dict[str, list]:
    """Activation tensor -> MatMuls that multiply it by a constant 2-D float weight (all of them share one s)."""
    from onnx import TensorProto

    inits = {t.name: t for t in proto.graph.initializer}
    uses: dict[str, int] = {}
    for node in proto.graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    groups: dict[str, list] = {}
    for node in proto.graph.node:
        if node.op_type != "MatMul" or len(node.input) != 2:
            continue
        x, w = node.input
        t = inits.get(w)
        if x in inits or t is None or t.data_type != TensorProto.FLOAT or len(t.dims) != 2 or uses.get(w, 0) != 1:
            continue
        groups.setdefault(x, []).append(node)
    return groups


def channel_absmax(path: Path, tensors: list[str], batches: list[dict]) -> dict[str, np.ndarray]:
    """max |x| per last-axis channel of each named tensor over the batches (ONNX Runtime, float graph)."""
    result: dict[str, np.ndarray] = {}
    for values in tensor_values(load_model(path), tensors, batches, optimize=False):
        for name, value in zip(tensors, values, strict=True):
            m = np.abs(value.reshape(-1, value.shape[-1])).max(0)
            result[name] = np.maximum(result[name], m) if name in result else m
    return result


def smooth(source: Path, target: Path, batches: list[dict], alpha: float = 0.5) -> dict:
    """Write a smoothed copy of `source` to `target`; returns what was done (for the report)."""
    import onnx
    from onnx import numpy_helper

    from optcli.artifact import save_onnx

    proto = load_model(source)  # smoothed in place below: its own copy
    groups = _groups(proto)
    if not groups:
        save_onnx(proto, target)
        return {"alpha": alpha, "groups": 0, "folded_into_layernorm": 0, "mul_inserted": 0}
    amax = channel_absmax(source, list(groups), batches)
    inits = {t.name: t for t in proto.graph.initializer}
    producers, consumers = links(proto.graph.node)
    outputs = {o.name for o in proto.graph.output}
    folded = inserted = 0
    new_nodes = []
    for x, matmuls in groups.items():
        weights = [numpy_helper.to_array(inits[n.input[1]]) for n in matmuls]
        a = amax.get(x)
        if a is None or a.shape[0] != weights[0].shape[0]:
            continue
        w_max = np.max([np.abs(w).max(1) for w in weights], axis=0)
        live = (a > 0) & (w_max > 0)
        s = np.ones_like(a, dtype=np.float64)
        s[live] = np.power(a[live], alpha) / np.power(w_max[live], 1 - alpha)
        s = np.clip(s, 1e-5, 1e5)
        for node, w in zip(matmuls, weights, strict=False):
            inits[node.input[1]].CopyFrom(numpy_helper.from_array((w * s[:, None]).astype(np.float32), node.input[1]))
        producer = producers.get(x)
        if _foldable(producer, x, matmuls, consumers, inits, outputs):
            for idx in (1, 2)[: len(producer.input) - 1]:
                name = producer.input[idx]
                if not name:
                    continue
                # Exporters share identical initializers (default gamma = ones) between LayerNorms: give this one its own.
                own = f"{name}_smoothed_{producer.name or x}"
                proto.graph.initializer.append(
                    numpy_helper.from_array((numpy_helper.to_array(inits[name]) / s).astype(np.float32), own)
                )
                producer.input[idx] = own
            folded += 1
        else:
            scale_name, smoothed = f"{x}_smooth_inv", f"{x}_smoothed"
            proto.graph.initializer.append(numpy_helper.from_array((1.0 / s).astype(np.float32), scale_name))
            new_nodes.append(
                (matmuls[0], onnx.helper.make_node("Mul", [x, scale_name], [smoothed], name=f"{x}_smooth"))
            )
            for node in matmuls:
                node.input[0] = smoothed
            inserted += 1
    _insert_before(proto, new_nodes)
    used = {i for n in proto.graph.node for i in n.input} | {o.name for o in proto.graph.output}
    kept = [t for t in proto.graph.initializer if t.name in used]
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(kept)
    save_onnx(proto, target)
    return {"alpha": alpha, "groups": len(groups), "folded_into_layernorm": folded, "mul_inserted": inserted}


def _foldable(producer, x, matmuls, consumers, inits, outputs) -> TypeGuard[NodeProto]:
    if (
        producer is None
        or producer.op_type != "LayerNormalization"
        or x in outputs
        or len(producer.output) < 1
        or producer.output[0] != x
    ):
        return False
    if {id(n) for n in consumers.get(x, [])} != {id(n) for n in matmuls}:
        return False  # the LayerNorm also feeds a residual or another op: its output must stay as it is
    return all(p in inits for p in producer.input[1:3] if p)


def _insert_before(proto, pairs) -> None:
    """Insert each new node just before the first MatMul it feeds, keeping the graph topologically sorted."""
    if not pairs:
        return
    before = {id(anchor): node for anchor, node in pairs}
    nodes = []
    for node in proto.graph.node:
        if id(node) in before:
            nodes.append(before[id(node)])
        nodes.append(node)
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)
