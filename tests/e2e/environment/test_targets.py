"""Hardware targets: the providers a report measures on, the CPU it records, and the int8 preset per target."""

from __future__ import annotations

from pathlib import Path

import onnxruntime as ort
import pytest
from conftest import digits_recipe, run_cli, write_recipe

FAST = {"latency": {"batch_sizes": [1], "warmup": 0, "runs": 2, "threads": 1}}
HAS_CUDA = "CUDAExecutionProvider" in ort.get_available_providers()


def _onnx_recipe(digits, passes):
    recipe = digits_recipe(digits, passes, report=FAST)
    recipe["model"] = {"path": str(digits / "digits_cnn.onnx")}
    return recipe


@pytest.mark.skipif(HAS_CUDA, reason="this machine has the CUDA provider; the refusal is for machines without it")
@pytest.mark.parametrize("target, package", [("cuda", "onnxruntime-gpu"), ("openvino", "onnxruntime-openvino")])
def test_target_without_its_provider_exits_2_naming_the_package(digits, tmp_path, target, package):
    recipe = write_recipe(tmp_path, _onnx_recipe(digits, [{"type": "quantize"}]))
    out = tmp_path / "out"
    result = run_cli("run", recipe, "-o", out, "--target", target)
    assert result.exit_code == 2
    assert (
        package in result.stderr and "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    )
    assert not out.exists() or not any(out.iterdir())
    assert run_cli("validate", recipe, "--target", target).exit_code == 2


def test_cpu_report_records_cpu_model_isa_flags_and_providers(digits, tmp_path):
    result = run_cli("run", write_recipe(tmp_path, _onnx_recipe(digits, [])), "-o", tmp_path / "out", "--json")
    assert result.exit_code == 0, result.stderr
    env = result.json()["environment"]
    assert env["target"] == "cpu" and env["providers_used"] == ["CPUExecutionProvider"]
    assert set(env["providers_available"]) == set(ort.get_available_providers())
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        flags = set(next(line for line in lines if line.startswith("flags")).split(":")[1].split())
        model = next(line for line in lines if line.startswith("model name")).split(":", 1)[1].strip()
    except (OSError, StopIteration):
        pytest.skip("no /proc/cpuinfo flags on this machine")
    assert env["cpu_model"] == model
    assert set(env["isa"]) == flags & {
        "avx2",
        "avx512f",
        "avx512_vnni",
        "avx_vnni",
        "amx_tile",
        "amx_int8",
        "amx_bf16",
        "avx512_bf16",
        "f16c",
    }


def test_tensorrt_preset_is_symmetric_s8s8_qdq_and_keeps_what_the_recipe_sets():
    from optcli.passes.quantize import for_target
    from optcli.passes.quantize.config import Config

    preset = for_target(Config(), "tensorrt")
    assert (preset.mode, preset.activation_type, preset.weight_type) == ("static", "int8", "int8")
    assert preset.symmetric_activation and preset.per_channel
    assert for_target(Config(per_channel=False), "tensorrt").per_channel is False
    assert for_target(Config(), "openvino").mode == "static"
    assert for_target(Config(), "cpu") == Config()
    assert for_target(Config(weights="int4"), "tensorrt").mode == "dynamic"  # weight-only has no activation preset


def test_tensorrt_with_dynamic_int8_or_no_calibration_is_refused_at_load(digits, tmp_path):
    recipe = _onnx_recipe(digits, [{"type": "quantize", "mode": "dynamic"}])
    result = run_cli("validate", write_recipe(tmp_path, recipe), "--target", "tensorrt")
    assert result.exit_code == 2 and "static QDQ int8 only" in result.stderr
    recipe = _onnx_recipe(digits, [{"type": "quantize"}])
    del recipe["data"]["calibration"]
    result = run_cli("validate", write_recipe(tmp_path, recipe, "nocalib.yaml"), "--target", "openvino")
    assert result.exit_code == 2 and "presets mode: static" in result.stderr


@pytest.mark.skipif(not HAS_CUDA, reason="needs onnxruntime-gpu and a GPU (CUDAExecutionProvider not available here)")
def test_cuda_target_measures_on_the_gpu_and_warns_about_int8(digits, tmp_path):
    recipe = write_recipe(tmp_path, _onnx_recipe(digits, [{"type": "quantize"}]))
    result = run_cli("run", recipe, "-o", tmp_path / "out", "--target", "cuda", "--json")
    assert result.exit_code in (0, 1), result.stderr
    report = result.json()
    assert report["environment"]["providers_used"][0] == "CUDAExecutionProvider"
    assert any("#24807" in w for w in report["warnings"])
