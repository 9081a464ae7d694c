"""The machine a report was measured on: versions, CPU, threads (int8 results differ between CPUs)."""

from __future__ import annotations

import os
import platform
import sys
from dataclasses import dataclass
from pathlib import Path


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
        "torch_threads": torch.get_num_threads(),
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
# CPU features that decide int8 speed (VNNI dot products, AMX tiles, ARM dot products) and whether reduce_range is
# needed (passes/quantize/isa.py).
ISA_FLAGS = (
    "avx2",
    "avx512f",
    "avx512_vnni",
    "avx_vnni",
    "amx_tile",
    "amx_int8",
    "amx_bf16",
    "avx512_bf16",
    "f16c",
    "asimd",
    "asimddp",
    "i8mm",
)


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
    """CPU model name, the ISA flags among ISA_FLAGS the running process can use, and where they were read."""
    found = cpu()
    return {"cpu_model": found.model, "isa": [f for f in ISA_FLAGS if f in found.flags], "isa_source": found.source}


@dataclass(frozen=True)
class Cpu:
    """What the process runs on: machine (x86_64, aarch64 ...), flags in /proc/cpuinfo's names, where they came from."""

    machine: str
    flags: frozenset[str]
    source: str
    model: str = ""

    @property
    def x86(self) -> bool:
        return is_x86(self.machine)

    @property
    def arm(self) -> bool:
        return self.machine.lower() in ("aarch64", "arm64") or self.machine.lower().startswith("armv")


# Set to fake the CPU (tests, or a report for another machine): flags in /proc/cpuinfo's names, spaces or commas,
# optionally after "MACHINE:" (e.g. "avx2 fma", "aarch64: asimd asimddp").
CPU_FLAGS_ENV = "OPTCLI_CPU_FLAGS"
# numpy's names for the flags CPUID gives it (numpy asks the CPU itself, so an emulator's -cpu is what it sees).
# numpy has no name for avx_vnni or the AMX flags: those come from /proc/cpuinfo when it agrees with CPUID.
NUMPY_FLAGS = {
    "avx2": "AVX2",
    "avx512f": "AVX512F",
    "avx512_vnni": "AVX512VNNI",
    "avx512_bf16": "AVX512BF16",
    "f16c": "F16C",
}


def cpu() -> Cpu:
    """The CPU as this process sees it: OPTCLI_CPU_FLAGS when set, else CPUID (numpy) and /proc/cpuinfo merged."""
    machine = platform.machine() or "unknown"
    fake = os.environ.get(CPU_FLAGS_ENV)
    if fake is not None:
        head, sep, rest = fake.partition(":")
        if sep and head.strip() and " " not in head.strip():
            machine, fake = head.strip(), rest
        return Cpu(machine, frozenset(fake.replace(",", " ").lower().split()), CPU_FLAGS_ENV, machine)
    model, listed = read_cpuinfo()
    flags, source = merge_flags(machine, listed, numpy_cpu_flags())
    return Cpu(machine, flags, source, model)


def merge_flags(machine: str, listed: frozenset[str] | None, seen: frozenset[str] | None) -> tuple[frozenset, str]:
    """The ISA_FLAGS the process can use, and where they came from, from /proc/cpuinfo (`listed`) and CPUID (`seen`).

    /proc/cpuinfo describes the host kernel's CPU: under an emulator (qemu-user -cpu Haswell) it still lists the
    host's AVX-512 VNNI while the process runs without it. numpy's CPUID probe follows the CPU the process really
    runs on, so it decides every flag it knows (NUMPY_FLAGS); /proc/cpuinfo adds the others (avx_vnni, AMX) only
    where the two agree on those."""
    listed = None if listed is None else listed & frozenset(ISA_FLAGS)
    if seen is None or not is_x86(machine):
        return (frozenset(), "unknown") if listed is None else (listed, "/proc/cpuinfo")
    if listed is None:
        return seen, "cpuid (numpy)"
    if listed & set(NUMPY_FLAGS) == seen:
        return seen | listed, "cpuid (numpy) + /proc/cpuinfo"
    return seen, "cpuid (numpy); /proc/cpuinfo lists other flags (an emulator?), not used"


def is_x86(machine: str) -> bool:
    return machine.lower() in ("x86_64", "amd64", "i386", "i686", "x86")


def read_cpuinfo(path: Path = Path("/proc/cpuinfo")) -> tuple[str, frozenset[str] | None]:
    """Model name and flags (x86 "flags", ARM "Features") of the first CPU in a cpuinfo file; None: no such file."""
    model, flags = platform.processor() or platform.machine(), None
    try:
        with open(path) as fh:
            for line in fh:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and value.strip():
                    model = value.strip()
                elif key in ("flags", "Features"):
                    flags = frozenset(value.split())
                    break
    except OSError:
        pass
    return model, flags


def numpy_cpu_flags() -> frozenset[str] | None:
    """The NUMPY_FLAGS numpy's CPUID probe found (the table np.show_runtime prints); None where numpy hides it."""
    try:
        from numpy._core._multiarray_umath import __cpu_features__ as features  # numpy >= 2
    except ImportError:
        try:
            from numpy.core._multiarray_umath import __cpu_features__ as features  # type: ignore[no-redef]  # numpy 1.x: the same name from the other numpy's path
        except ImportError:
            return None
    return frozenset(ours for ours, theirs in NUMPY_FLAGS.items() if features.get(theirs))


def provider_info(target: str) -> dict:
    import onnxruntime

    available = onnxruntime.get_available_providers()
    used = [p for p in TARGET_PROVIDERS[target] if p in available]
    return {"target": target, "providers_available": available, "providers_used": used}
