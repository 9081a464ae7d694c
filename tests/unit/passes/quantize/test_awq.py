"""AWQ (optcli/passes/quantize/awq.py) on a hand-built decoder slice: an RMS norm feeding q, gate and up, and down_proj
after Mul(gate, up), with a few outlier input channels as trained LLMs have. Errors are re-measured with ONNX
Runtime's own MatMulNBits on fresh inputs, not read from the search's figures. The whole decoder runs in
tests/e2e/llm/test_llm_int4.py."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from optcli.passes.quantize import awq
from optcli.passes.quantize.weight_only import _algo, _run

K, HIDDEN, BLOCK = 64, 96, 32
OUTLIERS = [3, 17, 40, 41]  # input channels ~25x larger than the rest


def _inputs(rng, rows: int) -> np.ndarray:
    x = rng.normal(size=(rows, K)).astype(np.float32)
    x[:, OUTLIERS] *= 25.0
    return x


def _slice(rng, tied_head: bool = False) -> onnx.ModelProto:
    """x -> SimplifiedLayerNormalization -> q, gate, up; Mul(SiLU(gate), up) -> down. With tied_head, a second norm feeds
    a head whose weight a Transpose also reads (a tied embedding table)."""
    weights = {
        "q.w": rng.normal(size=(K, 32)),
        "gate.w": rng.normal(size=(K, HIDDEN)),
        "up.w": rng.normal(size=(K, HIDDEN)),
        "down.w": rng.normal(size=(HIDDEN, K)),
        "gamma": 1.0 + 0.1 * rng.normal(size=K),
    }
    nodes = [
        helper.make_node("SimplifiedLayerNormalization", ["x", "gamma"], ["h"], name="norm", axis=-1, epsilon=1e-6),
        helper.make_node("MatMul", ["h", "q.w"], ["q"], name="q_proj"),
        helper.make_node("MatMul", ["h", "gate.w"], ["g"], name="gate_proj"),
        helper.make_node("MatMul", ["h", "up.w"], ["u"], name="up_proj"),
        helper.make_node("Sigmoid", ["g"], ["sig"], name="sigmoid"),  # SiLU as the builder writes it
        helper.make_node("Mul", ["g", "sig"], ["act"], name="silu"),
        helper.make_node("Mul", ["act", "u"], ["m"], name="mul"),
        helper.make_node("MatMul", ["m", "down.w"], ["d"], name="down_proj"),
    ]
    outputs = ["q", "d"]
    if tied_head:
        weights.update({"head.w": rng.normal(size=(K, 40)), "gamma2": np.ones(K)})
        nodes += [
            helper.make_node("SimplifiedLayerNormalization", ["d", "gamma2"], ["f"], name="final", axis=-1),
            helper.make_node("MatMul", ["f", "head.w"], ["logits"], name="lm_head"),
            helper.make_node("Transpose", ["head.w"], ["table"], name="tied"),
        ]
        outputs += ["logits", "table"]
    graph = helper.make_graph(
        nodes,
        "slice",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", K])],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs],
        [numpy_helper.from_array(v.astype(np.float32), k) for k, v in weights.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _run_float(proto, x: np.ndarray) -> list[np.ndarray]:
    import onnxruntime as ort

    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})


def _int4(proto) -> onnx.ModelProto:
    """ONNX Runtime's round-to-nearest MatMulNBits, as weight_only.write() runs it for rtn and awq."""
    config = SimpleNamespace(algorithm="rtn", block_size=BLOCK, symmetric=True, accuracy_level=None)
    copy = onnx.ModelProto.FromString(proto.SerializeToString())
    return _run(copy, _algo(config, 4, ("MatMul",)), set(), SimpleNamespace(step_name="t"))


def test_awq_groups_fold_exactly_and_its_scales_lower_the_int4_error_on_outlier_channels():
    rng = np.random.default_rng(0)
    proto = _slice(rng)
    names = {"q_proj", "gate_proj", "up_proj", "down_proj"}
    groups, skipped = awq.find_groups(proto, names)
    assert not skipped
    assert [(sorted(m.name for m in g.matmuls), g.fold_kind, g.fold_into) for g in groups] == [
        (["down_proj"], "columns", "up.w"),  # 1/s into up_proj's output columns, searched first
        (["gate_proj", "q_proj", "up_proj"], "gamma", "gamma"),
    ]
    calib = _inputs(rng, 512)
    fresh = _inputs(rng, 512)
    reference = _run_float(proto, fresh)
    scaled = onnx.ModelProto.FromString(proto.SerializeToString())
    rtn_error, awq_error = [], []
    for group in groups:
        h = _run_float(_with_output(scaled, group.source), calib)[-1]
        weight = np.concatenate([_weight(scaled, m.input[1]) for m in group.int4], axis=1)
        s, alpha, rtn, err = awq.search_scale(np.abs(h).mean(0), h, weight, BLOCK, True)
        assert s is not None and alpha is not None and err < rtn
        awq.fold(scaled, group, s)
    # the float graph computes what it did: no op added, 1/s folded into gamma and up_proj's columns
    assert [n.op_type for n in scaled.graph.node] == [n.op_type for n in proto.graph.node]
    for before, after in zip(reference, _run_float(scaled, fresh), strict=True):
        np.testing.assert_allclose(after, before, rtol=1e-5, atol=1e-5 * float(np.abs(before).max()))
    # and once written by ORT's MatMulNBits, its outputs on unseen inputs are closer to the float ones than RTN's
    for ref, plain, aware in zip(
        reference, _run_float(_int4(proto), fresh), _run_float(_int4(scaled), fresh), strict=True
    ):
        rtn_error.append(float(np.mean((plain - ref) ** 2)))
        awq_error.append(float(np.mean((aware - ref) ** 2)))
    assert all(a < 0.8 * r for a, r in zip(awq_error, rtn_error, strict=True)), (awq_error, rtn_error)


@pytest.mark.parametrize("from_file", [False, True])  # True: as a graph past 2 GB is read, from external data
def test_awq_apply_records_each_group_and_clips_only_where_it_helps(tmp_path, monkeypatch, from_file):
    if from_file:
        monkeypatch.setattr("optcli.artifact.ONNX_EXTERNAL_THRESHOLD", 0)
    rng = np.random.default_rng(1)
    proto = _slice(rng)
    calibration = [{"x": _inputs(rng, 128)} for _ in range(4)]
    record = awq.apply(proto, {"q_proj", "gate_proj", "up_proj", "down_proj"}, calibration, BLOCK, True, tmp_path)
    assert record["windows"] == 4 and record["rows"] == 512 and not record["skipped"]
    for group in record["groups"]:
        assert group["error_awq"] <= group["error_rtn"]
        for clip in group["clip"].values():
            assert 0.5 < clip["mean_ratio"] <= 1 and clip["block_error_after"] <= clip["block_error_before"]
    # no attention op reads q_proj here: what is left unclipped is decided by the graph, not by names
    assert set(record["groups"][1]["clip"]) == {"q_proj", "gate_proj", "up_proj"}


def test_a_head_whose_weight_the_embedding_table_also_reads_is_left_alone():
    rng = np.random.default_rng(2)
    proto = _slice(rng, tied_head=True)
    groups, skipped = awq.find_groups(proto, {"q_proj", "gate_proj", "up_proj", "down_proj", "lm_head"})
    assert "lm_head" not in {m.name for g in groups for m in g.matmuls}
    assert "tied lm_head" in skipped["lm_head"]


@pytest.mark.parametrize("symmetric", [True, False])
def test_the_search_quantizes_exactly_as_matmulnbits_does(symmetric):
    rng = np.random.default_rng(3)
    weight = rng.normal(size=(80, 24)).astype(np.float32)  # 80: a block padded, as ORT pads it
    x = rng.normal(size=(8, 80)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
        "one",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [8, 80])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [8, 24])],
        [numpy_helper.from_array(weight, "w")],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    config = SimpleNamespace(algorithm="rtn", block_size=BLOCK, symmetric=symmetric, accuracy_level=None)
    written = _run(proto, _algo(config, 4, ("MatMul",)), set(), SimpleNamespace(step_name="t"))
    (y,) = _run_float(written, x)
    np.testing.assert_allclose(y, x @ awq.qdq(weight, BLOCK, symmetric), atol=1e-5)


def _with_output(proto, name: str):
    copy = onnx.ModelProto.FromString(proto.SerializeToString())
    copy.graph.output.append(helper.make_empty_tensor_value_info(name))
    return copy


def _weight(proto, name: str) -> np.ndarray:
    return next(numpy_helper.to_array(t) for t in proto.graph.initializer if t.name == name)
