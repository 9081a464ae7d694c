"""Latency-aware int8: regions that ONNX Runtime runs slower in int8 than in fp32 stay fp32, or the gate says why.

The costs come from ONNX Runtime's profiler in real runs; here they are injected (a fixed cost model of the written
graph), so each decision is checked against figures the test itself set, never against a clock.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import yaml
from conftest import run_cli, write_recipe
from onnx import TensorProto, helper, numpy_helper

from optcli.abtest import Ratio
from optcli.passes.quantize import profile as prof
from optcli.passes.quantize import search
from optcli.passes.quantize.search import evaluation


def conv(name, x, y, cin, cout, k, rng):
    w = numpy_helper.from_array(
        (rng.standard_normal((cout, cin, k, k)) * (1.0 / np.sqrt(cin * k * k))).astype(np.float32), f"{name}.w"
    )
    b = numpy_helper.from_array(np.zeros(cout, np.float32), f"{name}.b")
    node = helper.make_node("Conv", [x, w.name, b.name], [y], name=name, pads=[k // 2] * 4)
    return node, [w, b]


def hardswish_cnn(path, big: bool, width: int = 4) -> None:
    """x -> [Conv A 3x3 -> Relu -> Conv B 3x3 -> Relu] -> small 1x1 convs (`width` channels), each between HardSwish
    ops -> pooled output."""
    rng = np.random.default_rng(0)
    nodes, inits, cur, ch = [], [], "x", 8
    if big:
        for name in ("A", "B"):
            n, w = conv(name, cur, f"{name}_out", ch, 32, 3, rng)
            nodes += [n, helper.make_node("Relu", [f"{name}_out"], [f"{name}_act"], name=f"{name}_relu")]
            inits += w
            cur, ch = f"{name}_act", 32
    for name in ("C", "D", "E"):
        n, w = conv(name, cur, f"{name}_out", ch, width, 1, rng)
        nodes += [n, helper.make_node("HardSwish", [f"{name}_out"], [f"{name}_hs"], name=f"{name}_hardswish")]
        inits += w
        cur, ch = f"{name}_hs", width
    nodes += [
        helper.make_node("GlobalAveragePool", [cur], ["pooled"], name="pool"),
        helper.make_node("Flatten", ["pooled"], ["y"], name="flatten"),
    ]
    graph = helper.make_graph(
        nodes,
        "hardswish_cnn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, width])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def injected_profile(path, feeds, threads, runs=10, warmup=2):
    """A fixed cost model of the written graph: a Conv costs its weight size, 4x less when it runs in int8 (input and
    weight both dequantized: what ONNX Runtime fuses into QLinearConv); each activation Quantize/Dequantize costs
    0.02 ms (what the islands around HardSwish cost on a real CPU)."""
    graph = onnx.load(str(path)).graph
    inits = {t.name: t for t in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    node_ms, node_op = {}, {}
    for n in graph.node:
        if n.op_type == "Conv":
            size = float(np.prod(inits[n.input[1]].dims)) if n.input[1] in inits else 1000.0
            int8 = _runs_int8(n, producer)
            ms = size * 1e-4 * (0.25 if int8 else 1.0)
        elif n.op_type in ("QuantizeLinear", "DequantizeLinear"):
            ms = 0.0 if n.input[0] in inits else 0.02  # weight DQs are folded by the session
        else:
            ms = 0.001
        node_ms[n.name], node_op[n.name] = ms, n.op_type
    return prof.Profile(node_ms, node_op, {})


@pytest.fixture
def injected(monkeypatch):
    monkeypatch.setattr(prof, "profile", injected_profile)
    # The latency a trial is judged by: the same cost model, so which candidate is fastest is fixed by the test.
    monkeypatch.setattr(
        evaluation, "time_p50", lambda path, ev, runner=None: injected_profile(path, None, 1).total_ms()
    )
    # And the side-by-side int8/fp32 ratio the "int8 faster than fp32" gate decides on (no noise: a point interval).
    monkeypatch.setattr(search, "time_ratio", injected_ratio)
    # And the race between candidates too close in p50 to rank: the same cost model, side by side.
    monkeypatch.setattr(search, "race_ratios", lambda fp32, paths, ev: [injected_ratio(fp32, p, ev) for p in paths])


def injected_ratio(fp32, int8, ev):
    value = injected_profile(int8, None, 1).total_ms() / injected_profile(fp32, None, 1).total_ms()
    return Ratio(value, value, value, 5, 1)


def _recipe(folder, **quantize) -> dict:
    rng = np.random.default_rng(1)
    np.savez(folder / "calib.npz", x=rng.standard_normal((16, 8, 16, 16)).astype(np.float32))
    np.savez(folder / "eval.npz", x=rng.standard_normal((16, 8, 16, 16)).astype(np.float32))
    return {
        "model": {"path": str(folder / "model.onnx")},
        "data": {
            "calibration": {"path": str(folder / "calib.npz"), "samples": 16},
            "eval": {"path": str(folder / "eval.npz")},
        },
        "passes": [{"type": "quantize", "target": {"metric": "cosine", "min_value": 0.9}, **quantize}],
        "report": {"latency": {"batch_sizes": [1], "warmup": 1, "runs": 3, "threads": 1}},
    }


def _runs_int8(node, producer) -> bool:
    return all(i in producer and producer[i].op_type == "DequantizeLinear" for i in node.input[:2])


def _int8_convs(path) -> set[str]:
    graph = onnx.load(str(path)).graph
    producer = {o: n for n in graph.node for o in n.output}
    return {n.name for n in graph.node if n.op_type == "Conv" and _runs_int8(n, producer)}


def _quantized_tensors(path) -> set[str]:
    return {n.input[0] for n in onnx.load(str(path)).graph.node if n.op_type == "QuantizeLinear"}


def test_convs_between_hardswish_ops_that_are_slower_in_int8_stay_fp32(tmp_path, injected):
    hardswish_cnn(tmp_path / "model.onnx", big=True)
    recipe = write_recipe(tmp_path, _recipe(tmp_path))
    result = run_cli("run", recipe, "-o", tmp_path / "out", "--json", "--quiet")
    assert result.exit_code == 0, result.stderr
    step = result.json()["steps"][-1]
    found = step["details"]["search"]
    assert "latency-fallback" in found["chosen"]
    assert _int8_convs(tmp_path / "out" / "model.onnx") == {"A", "B"}
    # Kept fp32 as whole regions: no Q/DQ island is left around the activations of C, D, E.
    assert not _quantized_tensors(tmp_path / "out" / "model.onnx") & {"C_out", "C_hs", "D_out", "D_hs", "E_out"}
    fallen = {n["node"]: n for n in found["latency_fallback_nodes"]}
    assert set(fallen) >= {"C", "D", "E"}
    # The figures the decision was made on: each of those regions cost more in int8 than in fp32.
    assert all(fallen[n]["int8_ms"] > fallen[n]["fp32_ms"] for n in ("C", "D", "E"))
    table = {row["op_type"]: row for row in found["profile"]["op_types"]}
    assert table["Conv"]["quantized"] == 2 and table["Conv"]["fp32"] == 3
    assert "slower in int8" in table["Conv"]["why"]
    regions = {r["node"]: r for r in found["profile"]["regions"]}
    assert {n for n, r in regions.items() if r["int8"]} == {"A", "B"}
    # Every report view shows the per-op-type table with the reason.
    for view in ("report.md", "report.html"):
        text = (tmp_path / "out" / view).read_text()
        assert "int8 per op type" in text and "slower in int8 here (profile)" in text


def test_int8_that_never_pays_fails_the_gate_with_the_figures_unless_allowed(tmp_path, injected):
    # Weights just above the "nothing to quantize" floor (256 elements), still too small for int8 to pay here.
    hardswish_cnn(tmp_path / "model.onnx", big=False, width=24)
    recipe = write_recipe(tmp_path, _recipe(tmp_path))
    result = run_cli("run", recipe, "-o", tmp_path / "out", "--json", "--quiet")
    assert result.exit_code == 1, result.stderr
    report = result.json()
    gate = next(g for g in report["gates"] if g["name"].endswith("int8 faster than fp32"))
    assert gate["passed"] is False and gate["value"] >= gate["limit"]
    assert "not faster than fp32" in gate["note"] and "ms" in gate["note"]
    assert any("int8 does not pay for this model" in n for n in report["steps"][-1]["details"]["search"]["notes"])
    # Weights this small do not shrink in int8 either (Q/DQ scales outweigh them), so the default size gate would
    # rightly fail the allowed run too: it is turned off here to check allow_slower alone.
    allowed = write_recipe(tmp_path, {**_recipe(tmp_path, allow_slower=True), "gates": {}}, "allowed.yaml")
    assert run_cli("run", allowed, "-o", tmp_path / "out2", "--json", "--quiet").exit_code == 0
    assert _int8_convs(tmp_path / "out2" / "model.onnx"), "allow_slower keeps an int8 model, not fp32 with Q/DQ"


def test_dynamic_int8_is_not_tried_on_convs_and_the_report_says_why(tmp_path, injected):
    hardswish_cnn(tmp_path / "model.onnx", big=True)
    recipe = write_recipe(tmp_path, _recipe(tmp_path))
    result = run_cli("run", recipe, "-o", tmp_path / "out", "--json", "--quiet")
    found = result.json()["steps"][-1]["details"]["search"]
    assert all(c["config"]["mode"] != "dynamic" for c in found["candidates"])
    assert any("ConvInteger" in note for note in found["notes"])


def test_init_for_a_cnn_writes_the_latency_aware_search(tmp_path):
    hardswish_cnn(tmp_path / "model.onnx", big=True)
    # No data: the search needs calibration inputs, so the recipe is dynamic int8 that runs as written (issue 21).
    result = run_cli("init", tmp_path / "model.onnx")
    assert result.exit_code == 0, result.stderr
    assert yaml.safe_load(result.stdout)["passes"][-1] == {"type": "quantize", "mode": "dynamic", "per_channel": True}
    (tmp_path / "r.yaml").write_text(result.stdout)
    assert run_cli("validate", tmp_path / "r.yaml").exit_code == 0
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "real.npz", x=rng.standard_normal((8, 8, 16, 16)).astype(np.float32))
    with_data = run_cli("init", tmp_path / "model.onnx", "--data", tmp_path / "real.npz")
    recipe = yaml.safe_load(with_data.stdout)
    quantize = recipe["passes"][-1]
    assert quantize["type"] == "quantize" and quantize["target"]["metric"] == "cosine" and "mode" not in quantize
    (tmp_path / "r2.yaml").write_text(with_data.stdout)
    assert run_cli("validate", tmp_path / "r2.yaml").exit_code == 0


def test_the_real_profiler_charges_fused_int8_kernels_to_their_conv(tmp_path):
    """ORT renames what it fuses (QLinearConv 'A_token_3', NCHWc 'A_out_nchwc'); each kernel must land in its region."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    hardswish_cnn(tmp_path / "model.onnx", big=True)
    rng = np.random.default_rng(0)
    batches = [{"x": rng.standard_normal((1, 8, 16, 16)).astype(np.float32)} for _ in range(4)]

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(batches)

        def get_next(self):
            return next(self.it, None)

    quantize_static(
        str(tmp_path / "model.onnx"),
        str(tmp_path / "int8.onnx"),
        Reader(),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QUInt8,
        op_types_to_quantize=["Conv"],
    )
    measured = prof.profile(tmp_path / "int8.onnx", batches[0], threads=1, runs=2)
    fused = [name for name, op in measured.node_op.items() if op == "QLinearConv"]
    assert fused and measured.session_ops.get("QLinearConv") == len(fused)
    regions = prof.Regions(tmp_path / "int8.onnx")
    assert {regions.resolve(name) for name in fused} == {"A", "B", "C", "D", "E"}
    fp32 = prof.profile(tmp_path / "model.onnx", batches[0], threads=1, runs=2)
    comparison = prof.compare(tmp_path / "model.onnx", fp32, tmp_path / "int8.onnx", measured)
    assert {r["node"] for r in comparison.rows} == {"A", "B", "C", "D", "E"}


def test_a_cnn_target_without_calibration_data_is_refused_before_any_work(tmp_path):
    hardswish_cnn(tmp_path / "model.onnx", big=True)
    recipe = _recipe(tmp_path)
    del recipe["data"]["calibration"]
    result = run_cli("run", write_recipe(tmp_path, recipe), "-o", tmp_path / "out")
    assert result.exit_code == 2 and "data.calibration" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "out" / "model.onnx").exists()
