"""Small ONNX graphs with the traits of models other tools export (built with onnx.helper in milliseconds).

Each builder reproduces one trait seen on real models: weights stored as Constant nodes, old opsets,
initializers listed as graph inputs, dims symbolic shape inference cannot merge, and so on.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

F = TensorProto.FLOAT


def _w(rng, *shape, scale=0.3):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def _vi(name, shape, elem=F):
    return helper.make_tensor_value_info(name, elem, shape)


def _model(nodes, inputs, outputs, inits=(), opset=17, ir=8, extra_opsets=()):
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(inits))
    opsets = [helper.make_opsetid("", opset), *(helper.make_opsetid(d, v) for d, v in extra_opsets)]
    return helper.make_model(graph, opset_imports=opsets, ir_version=ir)


def _weights(arrays: dict, constants: bool):
    """(Constant nodes, initializers) holding the arrays, the way the exporter at hand stores them."""
    if constants:
        return [
            helper.make_node("Constant", [], [k], value=numpy_helper.from_array(v, k)) for k, v in arrays.items()
        ], []
    return [], [numpy_helper.from_array(v, k) for k, v in arrays.items()]


def conv_net(opset=17, constants=False, batchnorm=False, initializers_as_inputs=False, extra_opsets=()):
    """x[N,3,16,16] -> Conv -> (BatchNorm) -> Relu -> Conv -> Relu -> GlobalAveragePool -> Flatten -> Gemm -> y[N,10]."""
    rng = np.random.default_rng(0)
    c = 16
    arrays = {"w1": _w(rng, c, 3, 3, 3), "b1": _w(rng, c), "w2": _w(rng, c, c, 3, 3, scale=0.1), "b2": _w(rng, c)}
    arrays.update(fc_w=_w(rng, 10, c), fc_b=_w(rng, 10))
    if batchnorm:
        arrays.update(scale=1 + _w(rng, c), bias=_w(rng, c), mean=_w(rng, c), var=1 + np.abs(_w(rng, c)))
    nodes, inits = _weights(arrays, constants)
    nodes.append(helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"))
    h = "c1"
    if batchnorm:
        nodes.append(
            helper.make_node("BatchNormalization", ["c1", "scale", "bias", "mean", "var"], ["bn1"], name="bn1")
        )
        h = "bn1"
    nodes += [
        helper.make_node("Relu", [h], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1], name="conv2"),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("GlobalAveragePool", ["r2"], ["p"], name="pool"),
        helper.make_node("Flatten", ["p"], ["f"], axis=1, name="flatten"),
        helper.make_node("Gemm", ["f", "fc_w", "fc_b"], ["y"], transB=1, name="fc"),
    ]
    inputs = [_vi("x", ["N", 3, 16, 16])]
    if initializers_as_inputs:  # IR < 4 exporters list every weight as a graph input too
        inputs += [_vi(t.name, list(t.dims)) for t in inits]
    ir = 3 if initializers_as_inputs else 8
    return _model(nodes, inputs, [_vi("y", ["N", 10])], inits, opset=opset, ir=ir, extra_opsets=extra_opsets)


def matmul_constants():
    """x[N,32] -> MatMul(Constant) -> Add -> Relu -> MatMul(Transpose(Cast(Constant fp16))): weights built by nodes."""
    rng = np.random.default_rng(1)
    nodes, _ = _weights({"w1": _w(rng, 32, 64), "b1": _w(rng, 64), "w2h": _w(rng, 16, 64).astype(np.float16)}, True)
    nodes += [
        helper.make_node("Cast", ["w2h"], ["w2c"], to=F, name="cast_w2"),
        helper.make_node("Transpose", ["w2c"], ["w2"], perm=[1, 0], name="transpose_w2"),
        helper.make_node("MatMul", ["x", "w1"], ["m1"], name="mm1"),
        helper.make_node("Add", ["m1", "b1"], ["a1"], name="add1"),
        helper.make_node("Relu", ["a1"], ["r1"], name="relu1"),
        helper.make_node("MatMul", ["r1", "w2"], ["y"], name="mm2"),
    ]
    return _model(nodes, [_vi("x", ["N", 32])], [_vi("y", ["N", 16])])


def neck(constants=False):
    """A YOLO-like neck on free height/width: stride-2 convs, Resize x2, Concat with the earlier map.

    Symbolic shape inference cannot prove floor((h-1)/2)+1 == 2*(floor((floor((h-1)/2))/2)+1), so it stops.
    """
    rng = np.random.default_rng(2)
    arrays = {"w1": _w(rng, 8, 3, 3, 3), "b1": _w(rng, 8), "w2": _w(rng, 8, 8, 3, 3), "b2": _w(rng, 8)}
    arrays.update(w3=_w(rng, 8, 16, 3, 3), b3=_w(rng, 8))
    nodes, inits = _weights(arrays, constants)
    inits.append(numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales"))
    nodes += [
        helper.make_node("Conv", ["x", "w1", "b1"], ["a"], pads=[1, 1, 1, 1], strides=[2, 2], name="conv1"),
        helper.make_node("Relu", ["a"], ["ar"], name="relu1"),
        helper.make_node("Conv", ["ar", "w2", "b2"], ["b"], pads=[1, 1, 1, 1], strides=[2, 2], name="conv2"),
        helper.make_node("Relu", ["b"], ["br"], name="relu2"),
        helper.make_node("Resize", ["br", "", "scales"], ["up"], mode="nearest", name="resize"),
        helper.make_node("Concat", ["ar", "up"], ["cat"], axis=1, name="concat"),
        helper.make_node("Conv", ["cat", "w3", "b3"], ["y"], pads=[1, 1, 1, 1], name="conv3"),
    ]
    return _model(nodes, [_vi("x", ["batch", 3, "height", "width"])], [_vi("y", ["batch", 8, "h", "w"])], inits)


def opset6_gemm_add():
    """Gemm-6 and Add-6 (broadcast attributes), initializers listed as inputs: ONNX Runtime has no kernel for them."""
    rng = np.random.default_rng(3)
    inits = [numpy_helper.from_array(a, n) for n, a in (("W", _w(rng, 16, 32)), ("B", _w(rng, 16)), ("c", _w(rng, 16)))]
    nodes = [
        helper.make_node("Gemm", ["x", "W", "B"], ["g"], transB=1, broadcast=1, name="gemm"),
        helper.make_node("Add", ["g", "c"], ["y"], broadcast=1, name="add"),
    ]
    inputs = [_vi("x", [4, 32])] + [_vi(t.name, list(t.dims)) for t in inits]
    return _model(nodes, inputs, [_vi("y", [4, 16])], inits, opset=6, ir=3)


def string_input():
    """s[N] strings -> LabelEncoder -> Gather(embedding) -> MatMul -> y[N,64]."""
    rng = np.random.default_rng(4)
    nodes = [
        helper.make_node(
            "LabelEncoder",
            ["s"],
            ["ids"],
            domain="ai.onnx.ml",
            keys_strings=["a", "b", "c"],
            values_int64s=[0, 1, 2],
            default_int64=3,
            name="encode",
        ),
        helper.make_node("Gather", ["E", "ids"], ["emb"], axis=0, name="embed"),
        helper.make_node("MatMul", ["emb", "W"], ["y"], name="mm"),
    ]
    inits = [numpy_helper.from_array(_w(rng, 4, 32), "E"), numpy_helper.from_array(_w(rng, 32, 64), "W")]
    inputs = [_vi("s", ["N"], TensorProto.STRING)]
    return _model(nodes, inputs, [_vi("y", ["N", 64])], inits, extra_opsets=[("ai.onnx.ml", 2)])


def conv_transpose():
    """Conv -> Relu -> grouped ConvTranspose with bias: ORT's per-channel bias quantization breaks on it."""
    rng = np.random.default_rng(5)
    arrays = {"w0": _w(rng, 16, 3, 3, 3), "b0": _w(rng, 16), "wt": _w(rng, 16, 2, 3, 3), "bt": _w(rng, 4)}
    _, inits = _weights(arrays, False)
    nodes = [
        helper.make_node("Conv", ["x", "w0", "b0"], ["c"], pads=[1, 1, 1, 1], name="conv"),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("ConvTranspose", ["r", "wt", "bt"], ["y"], strides=[2, 2], group=2, name="deconv"),
    ]
    return _model(nodes, [_vi("x", ["N", 3, 8, 8])], [_vi("y", ["N", 4, 17, 17])], inits)


def exp_between_matmuls():
    """x -> MatMul -> Exp -> MatMul: Exp has no int8 kernel; its range depends on calibration."""
    rng = np.random.default_rng(6)
    inits = [numpy_helper.from_array(_w(rng, 32, 32, scale=0.1), "W")]
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["m"], name="mm1"),
        helper.make_node("Exp", ["m"], ["e"], name="exp"),
        helper.make_node("MatMul", ["e", "W"], ["y"], name="mm2"),
    ]
    return _model(nodes, [_vi("x", ["N", 32])], [_vi("y", ["N", 32])], inits)


def no_batch_axis():
    """x[5] (fixed, no batch axis) -> Reshape [1,5] -> MatMul -> y[1,64]."""
    rng = np.random.default_rng(7)
    inits = [numpy_helper.from_array(_w(rng, 5, 64), "W"), numpy_helper.from_array(np.array([1, 5], np.int64), "shape")]
    nodes = [
        helper.make_node("Reshape", ["x", "shape"], ["x2"], name="reshape"),
        helper.make_node("MatMul", ["x2", "W"], ["y"], name="mm"),
    ]
    return _model(nodes, [_vi("x", [5])], [_vi("y", [1, 64])], inits)


def preview_training():
    """One ai.onnx.preview.training op (Adagrad): valid ONNX that ONNX Runtime's inference build cannot load."""
    node = helper.make_node(
        "Adagrad",
        ["R", "T", "X", "G", "H"],
        ["X_new", "H_new"],
        domain="ai.onnx.preview.training",
        norm_coefficient=0.001,
        decay_factor=0.1,
        epsilon=1e-5,
        name="adagrad",
    )
    inputs = [_vi("R", []), _vi("T", [], TensorProto.INT64), _vi("X", [4]), _vi("G", [4]), _vi("H", [4])]
    return _model(
        [node], inputs, [_vi("X_new", [4]), _vi("H_new", [4])], extra_opsets=[("ai.onnx.preview.training", 1)]
    )


def weightless():
    """a + b -> Relu: nothing to quantize."""
    nodes = [
        helper.make_node("Add", ["a", "b"], ["s"], name="add"),
        helper.make_node("Relu", ["s"], ["y"], name="relu"),
    ]
    return _model(nodes, [_vi("a", ["N", 8]), _vi("b", ["N", 8])], [_vi("y", ["N", 8])])


def save(proto: onnx.ModelProto, path) -> str:
    onnx.save(proto, str(path))
    return str(path)
