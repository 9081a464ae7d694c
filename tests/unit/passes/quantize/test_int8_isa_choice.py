"""int8 types and reduce_range chosen for the CPU, decided on fake CPUs and cpuinfo files (no model run). The runs on
the digits model are in tests/e2e/passes/quantize/test_int8_isa.py."""

from __future__ import annotations

import pytest

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
