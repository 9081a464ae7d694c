"""When ONNX Runtime's quantizer breaks on one node, keep that node in fp32 and quantize the rest.

The quantizer fails in two ways on odd graphs: it raises while rewriting a node (a grouped ConvTranspose's
per-channel bias), or it writes a model (or a calibration model) that ONNX Runtime then refuses to load.
Either way the culprit is named somewhere: in the message, or in the quantizer's own frames.
"""

from __future__ import annotations

import re

# Suffixes ORT's quantizer and calibrator append to the names of the tensors and nodes they add.
_SUFFIXES = (
    "_DequantizeLinear_Output",
    "_QuantizeLinear_Output",
    "_DequantizeLinear",
    "_QuantizeLinear",
    "_quantized",
    "_scale",
    "_zero_point",
    "_ReduceMax",
    "_ReduceMin",
    "_Reshape",
    "_output",
)
QUANTIZABLE = frozenset(
    {
        "Conv",
        "ConvTranspose",
        "MatMul",
        "Gemm",
        "Gather",
        "Attention",
        "LSTM",
        "Add",
        "Mul",
        "Relu",
        "Clip",
        "MaxPool",
        "AveragePool",
        "GlobalAveragePool",
        "Concat",
        "Resize",
        "Split",
        "Transpose",
        "Reshape",
        "Squeeze",
        "Unsqueeze",
        "Softmax",
        "Where",
        "InstanceNormalization",
        "LayerNormalization",
        "ArgMax",
        "Pad",
        "Sigmoid",
        "HardSwish",
        "HardSigmoid",
        "LeakyRelu",
        "Exp",
        "Tanh",
        "Sub",
        "Div",
        "Slice",
        "Flatten",
        "Expand",
        "Tile",
    }
)


def _names_in(text: str) -> list[str]:
    out = []
    for token in re.findall(r"[\w./:\-]+", text):
        out.append(token)
        for suffix in _SUFFIXES:
            if token.endswith(suffix):
                out.append(token[: -len(suffix)])
    return out


def culprit(proto, error: BaseException) -> tuple[str, str] | None:
    """(node name, op type) of the graph node an error of the quantizer points at, or None."""
    import onnx

    by_name = {n.name: n for n in proto.graph.node if n.name}
    consumers: dict[str, list] = {}
    producers: dict[str, object] = {}
    for n in proto.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
        for o in n.output:
            producers[o] = n

    def resolve(name: str):
        if name in by_name:
            return by_name[name]
        users = [n for n in consumers.get(name, []) if n.op_type in QUANTIZABLE]
        if users:
            return users[0]
        return producers.get(name)

    candidates: list[str] = _names_in(str(error))
    tb = error.__traceback__
    frames = []
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    for frame in reversed(frames):  # innermost first: the bias, weight or node being rewritten
        if "onnxruntime" not in frame.f_code.co_filename:
            continue
        for key, value in frame.f_locals.items():
            if isinstance(value, str) and key != "self":
                candidates.append(value)
            elif isinstance(value, onnx.NodeProto):
                candidates.append(value.name)
            elif key == "self" and isinstance(getattr(value, "node", None), onnx.NodeProto):
                candidates.append(value.node.name)
    for name in candidates:
        node = resolve(name)
        if node is not None and node.name:
            return node.name, node.op_type
    return None
