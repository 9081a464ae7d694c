"""The shared read-only ONNX graph view: what it reports about a graph, that it parses a file once per version,
that it never reads external weights, that a caller changing a model works on its own copy, and the checked save."""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from optcli.onnxgraph import checked_save, graph_view, load_model


def small_model() -> onnx.ModelProto:
    """x -> MatMul(W) -> Add(Cast(b)) -> Relu -> y, opset 17; W an 8x4 float32 weight, b a float16 bias."""
    w = numpy_helper.from_array(np.ones((8, 4), np.float32), "W")
    b = numpy_helper.from_array(np.zeros(4, np.float16), "b")
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["h"], name="mm"),
        helper.make_node("Cast", ["b"], ["b32"], to=TensorProto.FLOAT, name="cast"),
        helper.make_node("Add", ["h", "b32"], ["z"], name="add"),
        helper.make_node("Relu", ["z"], ["y"], name="relu"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        [w, b],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def settled(path):
    """Back-date the file so the view may cache it (a file changed within the last second is always re-read)."""
    os.utime(path, ns=(1_000_000_000_000_000_000, 1_000_000_000_000_000_000))
    return path


def test_view_lists_nodes_by_op_producers_consumers_initializers_opset_and_io(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(small_model(), str(path))
    view = graph_view(path)
    assert view.opset == 17 and view.inputs == ("x",) and view.outputs == ("y",)
    assert [n.name for n in view.by_op("MatMul")] == ["mm"] and view.by_op("Conv") == []
    assert [n.name for n in view.by_op("Add", "Relu")] == ["add", "relu"]
    assert view.op_counts() == {"MatMul": 1, "Cast": 1, "Add": 1, "Relu": 1}
    assert view.producer("z").name == "add" and view.producer("x") is None and view.producer("W") is None
    assert [n.name for n in view.consumers("h")] == ["add"] and view.consumers("y") == []
    assert view.initializers["W"].shape == (8, 4) and view.initializers["W"].dtype == TensorProto.FLOAT
    assert view.initializers["b"].dtype == TensorProto.FLOAT16 and not view.initializers["W"].external


def test_an_unchanged_file_is_parsed_once_and_a_rewritten_one_again(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(small_model(), str(path))
    settled(path)
    first = graph_view(path)
    assert graph_view(path) is first and graph_view(str(path)) is first
    changed = small_model()
    changed.graph.node[3].op_type = "Sigmoid"
    onnx.save(changed, str(path))  # a fresh mtime: read again at once, whatever the clock's granularity
    assert graph_view(path).op_counts().get("Sigmoid") == 1 and first.op_counts().get("Relu") == 1
    settled(path)
    assert graph_view(path).op_counts().get("Sigmoid") == 1


def test_external_weights_are_not_read_shapes_and_dtypes_still_are(tmp_path):
    path = tmp_path / "big.onnx"
    onnx.save(small_model(), str(path), save_as_external_data=True, location="big.onnx.data", size_threshold=0)
    (tmp_path / "big.onnx.data").unlink()  # the view must not need the weights' bytes
    view = graph_view(path)
    assert view.initializers["W"].shape == (8, 4) and view.initializers["W"].external


def test_a_caller_changing_its_copy_never_changes_the_shared_view(tmp_path):
    path = settled_save(tmp_path)
    view = graph_view(path)
    before = view.proto.SerializeToString()
    owned = load_model(path)
    owned.graph.node[0].name = "renamed"
    del owned.graph.node[3]
    owned.graph.initializer[0].dims[0] = 99
    again = graph_view(path)
    assert again is view and again.proto.SerializeToString() == before
    assert [n.name for n in again.nodes] == ["mm", "cast", "add", "relu"] and again.initializers["W"].shape == (8, 4)
    assert numpy_helper.to_array(owned.graph.initializer[1]).shape == (4,)  # the copy has the weights


def test_a_cached_view_holds_the_graph_not_the_weights(tmp_path):
    view = graph_view(settled_save(tmp_path))
    assert all(not t.raw_data and not t.float_data for t in view.proto.graph.initializer)
    assert [tuple(t.dims) for t in view.proto.graph.initializer] == [(8, 4), (4,)]


def test_weight_only_preparation_names_nodes_on_its_own_copy(tmp_path):
    """weight_only.prepared names unnamed nodes (an edit): the shared view of its input keeps them unnamed."""
    from types import SimpleNamespace

    from optcli.passes.quantize.weight_only import prepared

    model = small_model()
    for node in model.graph.node:
        node.name = ""
    path = tmp_path / "unnamed.onnx"
    onnx.save(model, str(path))
    settled(path)
    view = graph_view(path)
    config = SimpleNamespace(op_types=["MatMul"], algorithm="rtn", embeddings=None)
    proto, _, _ = prepared(path, config, SimpleNamespace(warn=lambda m: None))
    assert all(n.name for n in proto.graph.node)
    assert graph_view(path) is view and not any(n.name for n in view.proto.graph.node)


def settled_save(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(small_model(), str(path))
    return settled(path)


def test_checked_save_writes_a_valid_model_and_leaves_nothing_of_an_invalid_one(tmp_path):
    good = checked_save(small_model(), tmp_path / "good.onnx")
    assert graph_view(good).op_counts()["MatMul"] == 1
    broken = small_model()
    broken.graph.node[2].input[1] = "missing"  # an input nothing produces
    with pytest.raises(onnx.checker.ValidationError):
        checked_save(broken, tmp_path / "broken.onnx")
    assert not (tmp_path / "broken.onnx").exists()
