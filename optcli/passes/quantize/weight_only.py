"""Weight-only int4 / int8: MatMul and Gather weights in blocks, through onnxruntime's MatMulNBitsQuantizer.

MatMul weights become MatMulNBits (com.microsoft), Gather tables (embeddings) GatherBlockQuantized; activations stay
float. `algorithm: rtn` is ORT's own blockwise round-to-nearest (its DefaultWeightOnlyQuantConfig), `hqq` its
Half-Quadratic Quantization (MatMul only in ORT). `gptq` and `k_quant` are the functions of the Intel Neural
Compressor copy ORT ships (onnxruntime.quantization.neural_compressor, what MatMulNBitsQuantizer's GPTQ / k_quant
configs call), called directly: the wrapper ignores nodes_to_exclude for GPTQ, and both print progress bars on
stdout (sent to the log here). Their graphs need named nodes (name_nodes names them first). `awq` is optcli's own
(awq.py): it scales and clips the float weights (activation_aware), then ORT's round-to-nearest writes them. GPTQ
and AWQ calibrate on a decoder's text (decoder.calibration_feeds). A decoder's lm_head and embedding table get their
own precision.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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

    ops = tuple(config.op_types) if config.op_types else (("MatMul",) if config.algorithm in MATMUL_ONLY else OPS)
    if config.embeddings is not None and not config.op_types:
        ops = ("MatMul", "Gather") if config.embeddings != "fp32" else ("MatMul",)
    from optcli.onnx_check import name_nodes

    proto, opset = _opset_for_gather(load_model(source), ops, ctx)  # nodes named below: its own copy
    name_nodes(proto)  # a mixed precision names the MatMuls it keeps in backup
    if "not_upgraded" in opset:
        ops = tuple(o for o in ops if o != "Gather")
    return proto, ops, opset


# Algorithms for MatMul only: embeddings (Gather) then go through ORT's round-to-nearest.
MATMUL_ONLY = ("hqq", "gptq", "awq", "k_quant")
BITS = {"int4": 4, "int8": 8, "fp32": None}  # GatherBlockQuantized: 4 only (ORT)


@dataclass(frozen=True)
class Roles:
    """A decoder's lm_head and embedding tables with the precision the config gives them."""

    int8: frozenset[str] = frozenset()  # MatMuls always int8 (lm_head: int8)
    fp32: frozenset[str] = frozenset()  # MatMuls left float (lm_head: fp32)
    gather_bits: int | None = None  # the embedding tables' bits; None: float


def roles(proto, config, ops: tuple[str, ...]) -> Roles:
    from optcli.passes.quantize.decoder import lm_head

    head = lm_head(proto) if config.lm_head is not None else None
    fixed = {config.lm_head: frozenset({head})} if head and config.lm_head != config.weights else {}
    if config.embeddings is not None:
        gather = BITS[config.embeddings]
    else:
        gather = 4 if "Gather" in ops and config.weights == "int4" else None  # ORT: GatherBlockQuantized 4-bit only
    return Roles(fixed.get("int8", frozenset()), fixed.get("fp32", frozenset()), gather)


def write(
    proto,
    config,
    ops: tuple[str, ...],
    exclude: set[str],
    backup: frozenset[str],
    ctx,
    calibration: list[dict] | None = None,
):
    """A quantized copy of proto: `weights` precision everywhere but `exclude` and `backup`; the backup MatMuls
    then in int8 (config.backup: int8) or left float (fp32); a decoder's lm_head and embeddings as the config says.
    The input proto is not changed."""
    import onnx

    bits = 4 if config.weights == "int4" else 8
    role = roles(proto, config, ops)
    main_ops = tuple(o for o in ops if o != "Gather")
    if "Gather" in ops and role.gather_bits == bits and config.algorithm not in MATMUL_ONLY:
        main_ops = ops
    kept = exclude | backup | role.int8 | role.fp32
    out = _main(onnx.ModelProto.FromString(proto.SerializeToString()), config, bits, main_ops, kept, ctx, calibration)
    if role.gather_bits and "Gather" not in main_ops:
        rtn = config.model_copy(update={"algorithm": "rtn"})
        out = _run(out, _algo(rtn, role.gather_bits, ("Gather",)), exclude, ctx)
    # The second (int8) pass must not touch what stays float: fp32 backups and an fp32 lm_head are still MatMuls.
    exclude = exclude | role.fp32 | (backup if config.backup == "fp32" else frozenset())
    backup = (backup if config.backup == "int8" else frozenset()) | role.int8
    if backup:
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
    from optcli.passes.quantize.decoder import is_decoder, share_tied_embeddings

    # embeddings: fp32 written in the recipe keeps a tied table float; the decoder default means an untied one
    if is_decoder(out) and not (config.embeddings == "fp32" and config.written_by_recipe("embeddings")):
        tied = share_tied_embeddings(out)
        if tied and hasattr(ctx, "details"):
            ctx.details["tied_embeddings"] = (
                f"{', '.join(tied)} read the lm_head's quantized blocks (GatherBlockQuantized), as the model builder "
                "writes a tied decoder: one table, no float copy"
            )
    if config.accuracy_level is not None:
        _set_accuracy_level(out, config.accuracy_level)
    return out


def _set_accuracy_level(proto, level: int) -> None:
    """ORT's HQQ config takes no accuracy_level, so its MatMulNBits run the default (fp32) kernel: the recipe's
    level is written on every MatMulNBits that lacks one."""
    from onnx import helper

    for node in proto.graph.node:
        if node.op_type == "MatMulNBits" and not any(a.name == "accuracy_level" for a in node.attribute):
            node.attribute.append(helper.make_attribute("accuracy_level", level))


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


def _main(proto, config, bits: int, ops: tuple[str, ...], exclude: set[str], ctx, calibration):
    """The body of the model at `bits` with config.algorithm (ops without Gather for the MatMul-only ones)."""
    if config.algorithm not in ("gptq", "k_quant") or bits != 4 and config.algorithm == "gptq":
        return _run(proto, _algo(config, bits, ops), exclude, ctx)
    import contextlib
    import io

    with _quiet_import():
        from onnxruntime.quantization.neural_compressor import gptq_quantize, rtn_quantize
    scheme = "sym" if config.symmetric else "asym"
    depth = {t.name: t.dims[0] for t in proto.graph.initializer if len(t.dims) == 2}

    def block(k: int | None) -> int:
        # INC's GPTQ / k-quant fail on a block longer than the layer (ORT's RTN pads it), and with 4-bit zero points
        # on an odd number of blocks per column (make_matmul_weight_only_node packs two columns' zero points into
        # one byte, then reshapes per column): halve the block until the count is even.
        g = config.block_size
        if not k:
            return g
        while g > 16 and (g > k or bits == 4 and -(-k // g) % 2):
            g //= 2
        return g

    layers: dict[str, dict[str, Any] | str] = {}  # node -> INC weight config, or "fp32" (kept float)
    changed = {}
    for n in proto.graph.node:
        if n.op_type == "MatMul":
            k = depth.get(n.input[1])
            layer: dict[str, Any] = {"bits": bits, "group_size": block(k), "scheme": scheme}
            layers[n.name] = layer
            if k and layer["group_size"] != config.block_size:
                changed[n.name] = layer["group_size"]
            if k and bits == 4 and -(-k // layer["group_size"]) % 2:
                layer["scheme"] = "sym"  # no zero points to pack (GPTQ); k-quant always writes them
                if config.algorithm == "k_quant":
                    raise PassFailed(ctx.step_name, f"k_quant cannot write {n.name} (K={k}): use rtn or gptq")
    if changed and hasattr(ctx, "details"):
        ctx.details["block_size_by_layer"] = changed
    layers.update({name: "fp32" for name in exclude if name in layers})
    level = config.accuracy_level or 0
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log):  # INC's progress bars
            if config.algorithm == "gptq":
                if not calibration:
                    raise ValueError("GPTQ needs calibration text (data.calibration.text or data.eval.text)")
                model = gptq_quantize(
                    proto,
                    ((feeds, None) for feeds in calibration),
                    weight_config=layers,
                    num_bits=bits,
                    group_size=config.block_size,
                    scheme=scheme,
                    n_samples=-1,
                    actorder=config.act_order,
                    accuracy_level=level,
                )
            else:
                model = rtn_quantize(
                    proto,
                    weight_config=layers,
                    num_bits=bits,
                    group_size=config.block_size,
                    scheme=scheme,
                    accuracy_level=level,
                    algorithm="k_quant",
                )
    except Exception as e:
        raise PassFailed(
            ctx.step_name, f"{config.algorithm} weight-only quantization failed: {type(e).__name__}: {str(e)[:300]}"
        ) from None
    out = model.model
    if not any(o.domain == "com.microsoft" for o in out.opset_import):
        out.opset_import.append(onnx_opset("com.microsoft", 1))
    return out


def onnx_opset(domain: str, version: int):
    from onnx import helper

    return helper.make_opsetid(domain, version)


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


CALIBRATED = ("gptq", "awq")  # the algorithms that read the decoder's text
CALIBRATION_WINDOWS = 16  # calibration windows when data.calibration.samples is unset


def calibration_for(model, config, ctx) -> list[dict] | None:
    """GPTQ's / AWQ's calibration feeds (windows of the decoder's text), read once per pass; None for the others."""
    if config.algorithm not in CALIBRATED:
        return None
    from optcli.passes.quantize.decoder import calibration_feeds

    source = getattr(ctx.recipe.data, "calibration", None)
    samples = (source.samples if source is not None else None) or CALIBRATION_WINDOWS
    return calibration_feeds(Path(model.path).parent, ctx, samples)


def activation_aware(proto, config, exclude: set[str], ctx, calibration: list[dict] | None) -> dict | None:
    """algorithm: awq: proto's int4 MatMul weights scaled and clipped in place (awq.py), once per pass, before any
    write (the mixed search's backups then quantize the scaled weights: the float graph is the same); the record
    for details.weight_only.awq. None for the other algorithms."""
    if config.algorithm != "awq":
        return None
    if not calibration:
        raise PassFailed(ctx.step_name, "AWQ needs calibration text (data.calibration.text or data.eval.text)")
    from optcli.passes.quantize.awq import apply

    role = roles(proto, config, ("MatMul",))
    int4 = set(matmul_weights(proto, exclude | role.int8 | role.fp32))
    try:
        return apply(proto, int4, calibration, config.block_size, config.symmetric, Path(ctx.step_dir), ctx.log)
    except Exception as e:  # ORT's session errors (Fail, InvalidGraph ..) derive from Exception only
        raise PassFailed(ctx.step_name, f"awq failed: {type(e).__name__}: {str(e)[:300]}") from None


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
        "lm_head": config.lm_head,
        "embeddings": config.embeddings,
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
