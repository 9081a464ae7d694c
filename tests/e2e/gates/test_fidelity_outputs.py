"""Fidelity over every output, each judged in its own terms: class scores by top-1 agreement, sequences per
position, a probability or a regression by its error, a second output (a recurrent state) seen too."""

from __future__ import annotations

import numpy as np
import pytest

from optcli.gates import fidelity_gates
from optcli.measure import fidelity, output_kind

RNG = np.random.default_rng(0)


def _failed(gates: list[dict]) -> dict:
    return {g["name"]: g for g in gates if not g["passed"]}


def _softmax(x, axis=-1):
    e = np.exp(x - x.max(axis, keepdims=True))
    return e / e.sum(axis, keepdims=True)


@pytest.mark.parametrize(
    ("array", "kind"),
    [
        (RNG.random((50, 1), dtype=np.float32), "value"),
        (RNG.random(50, dtype=np.float32), "value"),
        (_softmax(RNG.normal(size=(50, 10))), "classes"),
        (_softmax(RNG.normal(size=(50, 12, 30))), "sequence"),
        (RNG.normal(size=(50, 10)).astype(np.float32), "scores"),  # logits or a pooled embedding: no evidence
        (RNG.normal(size=(50, 12, 30)).astype(np.float32), "scores"),
        (RNG.normal(size=(50, 3, 8, 8)).astype(np.float32), "tensor"),
        (RNG.integers(0, 5, size=(50,)), "labels"),
    ],
)
def test_each_output_shape_is_read_as_what_it_means(array, kind):
    assert output_kind(array) == kind


def test_logits_are_class_scores_when_a_classification_task_or_accuracy_labels_say_so():
    logits = RNG.normal(size=(50, 10))
    assert output_kind(logits, task="text-classification") == "classes"
    assert output_kind(logits, class_labels=True) == "classes"
    assert output_kind(RNG.normal(size=(50, 12, 30)), task="token-classification") == "sequence"


def test_normalized_rows_and_feature_extraction_outputs_are_embeddings():
    e = RNG.normal(size=(40, 16))
    assert output_kind(e / np.linalg.norm(e, axis=1, keepdims=True)) == "embedding"
    assert output_kind(e, task="feature-extraction") == "embedding"
    assert output_kind(_softmax(e)) == "classes"  # softmax rows: class scores, not embeddings


def test_a_probability_that_drifts_by_half_fails_although_its_cosine_would_be_one():
    p = RNG.uniform(0.05, 0.95, size=(64, 1))
    moved = p.copy()
    moved[3] = np.clip(moved[3] + 0.5, 0, 1) if moved[3] < 0.5 else moved[3] - 0.5
    fid = fidelity([p], [moved])
    (out,) = fid["outputs"]
    assert out["kind"] == "value" and out["cosine_mean"] is None
    assert out["max_abs_error"] == pytest.approx(0.5)
    assert out["max_relative_error"] == pytest.approx(0.5 / (p.max() - p.min()), rel=1e-5)
    failed = _failed(fidelity_gates(fid))
    assert failed["max_value_error (default)"]["value"] == out["max_relative_error"]
    # the same probability moved by a few int8 steps holds
    nudged = p + RNG.uniform(-0.01, 0.01, size=p.shape)
    assert not _failed(fidelity_gates(fidelity([p], [nudged])))


def test_a_classifier_with_7_percent_of_labels_changed_at_cosine_0999_fails_the_agreement_gate():
    n, c = 400, 10
    top = RNG.integers(0, c, n)
    logits = RNG.normal(0, 1e-5, size=(n, c)) + 1.0
    runner_up = (top + 1) % c
    logits[np.arange(n), top] += 0.3
    logits[np.arange(n), runner_up] += 0.3 - 1e-3  # a near tie: the class a small drift flips
    changed = logits.copy()
    flip = RNG.choice(n, size=28, replace=False)  # 7 %
    changed[flip, runner_up[flip]] += 2e-3
    fid = fidelity([_softmax(logits)], [_softmax(changed)])  # probabilities: class scores by their values
    assert fid["cosine_mean"] >= 0.999
    assert fid["top1_agreement"] == pytest.approx(1 - 28 / n)
    failed = _failed(fidelity_gates(fid))
    assert set(failed) == {"min_top1_agreement (default)"}
    # the same logits without evidence that they are class scores: judged by cosine, the agreement still reported
    unlabelled = fidelity([logits], [changed])
    assert unlabelled["outputs"][0]["kind"] == "scores" and unlabelled["top1_agreement"] == fid["top1_agreement"]
    assert not _failed(fidelity_gates(unlabelled))
    # ... and as labelled eval data scored by accuracy says they are
    labelled = fidelity([logits], [changed], class_labels=True)
    assert set(_failed(fidelity_gates(labelled))) == {"min_top1_agreement (default)"}


def test_a_second_output_at_cosine_091_is_seen_and_named_by_the_gate():
    logits = RNG.normal(size=(64, 10))
    state = RNG.normal(size=(64, 32))
    drifted = state + RNG.normal(0, 0.45, size=state.shape)
    fid = fidelity([logits, state], [logits.copy(), drifted], names=["logits", "state"])
    names = [o["name"] for o in fid["outputs"]]
    assert names == ["logits", "state"]
    state_cos = fid["outputs"][1]["cosine_mean"]
    assert 0.85 < state_cos < 0.95 and fid["outputs"][0]["cosine_mean"] == 1.0
    assert fid["cosine_mean"] == state_cos  # the worst output's
    gate = _failed(fidelity_gates(fid))["min_fidelity_cosine (default)"]
    assert gate["value"] == state_cos and "'state'" in gate["note"]


def test_sequence_logits_are_judged_per_position_and_padding_is_left_out():
    n, t, c = 20, 10, 37
    ref = _softmax(RNG.normal(size=(n, t, c)))
    out = ref.copy()
    out[:, -2:] = _softmax(RNG.normal(size=(n, 2, c)))  # the last two positions decode differently
    fid = fidelity([ref], [out])
    agreement = fid["outputs"][0]["position_agreement"]
    expected = (ref.argmax(-1) == out.argmax(-1)).mean()
    assert agreement == pytest.approx(expected) and agreement < 0.9
    assert "min_position_agreement (default)" in _failed(fidelity_gates(fid))
    mask = np.ones((n, t), dtype=np.int64)
    mask[:, -2:] = 0  # those positions are padding
    assert fidelity([ref], [out], mask=mask)["outputs"][0]["position_agreement"] == 1.0


def test_recipe_gates_name_the_judgement_and_say_when_no_output_has_it():
    p = RNG.uniform(size=(32, 1))
    fid = fidelity([p], [p + 0.02])
    gates = {g["name"]: g for g in fidelity_gates(fid, {"min_fidelity_cosine": 0.99, "max_value_error": 0.05})}
    assert gates["max_value_error"]["passed"]
    cosine = gates["min_fidelity_cosine"]
    assert not cosine["passed"] and cosine["value"] is None and "value" in cosine["note"]


# --------------------------------------------------------------------------- the CLI on small ONNX models


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
