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
from optcli.onnxgraph import load_model

OPS = ("MatMul", "Gather")
# Ops the quantizer writes, counted for the report.
WRITTEN = ("MatMulNBits", "GatherBlockQuantized")
BACKUP_BLOCK = 128


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


def prepared(source: Path, config, ctx) -> tuple[object, tuple[str, ...], dict]:
    """The graph the quantizer reads (opset raised for Gather where needed), the op types to quantize, the opset note."""

    ops = tuple(config.op_types) if config.op_types else (("MatMul",) if config.algorithm == "hqq" else OPS)
    from optcli.onnx_check import name_nodes

    proto, opset = _opset_for_gather(load_model(source), ops, ctx)  # nodes named below: its own copy
    name_nodes(proto)  # a mixed precision names the MatMuls it keeps in backup
    if "not_upgraded" in opset:
        ops = tuple(o for o in ops if o != "Gather")
    return proto, ops, opset


def write(proto, config, ops: tuple[str, ...], exclude: set[str], backup: frozenset[str], ctx):
    """A quantized copy of proto: `weights` precision everywhere but `exclude` and `backup`; the backup MatMuls
    then in int8 (config.backup: int8) or left float (fp32). The input proto is not changed."""
    import onnx

    bits = 4 if config.weights == "int4" else 8
    out = _run(onnx.ModelProto.FromString(proto.SerializeToString()), _algo(config, bits, ops), exclude | backup, ctx)
    if backup and config.backup == "int8":
        # int8 needs no fine blocks (NNCF's int8 backup is per channel): block 128 costs 0.12 B less per weight
        # than block 32, which is what lets more layers into int8 within a size budget. A block longer than the
        # layer's K would be padded, so a narrow layer gets the largest power of two that fits.
        shapes = {t.name: list(t.dims) for t in proto.graph.initializer}
        depth = {n.name: shapes[n.input[1]][0] for n in proto.graph.node if n.name in backup}
        blocks = {
            name: max(config.block_size, min(BACKUP_BLOCK, 1 << max(4, k.bit_length() - 1)))
            for name, k in depth.items()
        }
        for block in sorted(set(blocks.values())):
            rtn = config.model_copy(update={"algorithm": "rtn", "block_size": block})
            others = exclude | {name for name, b in blocks.items() if b != block}
            out = _run(out, _algo(rtn, 8, ("MatMul",)), others, ctx)  # the int4 MatMuls are MatMulNBits by now
    return out


def _algo(config, bits: int, ops: tuple[str, ...]):
    with _quiet_import():
        from onnxruntime.quantization.matmul_nbits_quantizer import (
            DefaultWeightOnlyQuantConfig,
            HQQWeightOnlyQuantConfig,
        )
    if config.algorithm == "hqq":
        return HQQWeightOnlyQuantConfig(block_size=config.block_size, bits=bits, op_types_to_quantize=ops)
    return DefaultWeightOnlyQuantConfig(
        block_size=config.block_size,
        is_symmetric=config.symmetric,
        accuracy_level=config.accuracy_level,
        op_types_to_quantize=ops,
        quant_axes=(("MatMul", 0), ("Gather", 1)),
        bits=bits,
    )


def _run(proto, algo, exclude: set[str], ctx):
    with _quiet_import():
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    import numpy as np

    try:
        quantizer = MatMulNBitsQuantizer(proto, algo_config=algo, nodes_to_exclude=sorted(exclude))
        # An all-zero block (an embedding's padding row) has scale 0: ORT's np.where(scale == 0, ...) still
        # evaluates x / scale for it and numpy warns, though the masked value is never used.
        with np.errstate(divide="ignore", invalid="ignore"):
            quantizer.process()
    except Exception as e:
        raise PassFailed(
            ctx.step_name, f"weight-only quantization failed: {type(e).__name__}: {str(e)[:300]}"
        ) from None
    return quantizer.model.model


def matmul_weights(proto, exclude: set[str]) -> dict[str, int]:
    """MatMul nodes MatMulNBits can take (a constant 2-D weight as second input), with their weight counts."""
    import math

    shapes = {t.name: list(t.dims) for t in proto.graph.initializer}
    return {
        n.name: math.prod(shapes[n.input[1]])
        for n in proto.graph.node
        if n.op_type == "MatMul" and n.name and n.name not in exclude and len(shapes.get(n.input[1], [])) == 2
    }


def describe(out, config, ops: tuple[str, ...], opset: dict, before: int) -> dict:
    from optcli.onnx_check import all_nodes, nbits_counts

    counts = {op: sum(1 for n in all_nodes(out) if n.op_type == op) for op in WRITTEN}  # If / Loop bodies too
    bits = {f"int{b}": k for b, k in nbits_counts(out).items()}
    return {
        "opset": opset,
        "weights": config.weights,
        "algorithm": config.algorithm,
        "block_size": config.block_size,
        "symmetric": config.symmetric,
        "accuracy_level": config.accuracy_level,
        "op_types": list(ops),
        "quantized_ops": counts,
        "matmul_bits": bits,
        "float_weight_bytes_before": before,
        "weight_bytes_after": _weight_bytes(out),
    }


def nothing_done(details: dict) -> bool:
    return not any(details["quantized_ops"].values())


def warn_if_nothing(details: dict, ops: tuple[str, ...], ctx) -> None:
    if nothing_done(details):
        note = (
            f"nothing to quantize: no {'/'.join(ops)} node with a constant weight was found "
            "(Gemm, which exporters write for 2-D Linear layers, is not handled by MatMulNBits); the input is kept"
        )
        details["skipped"] = note
        ctx.warn(note)


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


def float_weight_bytes(proto) -> int:
    from optcli.onnx_check import all_initializers

    return sum(_nbytes(t) for t in all_initializers(proto) if t.data_type in (1, 10, 11, 16))


def _weight_bytes(proto) -> dict:
    """Bytes of initializers after quantization by role: packed weights, scales, zero points, float left over."""
    from optcli.onnx_check import all_initializers, all_nodes

    out = {"packed": 0, "scales": 0, "zero_points": 0, "float": 0, "other": 0}
    roles = {}
    for node in all_nodes(proto):
        if node.op_type == "MatMulNBits":
            roles.update({node.input[1]: "packed", node.input[2]: "scales"})
            if len(node.input) > 3 and node.input[3]:
                roles[node.input[3]] = "zero_points"
        elif node.op_type == "GatherBlockQuantized":
            roles.update({node.input[0]: "packed", node.input[2]: "scales"})
            if len(node.input) > 3 and node.input[3]:
                roles[node.input[3]] = "zero_points"
    for t in all_initializers(proto):
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
