"""int8 that is right on every CPU: optcli picks the int8 types and reduce_range for the CPU the recipe runs on.

ONNX Runtime's U8S8 kernels saturate on x86 without VNNI (AVX2, AVX-512 Skylake): there optcli writes 7-bit weights.
The decision is unit-tested with fake CPUs; the CLI runs fake one through OPTCLI_CPU_FLAGS.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import yaml
from conftest import REPO, digits_recipe, run_cli, write_recipe
from onnx import numpy_helper

from optcli.environment import Cpu, merge_flags, read_cpuinfo
from optcli.passes.quantize.config import Config
from optcli.passes.quantize.isa import choose_int8

HASWELL = Cpu("x86_64", frozenset({"avx2", "f16c"}), "fake")
SKYLAKE_X = Cpu("x86_64", frozenset({"avx2", "avx512f"}), "fake")
CASCADE_LAKE = Cpu("x86_64", frozenset({"avx2", "avx512f", "avx512_vnni"}), "fake")
ALDER_LAKE = Cpu("x86_64", frozenset({"avx2", "avx_vnni"}), "fake")
SAPPHIRE_RAPIDS = Cpu("x86_64", frozenset({"avx2", "avx512f", "avx512_vnni", "amx_tile", "amx_int8"}), "fake")
GRAVITON = Cpu("aarch64", frozenset({"asimd", "asimddp", "i8mm"}), "fake")
UNREADABLE_X86 = Cpu("x86_64", frozenset(), "unknown")


@pytest.mark.parametrize(
    ("found", "reduce_range", "why"),
    [
        (HASWELL, True, "AVX2 without VNNI"),
        (SKYLAKE_X, True, "AVX-512 without VNNI"),
        (CASCADE_LAKE, False, "avx512_vnni"),
        (ALDER_LAKE, False, "avx_vnni"),
        (SAPPHIRE_RAPIDS, False, "avx512_vnni"),
        (GRAVITON, False, "ARM"),
        (UNREADABLE_X86, True, "unknown"),
    ],
)
def test_static_int8_gets_7bit_weights_exactly_where_the_cpu_saturates_u8s8(found, reduce_range, why):
    choice = choose_int8(Config(mode="static"), found=found)
    assert (choice.activation_type, choice.weight_type, choice.reduce_range) == ("uint8", "int8", reduce_range)
    assert why in choice.reason
    assert choice.chosen_by == dict.fromkeys(("activation_type", "weight_type", "reduce_range"), "optcli")
    assert choice.contradiction() is None


def test_dynamic_int8_follows_the_same_rule_and_says_onnxruntime_picks_its_activations():
    avx2 = choose_int8(Config(mode="dynamic", per_channel=True), found=HASWELL)
    vnni = choose_int8(Config(mode="dynamic", per_channel=True), found=CASCADE_LAKE)
    assert avx2.reduce_range and not vnni.reduce_range
    assert avx2.activation_type == "uint8" and avx2.chosen_by["activation_type"] == "onnxruntime"


def test_what_the_recipe_writes_wins_and_a_saturating_choice_is_warned_about():
    written = choose_int8(Config(mode="static", reduce_range=False, weight_type="int8"), found=HASWELL)
    assert written.reduce_range is False and written.chosen_by["reduce_range"] == "recipe"
    assert "reduce_range: false" in written.contradiction() and "AVX2 without VNNI" in written.contradiction()
    # U8U8 widens before multiplying: nothing saturates, so no 7-bit weights and no warning
    u8u8 = choose_int8(Config(mode="static", weight_type="uint8"), found=HASWELL)
    assert u8u8.reduce_range is False and u8u8.chosen_by["weight_type"] == "recipe" and u8u8.contradiction() is None
    # on a GPU target the CPU's kernels do not matter
    assert choose_int8(Config(mode="static"), target="tensorrt", found=HASWELL).reduce_range is False


def test_an_emulated_cpu_is_judged_by_cpuid_not_by_the_hosts_proc_cpuinfo():
    host = frozenset({"avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "fpu"})
    # qemu-user -cpu Haswell on a VNNI host: CPUID says AVX2 only, /proc/cpuinfo still lists the host's flags
    flags, source = merge_flags("x86_64", host, frozenset({"avx2"}))
    assert flags == {"avx2"} and "cpuid" in source
    assert choose_int8(Config(mode="static"), found=Cpu("x86_64", flags, source)).reduce_range
    # on real hardware the two agree, and /proc/cpuinfo adds what numpy has no name for (AVX-VNNI, AMX)
    flags, _ = merge_flags("x86_64", frozenset({"avx2", "avx_vnni", "fpu"}), frozenset({"avx2"}))
    assert flags == {"avx2", "avx_vnni"}
    assert merge_flags("aarch64", frozenset({"asimd", "asimddp"}), None) == ({"asimd", "asimddp"}, "/proc/cpuinfo")


def test_cpuinfo_files_are_read_for_flags_and_a_missing_one_is_unknown(tmp_path):
    # (moved from test_latency_int8's test_reduce_range_follows_the_cpu_isa, which read profile.cpu_has_vnni)
    with_vnni = tmp_path / "vnni"
    with_vnni.write_text("processor : 0\nflags : fpu sse avx2 avx512f avx512_vnni\n")
    without = tmp_path / "plain"
    without.write_text("processor : 0\nflags : fpu sse avx2\n")
    arm = tmp_path / "arm"
    arm.write_text("processor : 0\nFeatures : fp asimd asimddp\n")

    def decide(path, machine="x86_64"):
        found = Cpu(machine, read_cpuinfo(path)[1] or frozenset(), "file")
        return choose_int8(Config(mode="static"), found=found).reduce_range

    assert decide(with_vnni) is False
    assert decide(without) is True
    assert decide(arm, "aarch64") is False
    assert read_cpuinfo(tmp_path / "missing")[1] is None


def _int8_weights(path: Path) -> list[np.ndarray]:
    """The int8 weight tensors of a QDQ model (initializers feeding DequantizeLinear)."""
    graph = onnx.load(str(path)).graph
    dq_inputs = {n.input[0] for n in graph.node if n.op_type == "DequantizeLinear"}
    return [
        numpy_helper.to_array(t)
        for t in graph.initializer
        if t.name in dq_inputs and t.data_type == onnx.TensorProto.INT8 and len(t.dims) >= 2
    ]


def _static_run(digits, tmp_path, monkeypatch, flags: str, **quantize):
    monkeypatch.setenv("OPTCLI_CPU_FLAGS", flags)
    passes = [{"type": "quantize", "mode": "static", "per_channel": True, **quantize}]
    result = run_cli("run", write_recipe(tmp_path, digits_recipe(digits, passes)), "-o", tmp_path / "out", "--json")
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
    recipe = digits_recipe(digits, [{"type": "export"}, quantize])
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
    recipe = write_recipe(
        tmp_path, digits_recipe(digits, [{"type": "quantize", "mode": "static", "per_channel": True}])
    )
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
