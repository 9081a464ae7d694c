"""The machine a report was measured on: versions, CPU, threads (int8 results differ between CPUs)."""

from __future__ import annotations

import os
import platform
import sys


def environment(threads: int, target: str = "cpu") -> dict:
    import onnxruntime
    import torch

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "cpu": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "cpu_count": os.cpu_count(),
        "threads": threads,
        "platform": sys.platform,
        **cpu_info(),
        **provider_info(target),
    }


# --------------------------------------------------------------------------- hardware targets
# Where the report measures: ONNX Runtime execution providers, in the order a session tries them.
TARGET_PROVIDERS = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
    "openvino": ["OpenVINOExecutionProvider", "CPUExecutionProvider"],
}
TARGET_PACKAGES = {
    "cuda": "onnxruntime-gpu",
    "tensorrt": "onnxruntime-gpu (built with TensorRT) and TensorRT itself",
    "openvino": "onnxruntime-openvino",
}
# CPU features that decide int8 speed (VNNI dot products, AMX tiles) and whether reduce_range is needed.
ISA_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_tile", "amx_int8", "amx_bf16", "avx512_bf16", "f16c")


def providers_for(target: str) -> list[str]:
    return list(TARGET_PROVIDERS[target])


def check_target(target: str) -> None:
    """Refuse (exit 2) a target whose execution provider this ONNX Runtime lacks, naming the package to install."""
    import onnxruntime

    from optcli.errors import BadInput

    wanted = TARGET_PROVIDERS[target][0]
    available = onnxruntime.get_available_providers()
    if wanted not in available:
        raise BadInput(
            f"target {target} measures on {wanted}, which this onnxruntime {onnxruntime.__version__} lacks "
            f"(it has: {', '.join(available)}); install {TARGET_PACKAGES[target]} in place of onnxruntime, or use --target cpu"
        )


def cpu_info() -> dict:
    """CPU model name and the ISA flags among ISA_FLAGS the kernel reports (Linux /proc/cpuinfo; empty elsewhere)."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and value.strip():
                    model = value.strip()
                elif key in ("flags", "Features"):
                    flags = set(value.split())
                    break
    except OSError:
        pass
    return {"cpu_model": model, "isa": [f for f in ISA_FLAGS if f in flags]}


def provider_info(target: str) -> dict:
    import onnxruntime

    available = onnxruntime.get_available_providers()
    used = [p for p in TARGET_PROVIDERS[target] if p in available]
    return {"target": target, "providers_available": available, "providers_used": used}
