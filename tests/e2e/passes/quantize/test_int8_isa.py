"""int8 that is right on every CPU: optcli picks the int8 types and reduce_range for the CPU the recipe runs on.

ONNX Runtime's U8S8 kernels saturate on x86 without VNNI (AVX2, AVX-512 Skylake): there optcli writes 7-bit weights.
The decision is unit-tested with fake CPUs; the CLI runs fake one through OPTCLI_CPU_FLAGS.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import yaml
from conftest import EXPORT, REPO, digits_recipe, run_cli, write_recipe
from onnx import numpy_helper


def _int8_weights(path: Path) -> list[np.ndarray]:
    """The int8 weight tensors of a QDQ model (initializers feeding DequantizeLinear)."""
    graph = onnx.load(str(path)).graph
    dq_inputs = {n.input[0] for n in graph.node if n.op_type == "DequantizeLinear"}
    return [
        numpy_helper.to_array(t)
        for t in graph.initializer
        if t.name in dq_inputs and t.data_type == onnx.TensorProto.INT8 and len(t.dims) >= 2
    ]


# A run that fakes a CPU the machine is not computes with the real one's kernels: full 8-bit weights decided for a
# faked VNNI CPU saturate on a real AVX2-only one (cosine 0.976 on an emulated Haswell: the very bug the choice
# prevents). These tests check the decision and the weights written, so their gate is one every CPU's kernels meet.
LENIENT = {"min_fidelity_cosine": 0.9}


def _static_run(digits, tmp_path, monkeypatch, flags: str, **quantize):
    monkeypatch.setenv("OPTCLI_CPU_FLAGS", flags)
    passes = [{"type": "quantize", "mode": "static", "per_channel": True, **quantize}]
    recipe = digits_recipe(digits, passes, gates=LENIENT)
    result = run_cli("run", write_recipe(tmp_path, recipe), "-o", tmp_path / "out", "--json")
    assert result.exit_code == 0, result.stderr
    return result.json()


def test_static_int8_on_an_avx2_only_cpu_writes_7bit_weights_and_says_why(digits, tmp_path, monkeypatch):
    report = _static_run(digits, tmp_path, monkeypatch, "fpu sse avx avx2 fma f16c")
    step = report["steps"][-1]
    int8 = step["details"]["int8"]
    assert int8["reduce_range"] is True and int8["chosen_by"]["reduce_range"] == "optcli"
    assert "AVX2 without VNNI" in int8["reason"] and "saturate" in int8["reason"]
    weights = _int8_weights(tmp_path / "out" / "model.onnx")
    assert weights and max(int(np.abs(w.astype(np.int32)).max()) for w in weights) <= 64  # 7-bit, as recorded
    assert step["fidelity"]["cosine_mean"] >= 0.99
    # the recipe in report.json keeps the key unset, so a run read back from it decides again on its own CPU
    assert report["recipe"]["passes"][0].get("reduce_range") is None
    assert report["environment"]["isa"] == ["avx2", "f16c"]
    md = (tmp_path / "out" / "report.md").read_text()
    assert "int8 settings: uint8 activations (optcli), int8 weights (optcli), reduce_range true (optcli)" in md


def test_static_int8_on_a_vnni_cpu_keeps_full_8bit_weights(digits, tmp_path, monkeypatch):
    report = _static_run(digits, tmp_path, monkeypatch, "avx2 avx512f avx512_vnni")
    int8 = report["steps"][-1]["details"]["int8"]
    assert int8["reduce_range"] is False and "avx512_vnni" in int8["reason"]
    weights = _int8_weights(tmp_path / "out" / "model.onnx")
    assert max(int(np.abs(w.astype(np.int32)).max()) for w in weights) > 64


def test_reduce_range_false_in_the_recipe_is_kept_with_a_warning_on_avx2(digits, tmp_path, monkeypatch):
    report = _static_run(digits, tmp_path, monkeypatch, "avx2", reduce_range=False)
    int8 = report["steps"][-1]["details"]["int8"]
    assert int8["reduce_range"] is False and int8["chosen_by"]["reduce_range"] == "recipe"
    assert any("reduce_range: false on this CPU" in w for w in report["warnings"])


def test_search_cnn_candidates_take_reduce_range_from_the_same_decision(digits, tmp_path, monkeypatch):
    monkeypatch.setenv("OPTCLI_CPU_FLAGS", "avx2")
    quantize = {
        "type": "quantize",
        "target": {"metric": "cosine", "min_value": 0.9},
        "allow_slower": True,
        "search": {"per_channel": [True], "max_trials": 2, "fallback": False},
    }
    recipe = digits_recipe(digits, [EXPORT, quantize])
    result = run_cli("run", write_recipe(tmp_path, recipe), "-o", tmp_path / "out", "--json", "--quiet")
    assert result.exit_code == 0, result.stderr
    details = result.json()["steps"][-1]["details"]
    static = [c for c in details["search"]["candidates"] if c["config"]["mode"] == "static"]
    assert static and all(c["config"]["reduce_range"] is True for c in static)
    assert any("AVX2 without VNNI" in n for n in details["search"]["notes"])
    assert details["int8"]["reduce_range"] is True


ISA_KEYS = {"reduce_range", "activation_type", "weight_type"}


def test_shipped_and_init_recipes_leave_int8_types_and_reduce_range_to_the_cpu(digits, tmp_path):
    for path in sorted((REPO / "configs").glob("*.yaml")):
        for step in yaml.safe_load(path.read_text())["passes"]:
            assert not ISA_KEYS & set(step), f"{path.name} hard-codes {ISA_KEYS & set(step)}"
    for model in ("digits_cnn.onnx", "digits_cnn.pt2"):
        result = run_cli("init", digits / model)
        assert result.exit_code == 0, result.stderr
        for step in yaml.safe_load(result.stdout)["passes"]:
            assert not ISA_KEYS & set(step)


def test_resume_never_reuses_an_int8_step_decided_for_another_cpu(digits, tmp_path, monkeypatch):
    """The recipe leaves reduce_range to the CPU, so the same recipe on a VNNI and an AVX2 CPU writes different
    models: --resume (a shared output folder, a CI cache) must quantize again where the CPU decides otherwise."""
    passes = [{"type": "quantize", "mode": "static", "per_channel": True}]
    recipe = write_recipe(tmp_path, digits_recipe(digits, passes, gates=LENIENT))
    out = tmp_path / "out"
    monkeypatch.setenv("OPTCLI_CPU_FLAGS", "avx2 avx512f avx512_vnni")
    assert run_cli("run", recipe, "-o", out, "--json", "--quiet").exit_code == 0
    again = run_cli("run", recipe, "-o", out, "--resume", "--json", "--quiet").json()
    assert again["reused_steps"].get("2-quantize") == "resume"  # same CPU: reused
    monkeypatch.setenv("OPTCLI_CPU_FLAGS", "avx2 fma")
    other = run_cli("run", recipe, "-o", out, "--resume", "--json", "--quiet").json()
    assert "2-quantize" not in other["reused_steps"] and other["reused_steps"].get("1-export") == "resume"
    assert other["steps"][-1]["details"]["int8"]["reduce_range"] is True
    assert max(int(np.abs(w.astype(np.int32)).max()) for w in _int8_weights(out / "model.onnx")) <= 64
