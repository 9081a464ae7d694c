"""Fidelity over every output, each judged in its own terms: class scores by top-1 agreement, sequences per
position, a probability or a regression by its error, a second output (a recurrent state) seen too."""

from __future__ import annotations

import numpy as np
import pytest

# --------------------------------------------------------------------------- the CLI on small ONNX models


RNG = np.random.default_rng(0)


def _probability_model(folder, with_state: bool = False):
    """x -> relu(x W1) -> d = h (w + δ) - h w -> p = sigmoid(k d), optionally a second output `state` = h W3.
    d is a small difference of two large dot products: int8 weights and activations move it by about its own
    size, so the probability moves by tenths while every 1-element row keeps cosine 1."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(1)
    d, h = 32, 128
    w1 = rng.normal(0, 0.3, (d, h)).astype(np.float32)
    base = rng.normal(0, 0.5, (h, 1)).astype(np.float32)
    w2 = np.concatenate([base + rng.normal(0, 0.005, (h, 1)).astype(np.float32), base], axis=1)
    x = rng.normal(size=(256, d)).astype(np.float32)
    hidden = np.maximum(x @ w1, 0)
    diff = hidden @ w2[:, 0] - hidden @ w2[:, 1]
    k = np.float32(2.0 / diff.std())  # the probability spans most of (0, 1) on these inputs
    inits = [
        numpy_helper.from_array(w1, "w1"),
        numpy_helper.from_array(w2, "w2"),
        numpy_helper.from_array(np.array([[1.0], [-1.0]], np.float32) * k, "w_diff"),
        numpy_helper.from_array(rng.normal(0, 0.3, (h, 24)).astype(np.float32), "w3"),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["a"]),
        helper.make_node("Relu", ["a"], ["hidden"]),
        helper.make_node("MatMul", ["hidden", "w2"], ["two"]),
        helper.make_node("MatMul", ["two", "w_diff"], ["z"]),
        helper.make_node("Sigmoid", ["z"], ["p"]),
        helper.make_node("MatMul", ["hidden", "w3"], ["state"]),
    ]
    outputs = [helper.make_tensor_value_info("p", TensorProto.FLOAT, ["batch", 1])]
    if with_state:
        outputs.append(helper.make_tensor_value_info("state", TensorProto.FLOAT, ["batch", 24]))
    graph = helper.make_graph(
        nodes, "probability", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", d])], outputs, inits
    )
    path = folder / "probability.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    np.savez(folder / "x.npz", x=x)
    return path


def _run(folder, model, **extra):
    from tests.conftest import run_cli, write_recipe

    recipe = {
        "model": {"path": str(model)},
        "data": {"eval": {"path": str(folder / "x.npz"), "batch_size": 256}},  # one batch, as _outputs runs it
        "passes": [{"type": "quantize", "mode": "dynamic"}],
        "report": {"latency": {"batch_sizes": [1], "warmup": 1, "runs": 3, "threads": 1}},
        **extra,
    }
    return run_cli("run", write_recipe(folder, recipe), "-o", folder / "out", "--json", "--quiet")


def _outputs(path, x):
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in session.get_outputs()], session.run(None, {"x": x}), strict=True))


def test_int8_probability_that_moved_fails_the_default_gate_with_exit_1(tmp_path):
    model = _probability_model(tmp_path)
    result = _run(tmp_path, model)
    report = result.json()
    x = np.load(tmp_path / "x.npz")["x"]
    before, after = _outputs(model, x)["p"], _outputs(tmp_path / "out" / "model.onnx", x)["p"]
    moved = float(np.abs(before - after).max())
    assert moved > 0.2  # the model does what the test needs: int8 moves its probability
    (entry,) = report["steps"][-1]["fidelity"]["outputs"]
    assert entry["name"] == "p" and entry["kind"] == "value"
    assert entry["max_abs_error"] == pytest.approx(moved, abs=1e-6)
    gate = {g["name"]: g for g in report["gates"]}["max_value_error (default)"]
    assert not gate["passed"] and gate["value"] == pytest.approx(moved / float(before.max() - before.min()), abs=1e-5)
    assert result.exit_code == 1 and "max_value_error (default)" in result.stderr


def test_a_two_output_model_reports_and_gates_both_outputs(tmp_path):
    model = _probability_model(tmp_path, with_state=True)
    result = _run(tmp_path, model, gates={"min_fidelity_cosine": 0.5, "max_value_error": 1.0})
    report = result.json()
    fid = report["steps"][-1]["fidelity"]
    assert [(o["name"], o["kind"]) for o in fid["outputs"]] == [("p", "value"), ("state", "scores")]
    x = np.load(tmp_path / "x.npz")["x"]
    before, after = _outputs(model, x)["state"], _outputs(tmp_path / "out" / "model.onnx", x)["state"]
    cos = (before * after).sum(1) / np.linalg.norm(before, axis=1) / np.linalg.norm(after, axis=1)
    assert fid["outputs"][1]["cosine_mean"] == pytest.approx(cos.mean(), abs=1e-5)
    assert fid["outputs"][1]["top1_agreement"] == pytest.approx((before.argmax(1) == after.argmax(1)).mean())
    gates = {g["name"]: g for g in report["gates"]}
    assert gates["min_fidelity_cosine"]["value"] == fid["outputs"][1]["cosine_mean"]  # the state, not p
    assert "'state'" in gates["min_fidelity_cosine"]["note"]
    assert gates["max_value_error"]["value"] == fid["outputs"][0]["max_relative_error"]
    assert result.exit_code == 0, result.stderr
    md = (tmp_path / "out" / "report.md").read_text()
    section = md.split("fidelity per output")[1]
    assert "| p | value |" in section and "max error" in section
    assert "| state | scores |" in section and "top-1 agreement" in section
    assert "fidelity per output" in (tmp_path / "out" / "report.html").read_text()


def test_init_writes_the_gate_that_judges_the_models_outputs_and_its_run_fails_a_moved_probability(tmp_path):
    import yaml

    from tests.conftest import run_cli

    model = _probability_model(tmp_path)
    written = run_cli("init", model)
    recipe = yaml.safe_load(written.stdout)
    assert recipe["gates"] == {"max_value_error": 0.1}  # not a cosine: a 1-element row's cosine is 1
    recipe["report"]["latency"] |= {"batch_sizes": [1], "runs": 3}
    (tmp_path / "init.yaml").write_text(yaml.safe_dump(recipe))
    result = run_cli("run", tmp_path / "init.yaml", "-o", tmp_path / "out", "--json", "--quiet")
    gate = {g["name"]: g for g in result.json()["gates"]}["max_value_error"]
    (entry,) = result.json()["steps"][-1]["fidelity"]["outputs"]
    assert gate["value"] == entry["max_relative_error"] and gate["value"] > 0.1
    assert result.exit_code == 1
    classifier = yaml.safe_load(run_cli("init", _softmax_classifier(tmp_path / "classifier.onnx")).stdout)
    assert classifier["gates"] == {"min_fidelity_cosine": 0.99, "min_top1_agreement": 0.98}


def _softmax_classifier(path):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(RNG.normal(size=(16, 5)).astype(np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["logits"]), helper.make_node("Softmax", ["logits"], ["probs"])],
        "classifier",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 16])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["batch", 5])],
        [w],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


@pytest.mark.parametrize(
    ("target", "exit_code"),
    [
        ({"metric": "value_error", "max_drop": 0.1}, 0),
        ({"metric": "top1_agreement", "min_value": 0.99}, 0),
        ({"metric": "value_error", "min_value": 0.1}, 2),  # lower is better: a bound on the rise
        ({"metric": "top1_agreement", "min_value": 1.5}, 2),
    ],
)
def test_quantize_targets_accept_the_output_judgements_without_labels(tmp_path, target, exit_code):
    from tests.conftest import run_cli, write_recipe

    model = _probability_model(tmp_path)
    recipe = {
        "model": {"path": str(model)},
        "data": {"eval": {"path": str(tmp_path / "x.npz")}},
        "passes": [{"type": "quantize", "target": target}],
    }
    result = run_cli("validate", write_recipe(tmp_path, recipe))
    assert result.exit_code == exit_code, result.stderr
    if exit_code:
        assert "target" in result.stderr and len(result.stderr.strip().splitlines()) == 1
