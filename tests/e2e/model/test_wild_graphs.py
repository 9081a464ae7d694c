"""ONNX graphs as other tools export them: each trait ends in exit 0/1 (or 2 with a sentence), never 3.

Every run checks that the artifact loads in ONNX Runtime and matches the input's outputs (fidelity), and
that nothing was written outside -o: not in the working directory, not next to the input.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import yaml
from conftest import allow_slower, run_cli
from wild_graphs import (
    conv_net,
    conv_transpose,
    exp_between_matmuls,
    matmul_constants,
    neck,
    no_batch_axis,
    opset6_gemm_add,
    preview_training,
    save,
    string_input,
    weightless,
)

LATENCY = {"batch_sizes": [1], "warmup": 1, "runs": 2, "threads": 1}


def _listing(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


class Run:
    """One `optcli run` on a graph, from an empty working directory, with the folders around it watched."""

    def __init__(
        self, tmp_path: Path, proto, passes: list[dict], shape: dict | None = None, calibration=None, **recipe
    ):
        self.models = tmp_path / "models"
        self.models.mkdir()
        self.cwd = tmp_path / "cwd"
        self.cwd.mkdir()
        self.out = tmp_path / "out"
        self.model = Path(save(proto, self.models / "model.onnx"))
        body = {
            "model": {"path": str(self.model)},
            "passes": allow_slower(passes),  # these tests are about graphs, not speed
            "report": {"latency": LATENCY, "fidelity_samples": 4},
        }
        if shape:
            body["model"]["inputs"] = [{"name": k, "shape": v} for k, v in shape.items()]
        if calibration is not None:
            np.savez(self.models / "calib.npz", **calibration)
            body["data"] = {"calibration": {"path": str(self.models / "calib.npz")}}
        body.update(recipe)
        self.recipe = tmp_path / "recipe.yaml"
        self.recipe.write_text(yaml.safe_dump(body))
        self.before = _listing(self.models)

    def __call__(self, *extra: str):
        result = run_cli("run", self.recipe, "-o", self.out, "-q", *extra, cwd=self.cwd)
        assert result.exit_code != 3, result.stderr
        assert _listing(self.cwd) == set(), f"written into the working directory: {_listing(self.cwd)}"
        assert _listing(self.models) == self.before, f"written next to the input: {_listing(self.models) - self.before}"
        return result

    @property
    def report(self) -> dict:
        return json.loads((self.out / "report.json").read_text())

    def step(self, kind: str) -> dict:
        return next(s for s in self.report["steps"] if s["type"] == kind)


def _outputs(path: Path, feeds: dict) -> list[np.ndarray]:
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)


def _images(n=8, c=3, hw=16, seed=0):
    return {"x": np.random.default_rng(seed).standard_normal((n, c, hw, hw)).astype(np.float32)}


def _ops(path: Path) -> dict[str, int]:
    counts: dict[str, int] = {}
    for n in onnx.load(str(path)).graph.node:
        counts[n.op_type] = counts.get(n.op_type, 0) + 1
    return counts


def _final(run: Run) -> Path:
    return Path(run.report["output"]["path"])


def _fidelity(run: Run) -> float:
    return run.report["steps"][-1]["fidelity"]["cosine_mean"]


@pytest.mark.parametrize(
    ("graph", "integer_op"), [(lambda: conv_net(constants=True), "ConvInteger"), (matmul_constants, "MatMulInteger")]
)
def test_constant_weights_are_lifted_then_quantized(tmp_path, graph, integer_op):
    # These tests check that odd graphs load and quantize, not speed: dynamic int8 on a conv net runs ConvInteger,
    # slower than fp32, and the default speed gate would rightly fail it (allow_slower: true opts out).
    run = Run(tmp_path, graph(), [{"type": "quantize", "mode": "dynamic", "per_channel": True, "allow_slower": True}])
    result = run()
    assert result.exit_code == 0, result.stderr
    names = [s["name"] for s in run.report["steps"]]
    assert names == ["original", "1-prepare", "2-quantize"]  # preparation is a step of its own
    changes = run.step("prepare")["details"]["changes"]
    assert any("Constant nodes lifted to initializers" in c for c in changes), changes
    assert _ops(_final(run)).get(integer_op, 0) >= 1
    assert run.step("quantize")["size_bytes"] < 0.7 * run.report["steps"][0]["size_bytes"]
    assert _fidelity(run) > 0.99


def test_cast_transpose_of_a_constant_weight_is_folded(tmp_path):
    run = Run(tmp_path, matmul_constants(), [{"type": "prepare"}])
    assert run().exit_code == 0
    changes = run.step("prepare")["details"]["changes"]
    assert any("weight-only nodes folded" in c for c in changes), changes
    ops = _ops(_final(run))
    assert "Cast" not in ops and "Transpose" not in ops and "Constant" not in ops
    x = {"x": np.random.default_rng(0).standard_normal((3, 32)).astype(np.float32)}
    np.testing.assert_allclose(_outputs(_final(run), x)[0], _outputs(run.model, x)[0], rtol=1e-4, atol=1e-5)


def test_dims_symbolic_inference_cannot_merge_take_the_next_rung(tmp_path):
    """A YOLO-like neck: full pre-processing fails (and would drop sym_shape_infer_temp.onnx in the cwd)."""
    run = Run(
        tmp_path,
        neck(constants=True),
        [{"type": "quantize", "mode": "static", "per_channel": True}],
        shape={"x": [1, 3, 16, 16]},
        calibration=_images(),
    )
    result = run()
    assert result.exit_code == 0, result.stderr
    pre = run.step("prepare")["details"]["preprocess"]
    assert pre["rung"] == "no_symbolic_shape"
    assert pre["tried"][0].startswith("full:") and "symbolic shape inference" in pre["tried"][0]
    assert _ops(_final(run)).get("DequantizeLinear", 0) >= 3  # the lifted conv weights were quantized
    assert run.step("quantize")["size_bytes"] < run.report["steps"][0]["size_bytes"]
    assert _fidelity(run) > 0.99
    assert "graph changes" in (run.out / "report.md").read_text()


@pytest.mark.parametrize("opset", [11, 12])
def test_old_opset_static_per_channel_is_upgraded(tmp_path, opset):
    run = Run(
        tmp_path,
        conv_net(opset=opset),
        [{"type": "quantize", "mode": "static", "per_channel": True}],
        calibration=_images(),
    )
    result = run()
    assert result.exit_code == 0, result.stderr
    assert run.step("prepare")["details"]["opset"] == {"from": opset, "to": 13}
    final = onnx.load(str(_final(run)))
    axes = [a for n in final.graph.node if n.op_type == "DequantizeLinear" for a in n.attribute if a.name == "axis"]
    assert axes, "per-channel weights (DequantizeLinear with axis) expected after the upgrade"
    _outputs(_final(run), _images(2))
    assert _fidelity(run) > 0.99


def test_old_opset_kept_means_per_tensor_with_the_reason(tmp_path):
    run = Run(
        tmp_path,
        conv_net(opset=11),
        [{"type": "prepare", "upgrade_opset": None}, {"type": "quantize", "mode": "static", "per_channel": True}],
        calibration=_images(),
    )
    result = run()
    assert result.exit_code == 0, result.stderr
    assert "needs opset >= 13" in run.step("quantize")["details"]["per_channel_off"]
    assert any("per-tensor int8 used" in w for w in run.report["warnings"])
    _outputs(_final(run), _images(2))  # loads: no per-axis DequantizeLinear in an opset-11 graph


def test_initializers_listed_as_inputs_and_opset9(tmp_path):
    run = Run(
        tmp_path,
        conv_net(opset=9, initializers_as_inputs=True),
        [{"type": "quantize", "mode": "dynamic", "allow_slower": True}],
    )
    result = run()
    assert result.exit_code == 0, result.stderr
    details = run.step("prepare")["details"]
    assert details["opset"] == {"from": 9, "to": 13}
    assert any("initializers removed from the graph inputs" in c for c in details["changes"])
    assert [i.name for i in onnx.load(str(_final(run))).graph.input] == ["x"]
    assert _fidelity(run) > 0.99


def test_unused_custom_opset_import_stops_nothing(tmp_path):
    proto = conv_net(opset=11, extra_opsets=[("com.example.private", 1)])
    run = Run(tmp_path, proto, [{"type": "quantize", "mode": "dynamic", "per_channel": True, "allow_slower": True}])
    result = run()
    assert result.exit_code == 0, result.stderr
    changes = run.step("prepare")["details"]["changes"]
    assert "unused opset imports removed: com.example.private" in changes
    assert "opset 11 -> 13" in changes


def test_opset6_graph_is_upgraded_and_the_run_goes_on(tmp_path):
    run = Run(tmp_path, opset6_gemm_add(), [{"type": "quantize", "mode": "dynamic"}])
    result = run()
    assert result.exit_code == 0, result.stderr
    assert "upgraded to 13 in memory" in run.report["steps"][0]["engine"]  # ORT has no Gemm-6 kernel
    assert run.step("prepare")["details"]["opset"] == {"from": 6, "to": 13}
    assert _ops(_final(run)).get("MatMulInteger", 0) == 1
    assert _fidelity(run) > 0.99


def test_unfused_batchnorm_optimize_pass_is_portable_and_exact(tmp_path):
    run = Run(tmp_path, conv_net(batchnorm=True), [{"type": "optimize"}])
    result = run()
    assert result.exit_code == 0, result.stderr
    details = run.step("optimize")["details"]
    assert details["op_changes"]["BatchNormalization"] == [1, 0]  # folded into the conv
    assert details["portable"] is True
    assert all(n.domain in ("", "ai.onnx") for n in onnx.load(str(_final(run))).graph.node)
    x = _images(3)
    np.testing.assert_allclose(_outputs(_final(run), x)[0], _outputs(run.model, x)[0], rtol=1e-4, atol=1e-4)
    assert _fidelity(run) > 0.9999


def test_optimize_extended_says_it_is_onnxruntime_only(tmp_path):
    run = Run(tmp_path, conv_net(batchnorm=True), [{"type": "optimize", "level": "extended"}])
    assert run().exit_code == 0
    details = run.step("optimize")["details"]
    assert details["portable"] is False
    assert "only ONNX Runtime loads" in (run.out / "report.md").read_text()


def test_string_inputs_get_one_sentence_from_init_validate_and_run(tmp_path):
    model = tmp_path / "strings.onnx"
    save(string_input(), model)
    init = run_cli("init", model)
    assert init.exit_code == 2 and init.stdout == ""  # no recipe that validate would refuse
    line = init.stderr.strip()
    assert "\n" not in line and "string tensors" in line and "Traceback" not in line
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"model": {"path": str(model)}, "passes": [{"type": "quantize"}]}))
    for verb in (["validate", recipe], ["run", recipe, "-o", tmp_path / "out"]):
        result = run_cli(*verb)
        assert result.exit_code == 2 and "string tensors" in result.stderr, result.stderr
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_static_conv_transpose_keeps_the_broken_node_in_fp32(tmp_path):
    calib = {"x": np.random.default_rng(0).standard_normal((8, 3, 8, 8)).astype(np.float32)}
    run = Run(
        tmp_path, conv_transpose(), [{"type": "quantize", "mode": "static", "per_channel": True}], calibration=calib
    )
    result = run()
    assert result.exit_code in (0, 1), result.stderr  # 1: a default gate says int8 made this tiny graph bigger
    kept = run.step("quantize")["details"]["kept_fp32"]
    assert list(kept) == ["deconv"] and "ConvTranspose kept in fp32" in kept["deconv"]
    assert any("ConvTranspose kept in fp32" in w for w in run.report["warnings"])
    assert _ops(_final(run)).get("ConvTranspose") == 1 and _ops(_final(run)).get("DequantizeLinear", 0) >= 2
    assert _fidelity(run) > 0.99


def test_exp_between_matmuls_static(tmp_path):
    calib = {"x": np.random.default_rng(0).standard_normal((8, 32)).astype(np.float32)}
    run = Run(tmp_path, exp_between_matmuls(), [{"type": "quantize", "mode": "static"}], calibration=calib)
    result = run()
    assert result.exit_code in (0, 1), result.stderr
    _outputs(_final(run), {"x": calib["x"][:2]})
    assert _fidelity(run) > 0.98


def test_input_without_batch_axis_is_fed_whole_samples(tmp_path):
    samples = {"x": np.random.default_rng(0).standard_normal((8, 5)).astype(np.float32)}  # 8 samples of shape [5]
    run = Run(tmp_path, no_batch_axis(), [{"type": "quantize", "mode": "static"}], calibration=samples)
    result = run()
    assert result.exit_code in (0, 1), result.stderr  # 1: a default gate says int8 made this tiny graph bigger
    assert _ops(_final(run)).get("DequantizeLinear", 0) >= 1
    _outputs(_final(run), {"x": samples["x"][0]})


def test_input_without_batch_axis_and_misshaped_data_is_explained_by_validate(tmp_path):
    wrong = {"x": np.zeros((8, 4), np.float32)}
    run = Run(tmp_path, no_batch_axis(), [{"type": "quantize", "mode": "static"}], calibration=wrong)
    result = run_cli("validate", run.recipe)
    assert result.exit_code == 2
    assert "takes exactly 5 (no free batch axis)" in result.stderr and "n x 5" in result.stderr, result.stderr


def test_preview_training_ops_are_refused_in_a_sentence(tmp_path):
    run = Run(tmp_path, preview_training(), [{"type": "quantize", "mode": "dynamic"}])
    for result in (run_cli("validate", run.recipe), run()):
        assert result.exit_code == 2
        assert result.stderr.strip().startswith("error: ONNX Runtime cannot load this model: "), result.stderr
        assert "internal error" not in result.stderr


def test_weightless_graph_is_kept_not_quantized(tmp_path):
    run = Run(tmp_path, weightless(), [{"type": "quantize", "mode": "dynamic"}])
    result = run()
    assert result.exit_code == 0, result.stderr
    assert any("nothing to quantize here (no weight tensor above 256 elements)" in w for w in run.report["warnings"])
    assert _final(run).read_bytes() == run.model.read_bytes()  # the input, not a 3x bigger Q/DQ copy


def test_prepare_runs_alone_and_writes_only_inside_out(tmp_path):
    run = Run(tmp_path, neck(constants=True), [{"type": "prepare"}], shape={"x": [1, 3, 16, 16]})
    result = run()
    assert result.exit_code == 0, result.stderr
    details = run.step("prepare")["details"]
    assert any("Constant nodes lifted" in c for c in details["changes"])
    assert {p.name for p in run.out.iterdir()} >= {"model.onnx", "report.json", "report.md", "report.html"}
    assert _fidelity(run) > 0.9999


def test_optimize_with_onnxscript_first_still_matches(tmp_path):
    run = Run(tmp_path, matmul_constants(), [{"type": "optimize", "onnxscript": True}])
    assert run().exit_code == 0
    details = run.step("optimize")["details"]
    assert details["applied"] == ["onnxscript optimizer", "ONNX Runtime basic"]
    assert details["nodes"]["after"] < details["nodes"]["before"]  # the Cast/Transpose of the weight folded
    assert _fidelity(run) > 0.9999
