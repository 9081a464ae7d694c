"""The int8 types and reduce_range that ONNX Runtime runs right on this CPU: one decision, for the pass and the search.

ONNX Runtime's U8S8 kernels (uint8 activations x int8 weights) on x86 without VNNI multiply with `vpmaddubsw`, which
adds each pair of products in int16 and saturates: the digits CNN's static int8 fell to cosine 0.9908 on an AVX2-only
CPU, a third-party OCR net to 0.66. 7-bit weights (`reduce_range`) keep every pair sum inside int16 (2 x 255 x 64),
which is what ORT's documentation recommends there ("designed for the U8S8 format on AVX2 and AVX512 (non-VNNI)
machines ... not needed on machines supporting VNNI"). VNNI / AMX accumulate in int32, ARM's NEON and dot-product
kernels widen before adding, U8U8 kernels widen to int16 before multiplying, GPUs accumulate in int32: no
saturation there, so full 8-bit weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from optcli.environment import Cpu, cpu

# U8S8: what ORT's CPU session fuses into QLinearConv / QGemm (S8 activations left many convs unfused, NOTES-int8).
ACTIVATION_TYPE = "uint8"
WEIGHT_TYPE = "int8"
KEYS = ("activation_type", "weight_type", "reduce_range")
# int8 dot products that accumulate in int32 (no int16 pair sums): AVX-512 VNNI, AVX-VNNI (Alder Lake, Zen 5), AMX.
VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")
GPU_TARGETS = ("cuda", "tensorrt")


@dataclass(frozen=True)
class Int8Choice:
    activation_type: str
    weight_type: str
    reduce_range: bool
    reason: str  # why reduce_range is (or should be) what it is on this CPU
    chosen_by: dict[str, str] = field(default_factory=dict)  # key -> optcli | recipe | target <name> | onnxruntime
    cpu: str = ""
    needs_reduce_range: bool = False  # what this CPU wants, whatever the recipe wrote

    def values(self) -> dict:
        return {k: getattr(self, k) for k in KEYS}

    def record(self) -> dict:
        """The step's details["int8"]: the settings, who chose each, why, and the CPU the choice was made for."""
        return {**self.values(), "chosen_by": dict(self.chosen_by), "reason": self.reason, "cpu": self.cpu}

    def contradiction(self) -> str | None:
        """A warning when the recipe wrote reduce_range: false where this CPU's int8 kernels saturate."""
        if self.chosen_by.get("reduce_range") == "recipe" and self.needs_reduce_range and not self.reduce_range:
            return (
                f"reduce_range: false on this CPU ({self.reason}): int8 outputs may be far off; drop the key and "
                "optcli chooses reduce_range: true here"
            )
        return None


def reduce_range_needed(found: Cpu, target: str = "cpu", weight_type: str = WEIGHT_TYPE) -> tuple[bool, str]:
    """Whether ORT's int8 kernels for these weights saturate on this CPU (then 7-bit weights), and why."""
    if target in GPU_TARGETS:
        return False, f"target {target}: the GPU's int8 kernels accumulate in int32, no int16 saturation"
    if weight_type == "uint8":
        return False, "uint8 weights (U8U8): ONNX Runtime widens to int16 before multiplying, no saturation"
    if found.arm:
        return False, f"{found.machine}: ONNX Runtime's ARM int8 kernels accumulate in int32, no int16 saturation"
    if not found.x86:
        return False, f"{found.machine}: ONNX Runtime has no int16-saturating int8 kernel here"
    vnni = [f for f in VNNI_FLAGS if f in found.flags]
    if vnni:
        return False, f"CPU has {vnni[0]}: ONNX Runtime's U8S8 kernels accumulate in int32 (VNNI), no saturation"
    if not found.flags:
        return True, "CPU flags unknown: 7-bit weights never saturate ONNX Runtime's x86 U8S8 kernels"
    isa = "AVX-512" if "avx512f" in found.flags else "AVX2" if "avx2" in found.flags else "no AVX2"
    return True, (
        f"CPU has {isa} without VNNI: ONNX Runtime's U8S8 kernels (vpmaddubsw) add products in int16 and saturate; "
        "7-bit weights do not"
    )


def choose_int8(config, target: str = "cpu", preset: frozenset[str] = frozenset(), found: Cpu | None = None):
    """The int8 settings to run: the recipe's where it wrote them (not None), else the CPU's choice.

    `config` is the quantize pass config (activation_type / weight_type / reduce_range, None: not written);
    `preset` names the keys a report.target preset filled; `found` fakes the CPU (default: this one)."""
    found = found or cpu()
    chosen_by = {}
    for key in KEYS:
        written = getattr(config, key) is not None
        chosen_by[key] = (f"target {target}" if key in preset else "recipe") if written else "optcli"
    activation = config.activation_type or ACTIVATION_TYPE
    if config.mode == "dynamic" and config.target is None:
        # quantize_dynamic has no activation type: DynamicQuantizeLinear always makes uint8.
        activation, chosen_by["activation_type"] = "uint8", "onnxruntime"
    weight = config.weight_type or WEIGHT_TYPE
    needed, reason = reduce_range_needed(found, target, weight)
    reduce_range = needed if config.reduce_range is None else config.reduce_range
    shown = " ".join(sorted(found.flags & {"avx2", "avx512f", *VNNI_FLAGS, "asimd", "asimddp", "i8mm"})) or "-"
    return Int8Choice(
        activation,
        weight,
        reduce_range,
        reason,
        chosen_by,
        f"{found.machine}: {shown} (flags from {found.source})",
        needed,
    )
