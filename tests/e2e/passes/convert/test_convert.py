"""The convert pass (fp16 / bf16), checked on the files it writes: types per node, load in ONNX Runtime, fidelity."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import torch
from conftest import digits_recipe, run_cli, write_recipe
from onnx import TensorProto, helper, numpy_helper

FAST = {"latency": {"batch_sizes": [1], "warmup": 0, "runs": 2, "threads": 1}}
F16, F32 = TensorProto.FLOAT16, TensorProto.FLOAT


def _types(proto) -> dict[str, int]:
    inferred = onnx.shape_inference.infer_shapes(proto)
    types = {v.name: v.type.tensor_type.elem_type for v in [*inferred.graph.value_info, *inferred.graph.input]}
    types.update({v.name: v.type.tensor_type.elem_type for v in inferred.graph.output})
    types.update({t.name: t.data_type for t in proto.graph.initializer})
    return types


def _sorted(proto) -> bool:
    known = {i.name for i in proto.graph.input} | {t.name for t in proto.graph.initializer} | {""}
    for node in proto.graph.node:
        if any(i not in known for i in node.input):
            return False
        known.update(node.output)
    return True


def _run(folder, recipe):
    out = folder / "out"
    result = run_cli("run", write_recipe(folder, recipe), "-o", out, "--json", "--quiet")
    return out, result


def test_fp16_round_trip_keeps_io_float32_and_block_listed_ops_in_fp32(digits, tmp_path):
    recipe = digits_recipe(digits, [{"type": "convert", "dtype": "fp16", "op_block_list": ["Gemm"]}], report=FAST)
    recipe["model"] = {"path": str(digits / "digits_cnn.onnx")}
    out, result = _run(tmp_path, recipe)
    assert result.exit_code == 0, result.stderr
    report = result.json()
    proto = onnx.load(str(out / "model.onnx"))
    onnx.checker.check_model(proto, full_check=True)
    assert _sorted(proto), "nodes not topologically sorted (the converter appends its keep-io Casts)"
    types = _types(proto)
    assert all(types[i.name] == F32 for i in [*proto.graph.input, *proto.graph.output])
    convs = [n for n in proto.graph.node if n.op_type == "Conv"]
    gemms = [n for n in proto.graph.node if n.op_type == "Gemm"]
    assert convs and gemms
    assert all(types[n.input[1]] == F16 for n in convs)
    assert all(types[i] == F32 for n in gemms for i in n.input if i)
    original, half = report["steps"][0], report["steps"][1]
    assert half["size_bytes"] < 0.7 * original["size_bytes"]
    assert abs(half["accuracy"]["value"] - original["accuracy"]["value"]) <= 0.01
    assert half["fidelity"]["cosine_mean"] > 0.999
    assert any("fp16 buys size, rarely speed" in w for w in report["warnings"])
    # the written file, run here independently, agrees with the fp32 original
    x = np.load(digits / "digits_test.npz")["x"][:32]
    ref = ort.InferenceSession(str(digits / "digits_cnn.onnx"), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    got = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    assert got[0].dtype == np.float32 and np.abs(got[0] - ref[0]).max() < 0.05


def _overflow_graph(folder):
    """Resize (float scales) -> MatMul -> x1000 -> Pow 2 -> ReduceMean: the squares pass fp16's 65504, the mean not."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.normal(size=(8, 8)).astype(np.float32), "w")
    scales = numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales")
    big = numpy_helper.from_array(np.array(1000.0, np.float32), "big")
    two = numpy_helper.from_array(np.array(2.0, np.float32), "two")
    nodes = [
        helper.make_node("Resize", ["x", "", "scales"], ["r"], name="resize", mode="nearest"),
        helper.make_node("MatMul", ["r", "w"], ["m"], name="matmul"),
        helper.make_node("Mul", ["m", "big"], ["s"], name="scale"),
        helper.make_node("Pow", ["s", "two"], ["p"], name="square"),
        helper.make_node("ReduceMean", ["p"], ["v"], name="variance", axes=[-1], keepdims=1),
        helper.make_node("Sqrt", ["v"], ["d"], name="root"),
        helper.make_node("Div", ["s", "d"], ["y"], name="normalize"),
    ]
    graph = helper.make_graph(
        nodes,
        "overflow",
        [helper.make_tensor_value_info("x", F32, ["N", 1, 4, 4])],
        [helper.make_tensor_value_info("y", F32, ["N", 1, 8, 8])],
        [w, scales, big, two],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    onnx.save(model, str(folder / "overflow.onnx"))
    np.savez(folder / "x.npz", x=rng.uniform(0.5, 1.5, size=(16, 1, 4, 4)).astype(np.float32))
    return {
        "model": {"path": str(folder / "overflow.onnx"), "inputs": [{"name": "x", "shape": [2, 1, 4, 4]}]},
        "data": {"eval": {"path": str(folder / "x.npz")}, "calibration": {"path": str(folder / "x.npz")}},
        "passes": [{"type": "convert"}],
        "report": FAST,
        "gates": {},  # a 4x4 graph kept mostly fp32 plus Casts is bigger: the default size gate would say so, rightly
    }


def test_fp16_overflow_guard_keeps_the_overflowing_nodes_fp32(tmp_path):
    recipe = _overflow_graph(tmp_path)
    out, result = _run(tmp_path, recipe)
    assert result.exit_code == 0, result.stderr
    step = result.json()["steps"][1]
    kept = step["details"]["overflow_guard"]["kept_fp32"]
    assert {"square", "variance"} <= set(kept) and "matmul" not in kept
    proto = onnx.load(str(out / "model.onnx"))
    types = _types(proto)
    by_name = {n.name: n for n in proto.graph.node}
    assert types[by_name["square"].output[0]] == F32 and types[by_name["matmul"].output[0]] == F16
    assert types[by_name["resize"].input[2]] == F32  # Resize scales stay float32, as the op requires
    # nothing on the fp32 path passes through fp16 on the way (the converter's fp16 round trips are removed)
    x = np.load(tmp_path / "x.npz")["x"]
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # no cast elimination behind our back
    got = ort.InferenceSession(str(out / "model.onnx"), opts, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    ref = ort.InferenceSession(str(tmp_path / "overflow.onnx"), providers=["CPUExecutionProvider"]).run(None, {"x": x})[
        0
    ]
    assert np.isfinite(got).all() and np.abs(got - ref).max() < 0.05
    assert step["fidelity"]["cosine_mean"] > 0.999


def test_torch_bf16_and_fp16_write_half_weights_that_keep_accuracy(digits, tmp_path):
    for dtype, torch_dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        folder = tmp_path / dtype
        folder.mkdir()
        out, result = _run(folder, digits_recipe(digits, [{"type": "convert", "dtype": dtype}], report=FAST))
        assert result.exit_code == 0, result.stderr
        report = result.json()
        state = torch.export.load(str(out / "model.pt2")).state_dict
        assert state["stem.0.weight"].dtype == torch_dtype and state["classifier.weight"].dtype == torch_dtype
        original, half = report["steps"][0], report["steps"][1]
        assert abs(half["accuracy"]["value"] - original["accuracy"]["value"]) <= 0.02
        weights = [t for n, t in state.items() if n.endswith(".weight")]
        assert all(t.element_size() == 2 for t in weights)  # the .pt2 container's own overhead aside, half the bytes


def test_convert_refuses_what_it_cannot_do_at_load(digits, tmp_path):
    onnx_model = {"path": str(digits / "digits_cnn.onnx")}
    cases = [
        (onnx_model, [{"type": "convert", "dtype": "bf16"}], "writes fp16 only"),
        (onnx_model, [{"type": "convert"}, {"type": "quantize"}], "quantize or convert"),
        (None, [{"type": "convert"}, {"type": "finetune"}], "put convert after it"),
        (None, [{"type": "convert", "keep_io_types": False}], "applies to ONNX graphs"),
    ]
    for i, (model, passes, words) in enumerate(cases):
        recipe = digits_recipe(digits, passes)
        recipe["data"]["train"] = {"path": str(digits / "digits_train.npz"), "labels": "y"}
        if model:
            recipe["model"] = model
        result = run_cli("validate", write_recipe(tmp_path, recipe, f"r{i}.yaml"))
        assert result.exit_code == 2, (passes, result.stderr)
        assert words in result.stderr and "Traceback" not in result.stderr, result.stderr
