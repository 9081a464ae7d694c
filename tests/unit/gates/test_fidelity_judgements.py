"""Fidelity over every output judged in its own terms, on arrays made in the test (no model run): class scores by top-1
agreement, sequences per position, a probability or a regression by its error, a second output seen and named. The
CLI runs are in tests/e2e/gates/test_fidelity_outputs.py."""

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
