"""Weight-only int4 / int8: MatMul and Gather weights in blocks, through onnxruntime's MatMulNBitsQuantizer.

MatMul weights become MatMulNBits (com.microsoft), Gather tables (embeddings) GatherBlockQuantized; activations stay
float. `algorithm: rtn` is ORT's own blockwise round-to-nearest (its DefaultWeightOnlyQuantConfig), `hqq` its
Half-Quadratic Quantization (MatMul only in ORT). ORT's GPTQ and its other RTN go through a vendored copy of Intel
Neural Compressor that prints progress bars on stdout and dropped unnamed nodes of a graph we tried; not offered.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

from optcli.errors import PassFailed

OPS = ("MatMul", "Gather")
# Ops the quantizer writes, counted for the report.
WRITTEN = ("MatMulNBits", "GatherBlockQuantized")


@contextlib.contextmanager
def _quiet_import():
    """matmul_nbits_quantizer calls logging.basicConfig(level=INFO) when imported: give root a handler first."""
    root = logging.getLogger()
    handler = logging.NullHandler()
    added = not root.handlers
    if added:
        root.addHandler(handler)
    try:
        yield
    finally:
        if added:
            root.removeHandler(handler)
        logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)


def quantize_weights(source: Path, target: Path, config, exclude: set[str], ctx) -> dict:
    import onnx

    from optcli.artifact import save_onnx

    with _quiet_import():
        from onnxruntime.quantization.matmul_nbits_quantizer import (
            DefaultWeightOnlyQuantConfig,
            HQQWeightOnlyQuantConfig,
            MatMulNBitsQuantizer,
        )

    bits = 4 if config.weights == "int4" else 8
    ops = tuple(config.op_types) if config.op_types else (("MatMul",) if config.algorithm == "hqq" else OPS)
    proto, opset = _opset_for_gather(onnx.load(str(source)), ops, ctx)
    if "not_upgraded" in opset:
        ops = tuple(o for o in ops if o != "Gather")
    if config.algorithm == "hqq":
        algo = HQQWeightOnlyQuantConfig(block_size=config.block_size, bits=bits, op_types_to_quantize=ops)
    else:
        algo = DefaultWeightOnlyQuantConfig(
            block_size=config.block_size,
            is_symmetric=config.symmetric,
            accuracy_level=config.accuracy_level,
            op_types_to_quantize=ops,
            quant_axes=(("MatMul", 0), ("Gather", 1)),
            bits=bits,
        )
    before = _float_weight_bytes(proto)
    try:
        quantizer = MatMulNBitsQuantizer(proto, algo_config=algo, nodes_to_exclude=sorted(exclude))
        quantizer.process()
    except Exception as e:
        raise PassFailed(
            ctx.step_name, f"weight-only quantization failed: {type(e).__name__}: {str(e)[:300]}"
        ) from None
    out = quantizer.model.model
    save_onnx(out, target)
    counts = {op: sum(1 for n in out.graph.node if n.op_type == op) for op in WRITTEN}
    if not any(counts.values()):
        ctx.warn(
            f"no {'/'.join(ops)} node with a constant weight was found, nothing was quantized "
            "(Gemm, which exporters write for 2-D Linear layers, is not handled by MatMulNBits)"
        )
    return {
        "opset": opset,
        "weights": config.weights,
        "algorithm": config.algorithm,
        "block_size": config.block_size,
        "symmetric": config.symmetric,
        "accuracy_level": config.accuracy_level,
        "op_types": list(ops),
        "quantized_ops": counts,
        "float_weight_bytes_before": before,
        "weight_bytes_after": _weight_bytes(out),
    }


def _opset_for_gather(proto, ops: tuple[str, ...], ctx) -> tuple[object, dict]:
    """GatherBlockQuantized needs opset 21, and ORT's quantizer only rewrites the opset number (its own warning:
    "the generated model may not be a valid model": an opset-17 ReduceL2 keeps its `axes` attribute and fails to
    load). So the graph is converted to 21 first; where that fails, embeddings stay float and the report says why."""
    from optcli.onnx_check import default_opset, upgrade

    found = default_opset(proto)
    if "Gather" not in ops or found >= 21:
        return proto, {"from": found, "to": found}
    try:
        return upgrade(proto, 21), {"from": found, "to": 21}
    except ValueError as e:
        why = f"Gather (embeddings) left float: int4 Gather needs opset 21 and upgrading from {found} failed ({e})"
        ctx.warn(why)
        return proto, {"from": found, "to": found, "not_upgraded": why}


def _float_weight_bytes(proto) -> int:
    return sum(_nbytes(t) for t in proto.graph.initializer if t.data_type in (1, 10, 11, 16))


def _weight_bytes(proto) -> dict:
    """Bytes of initializers after quantization by role: packed weights, scales, zero points, float left over."""
    out = {"packed": 0, "scales": 0, "zero_points": 0, "float": 0, "other": 0}
    roles = {}
    for node in proto.graph.node:
        if node.op_type == "MatMulNBits":
            roles.update({node.input[1]: "packed", node.input[2]: "scales"})
            if len(node.input) > 3 and node.input[3]:
                roles[node.input[3]] = "zero_points"
        elif node.op_type == "GatherBlockQuantized":
            roles.update({node.input[0]: "packed", node.input[2]: "scales"})
            if len(node.input) > 3 and node.input[3]:
                roles[node.input[3]] = "zero_points"
    for t in proto.graph.initializer:
        role = roles.get(t.name) or ("float" if t.data_type in (1, 10, 11, 16) else "other")
        out[role] += _nbytes(t)
    return out


def _nbytes(t) -> int:
    import math

    from onnx import helper

    count = math.prod(t.dims)
    bits = {16: 16, 10: 16, 1: 32, 11: 64, 2: 8, 3: 8, 6: 32, 7: 64, 9: 8, 22: 4, 21: 4}.get(t.data_type)
    if bits is None:
        bits = helper.tensor_dtype_to_np_dtype(t.data_type).itemsize * 8
    return (count * bits + 7) // 8
