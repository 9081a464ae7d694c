"""int4 / int8 weight-only quantization (MatMulNBits, GatherBlockQuantized) on a small transformer encoder."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from conftest import EXPORT, run_cli, write_recipe


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    from models import build_encoder

    folder = tmp_path_factory.mktemp("encoder_w4")
    torch.save(build_encoder(dim=64).state_dict(), folder / "encoder.pt")
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 100, size=(32, 16)).astype(np.int64)
    np.savez(folder / "tokens.npz", input_ids=ids, attention_mask=np.ones_like(ids))
    return folder


def _recipe(folder, quantize: dict) -> dict:
    return {
        "model": {
            "path": str(folder / "encoder.pt"),
            "factory": "models:build_encoder",
            "factory_kwargs": {"dim": 64},
            "inputs": [
                {"name": "input_ids", "shape": [1, 16], "dtype": "int64"},
                {"name": "attention_mask", "shape": [1, 16], "dtype": "int64"},
            ],
        },
        "data": {"eval": {"path": str(folder / "tokens.npz")}},
        "passes": [EXPORT, {"type": "quantize", **quantize}],
        "report": {"latency": {"batch_sizes": [4], "warmup": 1, "runs": 3, "threads": 1}},
    }


def _ops(path) -> dict:
    counts: dict = {}
    for node in onnx.load(str(path)).graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def test_int4_weight_only_quantizes_matmul_and_gather_and_shrinks_the_file(encoder, tmp_path):
    recipe = _recipe(encoder, {"weights": "int4", "block_size": 32, "symmetric": True})
    result = run_cli("run", write_recipe(tmp_path, recipe), "-o", tmp_path / "out", "--json")
    assert result.exit_code == 0, result.stderr
    report = result.json()
    export, final = report["steps"][-2], report["steps"][-1]
    ops = _ops(tmp_path / "out" / "model.onnx")  # counted on the written file, not taken from the report
    assert ops.get("MatMulNBits", 0) >= 8 and ops.get("GatherBlockQuantized") == 1
    assert "MatMul" not in ops or ops["MatMul"] < _ops(tmp_path / "out" / "steps" / "1-export" / "model.onnx")["MatMul"]
    assert final["size_bytes"] < 0.5 * export["size_bytes"]
    assert final["fidelity"]["cosine_mean"] > 0.97
    details = final["details"]["weight_only"]
    assert details["quantized_ops"]["MatMulNBits"] == ops["MatMulNBits"]
    assert details["weight_bytes_after"]["scales"] > 0 and details["weight_bytes_after"]["zero_points"] == 0
    # Packed int4 bytes hold two weights each: the model's weights are counted, not its bytes.
    assert final["parameters"] == export["parameters"]
    shown = run_cli("inspect", tmp_path / "out" / "model.onnx", "--json").json()
    assert shown["summary"].startswith(f"weight-only blockwise: {ops['MatMulNBits']} int4 MatMulNBits")


def test_int8_weight_only_is_closer_than_int4(encoder, tmp_path):
    cos = {}
    for weights in ("int4", "int8"):
        recipe = _recipe(encoder, {"weights": weights, "block_size": 32})
        result = run_cli("run", write_recipe(tmp_path, recipe, f"{weights}.yaml"), "-o", tmp_path / weights, "--json")
        assert result.exit_code == 0, result.stderr
        cos[weights] = result.json()["steps"][-1]["fidelity"]["cosine_mean"]
        assert _ops(tmp_path / weights / "model.onnx").get("MatMulNBits", 0) > 0
    assert cos["int8"] > cos["int4"] and cos["int8"] > 0.999


@pytest.mark.parametrize(
    "quantize, words",
    [
        ({"weights": "int4", "mode": "static"}, "weight-only"),
        ({"block_size": 32}, "add weights: int4"),
        ({"weights": "int8", "algorithm": "hqq"}, "int4 only"),
        ({"weights": "int4", "algorithm": "awq"}, "awq calibrates on a decoder's text"),
        ({"weights": "int4", "op_types": ["Conv"]}, "MatMul and Gather only"),
        ({"weights": "int4", "ratio": 0.8, "target": {"min_value": 0.99}}, "ratio or target"),
        ({"weights": "int4", "search": {"modes": ["static"]}}, "belongs to the int8 search"),
        ({"weights": "int8", "ratio": 0.5}, "mixes nothing"),
    ],
)
def test_weight_only_refuses_incompatible_options_at_load(encoder, tmp_path, quantize, words):
    result = run_cli("validate", write_recipe(tmp_path, _recipe(encoder, quantize)))
    assert result.exit_code == 2
    assert words in result.stderr and "Traceback" not in result.stderr


def test_int4_on_an_opset_17_graph_with_reducel2_converts_the_opset_and_runs(tmp_path):
    """ORT's quantizer only renumbers the opset to 21 for int4 Gather; an opset-17 ReduceL2 (axes attribute, a
    sentence embedding's normalisation) then fails to load. optcli converts the graph first."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    table = numpy_helper.from_array(rng.standard_normal((128, 64)).astype(np.float32), "table")
    w = numpy_helper.from_array(rng.standard_normal((64, 64)).astype(np.float32), "w")
    nodes = [
        helper.make_node("Gather", ["table", "ids"], ["e"], name="embed"),
        helper.make_node("MatMul", ["e", "w"], ["h"], name="proj"),
        helper.make_node("ReduceL2", ["h"], ["n"], name="norm", axes=[-1], keepdims=1),
        helper.make_node("Div", ["h", "n"], ["y"], name="normalize"),
    ]
    graph = helper.make_graph(
        nodes,
        "embed_normalize",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["b", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 8, 64])],
        [table, w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(tmp_path / "m.onnx"))
    recipe = {
        "model": {"path": str(tmp_path / "m.onnx"), "inputs": [{"name": "ids", "shape": [4, 8], "dtype": "int64"}]},
        "passes": [{"type": "quantize", "weights": "int4", "block_size": 32}],
        "report": {"latency": {"batch_sizes": [4], "warmup": 1, "runs": 3, "threads": 1}},
    }
    result = run_cli("run", write_recipe(tmp_path, recipe), "-o", tmp_path / "out", "--json", "--quiet")
    assert result.exit_code == 0, result.stderr
    written = onnx.load(str(tmp_path / "out" / "model.onnx"))
    onnx.checker.check_model(written)
    ops = _ops(tmp_path / "out" / "model.onnx")
    assert ops.get("GatherBlockQuantized") == 1 and ops.get("MatMulNBits") == 1
    assert result.json()["steps"][-1]["details"]["weight_only"]["opset"] == {"from": 17, "to": 21}
    assert result.json()["steps"][-1]["fidelity"]["cosine_mean"] > 0.97


def _bits_by_node(path) -> dict[str, int]:
    return {
        n.name: next(a.i for a in n.attribute if a.name == "bits")
        for n in onnx.load(str(path)).graph.node
        if n.op_type == "MatMulNBits"
    }


def test_ratio_keeps_the_most_sensitive_matmuls_in_int8_and_gets_closer_than_all_int4(encoder, tmp_path):
    runs = {}
    for name, extra in (("all", {}), ("half", {"ratio": 0.5})):
        recipe = _recipe(encoder, {"weights": "int4", "block_size": 32, **extra})
        result = run_cli("run", write_recipe(tmp_path, recipe, f"{name}.yaml"), "-o", tmp_path / name, "--json")
        assert result.exit_code == 0, result.stderr
        runs[name] = result.json()["steps"][-1]
    bits = _bits_by_node(tmp_path / "half" / "model.onnx")
    mixed = runs["half"]["details"]["weight_only"]["mixed"]
    # The backup nodes named in the report are the ones written with 8 bits (ORT names them node + "_Q8").
    assert {n for n, b in bits.items() if b == 8} == {f"{n}_Q8" for n in mixed["backup_nodes"]}
    assert 0 < len(mixed["backup_nodes"]) < mixed["matmuls"] and mixed["low_bit_share"] <= 0.5
    assert set(mixed["sensitivity"]) >= set(mixed["backup_nodes"])
    assert set(_bits_by_node(tmp_path / "all" / "model.onnx").values()) == {4}
    # int8 blocks never longer than the layer (a 64-deep weight in blocks of 128 would be half padding)
    for node in onnx.load(str(tmp_path / "half" / "model.onnx")).graph.node:
        attrs = {a.name: a.i for a in node.attribute}
        if node.op_type == "MatMulNBits":
            assert attrs["block_size"] <= attrs["K"], node.name
    assert runs["half"]["fidelity"]["cosine_mean"] > runs["all"]["fidelity"]["cosine_mean"]
    assert runs["all"]["size_bytes"] < runs["half"]["size_bytes"]


def test_target_finds_the_fewest_int8_matmuls_that_meet_it(encoder, tmp_path):
    cos, matmuls = {}, {"block_size": 32, "op_types": ["MatMul"]}  # embeddings float: all-int8 is reachable
    for weights in ("int4", "int8"):
        recipe = _recipe(encoder, {"weights": weights, **matmuls})
        result = run_cli("run", write_recipe(tmp_path, recipe, f"{weights}.yaml"), "-o", tmp_path / weights, "--json")
        cos[weights] = result.json()["steps"][-1]["fidelity"]["cosine_mean"]
    goal = round((cos["int4"] + cos["int8"]) / 2, 6)  # between all-int4 (misses) and all-int8 (meets)
    recipe = _recipe(encoder, {"weights": "int4", **matmuls, "target": {"metric": "cosine", "min_value": goal}})
    result = run_cli("run", write_recipe(tmp_path, recipe), "-o", tmp_path / "out", "--json")
    assert result.exit_code == 0, result.stderr
    step = result.json()["steps"][-1]
    search = step["details"]["search"]
    rows = {r["config"]["promoted"]: r for r in search["candidates"]}
    (chosen,) = [k for k, r in rows.items() if r["chosen"]]
    assert rows[chosen]["meets_target"] and rows[chosen]["metric"] >= goal
    assert chosen > 0 and not rows[chosen - 1]["meets_target"]  # one fewer promoted layer misses the target
    assert sum(b == 8 for b in _bits_by_node(tmp_path / "out" / "model.onnx").values()) == chosen
    assert step["fidelity"]["cosine_mean"] >= goal - 1e-6  # measured again by the report on the written file
    assert "mixes tried" in (tmp_path / "out" / "report.md").read_text()
