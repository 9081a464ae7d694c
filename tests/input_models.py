"""Small models with the input traits of speech, OCR and speaker models (built in milliseconds).

Each builder reproduces one trait: a scalar input (a sample rate), a recurrent state whose first axis is not the
batch, integer ids that index an embedding table, a TorchScript forward taking a Python int.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

F, I64 = TensorProto.FLOAT, TensorProto.INT64


def _w(rng, *shape, scale=0.3):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def _model(nodes, inputs, outputs, inits=()) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(inits))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def scalar_rate():
    """x[batch, 16] and sr[] (int64, a sample rate): y = (x @ W) * sr / 16000."""
    rng = np.random.default_rng(1)
    inits = [numpy_helper.from_array(_w(rng, 16, 32), "W"), numpy_helper.from_array(np.float32(1 / 16000), "k")]
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["h"]),
        helper.make_node("Cast", ["sr"], ["srf"], to=F),
        helper.make_node("Mul", ["srf", "k"], ["scale"]),
        helper.make_node("Mul", ["h", "scale"], ["y"]),
    ]
    inputs = [helper.make_tensor_value_info("x", F, ["batch", 16]), helper.make_tensor_value_info("sr", I64, [])]
    return _model(nodes, inputs, [helper.make_tensor_value_info("y", F, ["batch", 32])], inits)


def recurrent_state(state_batch="fixed"):
    """x[batch, 16] and a state h[2, 1, 32] (layers x batch x hidden; h[2, batch, 32] with state_batch="dynamic"):
    y = x @ W; h_new = concat(h[1:], y), which holds only where h's batch axis matches x's batch."""
    rng = np.random.default_rng(2)
    inits = [
        numpy_helper.from_array(_w(rng, 16, 32), "W"),
        numpy_helper.from_array(np.array([0], np.int64), "axes"),
        numpy_helper.from_array(np.array([1], np.int64), "one"),
        numpy_helper.from_array(np.array([2], np.int64), "two"),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["y"]),
        helper.make_node("Unsqueeze", ["y", "axes"], ["y3"]),
        helper.make_node("Slice", ["h", "one", "two", "axes"], ["h1"]),
        helper.make_node("Concat", ["h1", "y3"], ["h_new"], axis=0),  # needs h's batch axis == x's batch
    ]
    batch = 1 if state_batch == "fixed" else "batch"
    inputs = [
        helper.make_tensor_value_info("x", F, ["batch", 16]),
        helper.make_tensor_value_info("h", F, [2, batch, 32]),
    ]
    outputs = [
        helper.make_tensor_value_info("y", F, ["batch", 32]),
        helper.make_tensor_value_info("h_new", F, [2, "batch", 32]),
    ]
    return _model(nodes, inputs, outputs, inits)


def embedding_ids(rows=4):
    """ids[batch, 6] (int64) -> Gather(table[rows, 32]) -> ReduceMean -> MatMul -> y[batch, 8]."""
    rng = np.random.default_rng(3)
    inits = [
        numpy_helper.from_array(_w(rng, rows, 32), "table"),
        numpy_helper.from_array(_w(rng, 32, 8), "W"),
    ]
    nodes = [
        helper.make_node("Gather", ["table", "ids"], ["e"]),
        helper.make_node("ReduceMean", ["e"], ["m"], axes=[1], keepdims=0),
        helper.make_node("MatMul", ["m", "W"], ["y"]),
    ]
    inputs = [helper.make_tensor_value_info("ids", I64, ["batch", 6])]
    return _model(nodes, inputs, [helper.make_tensor_value_info("y", F, ["batch", 8])], inits)


def scripted_rate():
    """A TorchScript module whose forward takes a Python int: forward(self, x, sr: int)."""
    import torch

    class Rate(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.lin = torch.nn.Linear(16, 8)

        def forward(self, x: torch.Tensor, sr: int) -> torch.Tensor:
            return self.lin(x) * (sr / 16000.0)

    return torch.jit.script(Rate().eval())


def save(proto: onnx.ModelProto, path) -> str:
    onnx.save(proto, str(path))
    return str(path)
