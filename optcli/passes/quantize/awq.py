"""AWQ (activation-aware weight quantization, Lin et al. 2023) of a decoder's int4 MatMuls, on the float ONNX graph.

No library installable here does it on CPU with numpy 2 (docs/llm-int4.md says which were tried), so this follows
the published algorithm as AutoAWQ implements it (awq/quantize/quantizer.py: `_search_best_scale` /
`_compute_best_scale` with its default duo_scaling, `_compute_best_clip`; awq/models/qwen2.py for which layers share
a scale) and Intel Neural Compressor 2.6's ONNX port (adaptor/ox_utils/weight_only.py: `awq_quantize`,
`apply_awq_scale`, `apply_awq_clip`) for where the scale goes in an ONNX graph:

1. Each MatMul's input is read on the calibration windows (extra graph outputs in ONNX Runtime): mean |x| per input
   channel over every token, and an evenly spread sample of rows for the losses.
2. MatMuls sharing one input form a group (packed qkv, gate+up, down). For alpha in 0, 0.05 .. 0.95,
   s = mean|x|^alpha / mean|w|^(1-alpha), normalised to a geometric mean of 1; W·diag(s) goes through the very
   blockwise quantizer that writes the MatMulNBits afterwards (ONNX Runtime's DefaultWeightOnlyQuantizer, same block
   size and symmetry), and the s whose X·Q(W·s)/s is closest to X·W on the sample is kept.
3. 1/s is folded into what produces the input, so the float graph computes the same thing and no op is added: the
   (Skip)SimplifiedLayerNormalization's gamma, or, for down_proj, up_proj's output columns (the Mul feeding
   down_proj scales channel by channel). A group whose input comes from anything else (o_proj after
   GroupQueryAttention, whose heads share v_proj's columns; AutoAWQ skips o_proj there too), or whose weight is read
   elsewhere as well (a tied lm_head: the embedding table reads it), is left alone and the report says why.
4. Clipping (AutoAWQ's auto_clip): per block, the largest |w| is shrunk by up to half in 10 steps of 5 % where that
   lowers the block's share of the output error on up to 512 sampled tokens; q and k are not clipped (AutoAWQ: the
   q·k product makes that error a poor guide).
ONNX Runtime's round-to-nearest then writes the scaled, clipped graph (weight_only.write): the artifact has rtn's
format exactly.

Where this departs from AutoAWQ, and why: the loss is each MatMul's own output (INC's choice), not the whole
attention / MLP block's, because running GroupQueryAttention and rotary in numpy would be a second decoder to keep
right; s = 1 (plain RTN) is one more candidate, so no group gets worse on the sample; down_proj is searched before
gate/up so that gate/up's search quantizes up_proj's final columns (AutoAWQ searches a layer's groups on the original
weights, then scales them all).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

GRID = 20  # alphas 0, 0.05, .., 0.95 (AutoAWQ's n_grid)
CLIP_GRID = 20  # the clip shrinks by 1/20 a step ..
CLIP_STEPS = 10  # .. down to half the block's max (AutoAWQ's max_shrink 0.5)
CLIP_TOKENS = 512  # tokens the clip search reads (AutoAWQ's n_sample_token)
CLIP_COLUMNS = 256  # output columns scored at once (bounds the [blocks, tokens, columns] partial outputs)
MAX_ROWS = 4096  # sampled rows per group input for the scale search
SAMPLE_FLOATS = 256 * 2**20  # every group's sample together: at most 1 GiB of float32 (fewer rows on large models)
NORMS = {"SimplifiedLayerNormalization": 1, "SkipSimplifiedLayerNormalization": 2}  # op -> gamma's input index
ATTENTION = ("GroupQueryAttention", "MultiHeadAttention", "Attention")


@dataclass
class Group:
    """MatMuls reading one input, and where 1/s goes: a norm's gamma or a producing MatMul's output columns."""

    source: str  # the tensor the MatMuls read
    matmuls: list[Any]  # NodeProto; every member is scaled
    int4: list[Any]  # the members written int4: the loss is theirs
    fold_into: str  # the initializer divided by s
    fold_kind: str  # "gamma" | "columns"
    scale: np.ndarray | None = None  # the chosen s (None: left as it was)
    record: dict[str, Any] = field(default_factory=dict)


def qdq(weight: np.ndarray, block: int, symmetric: bool) -> np.ndarray:
    """weight [K, N] after ONNX Runtime's blockwise int4 round trip: its own quantizer (what write() runs), unpacked."""
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        DefaultWeightOnlyQuantizer,
    )

    k, n = weight.shape
    quantizer = DefaultWeightOnlyQuantizer(DefaultWeightOnlyQuantConfig(block_size=block, is_symmetric=symmetric))
    with np.errstate(divide="ignore", invalid="ignore"):  # an all-zero block: see weight_only._run
        packed, scales, zero_points = quantizer.qbits_block_quant(np.ascontiguousarray(weight, dtype=np.float32))
    blocks = packed.shape[1]
    q = np.empty((n, blocks, packed.shape[2] * 2), dtype=np.float32)
    q[..., 0::2] = packed & 0x0F  # two 4-bit values a byte, the first in the low nibble
    q[..., 1::2] = packed >> 4
    if symmetric:
        zero = np.full((n, blocks), 8.0, dtype=np.float32)  # MatMulNBits without zero points reads 8
    else:
        nibbles = np.stack([zero_points & 0x0F, zero_points >> 4], axis=-1).reshape(n, -1)
        zero = nibbles[:, :blocks].astype(np.float32)
    values = (q[..., :block] - zero[..., None]) * scales[..., None].astype(np.float32)
    return np.ascontiguousarray(values.reshape(n, blocks * block)[:, :k].T)


def find_groups(proto, int4: set[str]) -> tuple[list[Group], dict[str, str]]:
    """The MatMul groups whose 1/s folds exactly into the float graph, and, for those left alone, why."""
    from onnx import TensorProto

    from optcli.onnxgraph import links

    inits = {t.name: t for t in proto.graph.initializer}
    producer, consumers = links(proto.graph.node)

    def own_weight(node) -> bool:
        t = inits.get(node.input[1]) if len(node.input) == 2 else None
        return (
            t is not None
            and t.data_type == TensorProto.FLOAT
            and len(t.dims) == 2
            and len(consumers.get(node.input[1], [])) == 1
            and node.input[1] not in {o.name for o in proto.graph.output}
        )

    by_source: dict[str, list] = {}
    for node in proto.graph.node:
        if node.op_type == "MatMul" and len(node.input) == 2 and node.input[0] not in inits:
            by_source.setdefault(node.input[0], []).append(node)
    found, skipped = [], {}
    for source, matmuls in by_source.items():
        members = [m for m in matmuls if m.name in int4]
        if not members:
            continue
        label = ", ".join(m.name for m in matmuls)
        readers = consumers.get(source, [])
        if not all(own_weight(m) for m in matmuls):
            skipped[label] = "a weight is read elsewhere too (a tied lm_head: the embedding table) or is not float"
            continue
        if len(readers) != len(matmuls):
            others = sorted({n.op_type for n in readers if n not in matmuls})
            skipped[label] = f"its input also feeds {', '.join(others)}: 1/s has nowhere exact to go"
            continue
        fold = _fold(producer.get(source), source, inits, producer, consumers, own_weight)
        if isinstance(fold, str):
            skipped[label] = fold
            continue
        found.append(Group(source, matmuls, members, *fold))
    # down_proj (folded into up_proj's columns) first, so the gate/up search quantizes up_proj's final weights
    found.sort(key=lambda g: g.fold_kind != "columns")
    return found, skipped


def _fold(node, source: str, inits, producer, consumers, own_weight) -> tuple[str, str] | str:
    """(initializer, kind) that 1/s folds into exactly, or why there is none."""
    if node is None:
        return "its input is a graph input"
    if node.op_type in NORMS and node.output[0] == source:
        gamma = node.input[NORMS[node.op_type]]
        if gamma in inits and len(consumers.get(gamma, [])) == 1:
            return gamma, "gamma"
        return f"{node.op_type}'s gamma is not a weight of its own"
    if node.op_type == "Mul" and len(node.input) == 2 and node.input[0] != node.input[1]:
        # x = a * (h @ W_up): dividing W_up's columns by s divides x by s (SwiGLU's up_proj before down_proj)
        for name in node.input:
            up = producer.get(name)
            if up is not None and up.op_type == "MatMul" and own_weight(up) and len(consumers.get(name, [])) == 1:
                return up.input[1], "columns"
        return "its input is a Mul with no MatMul output read by it alone"
    if node.op_type in ATTENTION:
        return (
            f"its input is {node.op_type}'s output: s would go into v_proj's columns, which grouped-query heads "
            "share (AutoAWQ skips o_proj there too)"
        )
    return f"its input comes from {node.op_type}, which 1/s does not fold into exactly"


def capture(proto, sources: list[str], calibration: list[dict], rows: int, work: Path) -> tuple[dict, dict]:
    """Per source tensor: mean |x| per channel over every calibration token, and about `rows` evenly spread rows."""
    from optcli.passes.quantize.activations import tensor_values

    per_window = max(1, math.ceil(rows / max(1, len(calibration))))
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    picked: dict[str, list[np.ndarray]] = {name: [] for name in sources}
    for values in tensor_values(proto, sources, calibration, work):
        for name, value in zip(sources, values, strict=True):
            x = value.reshape(-1, value.shape[-1]).astype(np.float32, copy=False)
            sums[name] = sums.get(name, 0) + np.abs(x).sum(0, dtype=np.float64)
            counts[name] = counts.get(name, 0) + len(x)
            at = np.unique(np.linspace(0, len(x) - 1, min(per_window, len(x))).round().astype(int))
            picked[name].append(x[at].copy())
    means = {name: (sums[name] / counts[name]).astype(np.float32) for name in sources}
    return means, {name: np.concatenate(parts)[:rows] for name, parts in picked.items()}


def weight_mean(weight: np.ndarray, block: int) -> np.ndarray:
    """AutoAWQ's w_mean: |w| relative to its block's max (blocks along K, per output column), averaged per input
    channel."""
    k, n = weight.shape
    pad = -k % block
    w = np.abs(np.pad(weight, ((0, pad), (0, 0)))).reshape(-1, block, n)
    w = w / (w.max(axis=1, keepdims=True) + 1e-6)
    return w.reshape(-1, n)[:k].mean(axis=1)


def search_scale(
    x_mean: np.ndarray, x: np.ndarray, weight: np.ndarray, block: int, symmetric: bool
) -> tuple[np.ndarray | None, float | None, float, float]:
    """(s, alpha, error with plain RTN, error with s) for the input channels of `weight` [K, N]; s None: RTN won."""
    reference = x @ weight

    def error(w: np.ndarray) -> float:
        return float(np.mean(np.square(x @ w - reference)))

    rtn = error(qdq(weight, block, symmetric))
    w_mean = weight_mean(weight, block)
    best: tuple[np.ndarray | None, float | None, float] = (None, None, rtn)
    for step in range(GRID):
        alpha = step / GRID
        s = np.clip(np.power(x_mean, alpha) / (np.power(w_mean, 1 - alpha) + 1e-4), 1e-4, None)
        s = s / np.sqrt(s.max() * s.min())
        s[~np.isfinite(s)] = 1
        s = s.astype(np.float32)
        err = error(qdq(weight * s[:, None], block, symmetric) / s[:, None])
        if err < best[2]:
            best = (s, alpha, err)
    return best[0], best[1], rtn, best[2]


def search_clip(x: np.ndarray, weight: np.ndarray, block: int, symmetric: bool) -> tuple[np.ndarray, dict[str, float]]:
    """`weight` [K, N] with each block clipped to the max |w| that minimises its partial output error (AutoAWQ's
    _compute_best_clip), and what that did."""
    x = x[:: max(1, len(x) // CLIP_TOKENS)][:CLIP_TOKENS]
    k, n = weight.shape
    pad = -k % block
    blocks = (k + pad) // block
    xb = np.pad(x, ((0, 0), (0, pad))).reshape(len(x), blocks, block).transpose(1, 0, 2)  # [g, t, b]
    wb = np.pad(weight, ((0, pad), (0, 0))).reshape(blocks, block, n)  # [g, b, n]
    top = np.abs(wb).max(axis=1, keepdims=True)  # [g, 1, n]
    shrinks = [1 - i / CLIP_GRID for i in range(CLIP_STEPS)]
    quantized = []
    for r in shrinks:
        clipped = np.clip(wb, -top * r, top * r).reshape(-1, n)[:k]
        quantized.append(np.pad(qdq(clipped, block, symmetric), ((0, pad), (0, 0))).reshape(blocks, block, n))
    best = np.ones((blocks, n), dtype=np.float32)
    before = after = 0.0
    for c in range(0, n, CLIP_COLUMNS):
        cols = slice(c, c + CLIP_COLUMNS)
        reference = np.matmul(xb, wb[:, :, cols])  # [g, t, c]: each block's share of the output
        lowest = None
        for r, q in zip(shrinks, quantized, strict=True):
            err = np.square(np.matmul(xb, q[:, :, cols]) - reference).mean(axis=1)  # [g, c]
            if lowest is None:
                lowest = err
                before += float(err.sum())
                continue
            better = err < lowest
            lowest = np.where(better, err, lowest)
            best[:, cols][better] = r
        assert lowest is not None
        after += float(lowest.sum())
    out = np.clip(wb, -top * best[:, None, :], top * best[:, None, :]).reshape(-1, n)[:k]
    cells = x.shape[0] * n
    return out.astype(np.float32), {
        "mean_ratio": round(float(best.mean()), 4),
        "blocks_clipped": round(float((best < 1).mean()), 4),
        "block_error_before": before / cells,
        "block_error_after": after / cells,
    }


def _array(inits, name: str) -> np.ndarray:
    from onnx import numpy_helper

    return numpy_helper.to_array(inits[name]).astype(np.float32)


def _store(inits, name: str, value: np.ndarray) -> None:
    from onnx import numpy_helper

    inits[name].CopyFrom(numpy_helper.from_array(value.astype(np.float32), name))


def fold(proto, group: Group, s: np.ndarray) -> None:
    """W·diag(s) for every member, 1/s into the producer: the float graph computes what it did (in place)."""
    inits = {t.name: t for t in proto.graph.initializer}
    for node in group.matmuls:
        _store(inits, node.input[1], _array(inits, node.input[1]) * s[:, None])
    target = _array(inits, group.fold_into)
    _store(inits, group.fold_into, target / (s if group.fold_kind == "gamma" else s[None, :]))


def _feeds_q_or_k(node, consumers: dict) -> bool:
    """Whether the MatMul writes q or k (a packed qkv too), directly or through its bias Add: AutoAWQ does not clip
    those."""
    tensors = [node.output[0]]
    tensors += [r.output[0] for r in consumers.get(node.output[0], []) if r.op_type == "Add"]
    return any(
        reader.op_type in ATTENTION and t in reader.input[:2] for t in tensors for reader in consumers.get(t, [])
    )


def apply(proto, int4: set[str], calibration: list[dict], block: int, symmetric: bool, work: Path, log=None) -> dict:
    """Scale and clip `proto`'s int4 MatMul weights in place (AWQ); returns the report's record of it. `work`: where a
    graph past 2 GB is written for ONNX Runtime to read."""
    from optcli.onnxgraph import links

    t0 = time.perf_counter()
    found, skipped = find_groups(proto, int4)
    record: dict[str, Any] = {"windows": len(calibration), "groups": [], "skipped": skipped}
    if not found:
        record["seconds"] = round(time.perf_counter() - t0, 2)
        return record
    inits = {t.name: t for t in proto.graph.initializer}
    width = sum(int(inits[g.matmuls[0].input[1]].dims[0]) for g in found)
    rows = max(64, min(MAX_ROWS, SAMPLE_FLOATS // max(1, width)))
    means, samples = capture(proto, [g.source for g in found], calibration, rows, work)
    record["rows"] = int(min(len(v) for v in samples.values()))
    for group in found:
        start = time.perf_counter()
        weight = np.concatenate([_array(inits, m.input[1]) for m in group.int4], axis=1)
        s, alpha, rtn, err = search_scale(means[group.source], samples[group.source], weight, block, symmetric)
        if s is not None:
            fold(proto, group, s)
            group.scale = s
        group.record = {
            "matmuls": [m.name for m in group.matmuls],
            "fold": f"{group.fold_kind} of {group.fold_into}",
            "alpha": alpha,
            "error_rtn": rtn,
            "error_awq": err,
            "seconds": round(time.perf_counter() - start, 3),
        }
        if log is not None:
            log(f"awq: {group.record['matmuls'][0]}.. alpha {alpha}, output error {rtn:.4g} -> {err:.4g}")
    # Clipping after every scale is in: a column fold rewrites another group's weight, which must not be clipped yet.
    _, consumers = links(proto.graph.node)
    for group in found:
        start = time.perf_counter()
        x = samples[group.source] if group.scale is None else samples[group.source] / group.scale
        clip = {}
        for node in group.int4:
            if _feeds_q_or_k(node, consumers):
                continue
            clipped, clip[node.name] = search_clip(x, _array(inits, node.input[1]), block, symmetric)
            _store(inits, node.input[1], clipped)
        group.record["clip"] = clip
        group.record["seconds"] = round(group.record["seconds"] + time.perf_counter() - start, 3)
        record["groups"].append(group.record)
    record["seconds"] = round(time.perf_counter() - t0, 2)
    return record
