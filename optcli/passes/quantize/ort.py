"""One int8 write with onnxruntime.quantization: pre-processing, the calibration reader, the inf screen, exclusions.

`quantize_onnx` is the only place the family calls ORT's quantizer; the pass and the search both go through it.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from optcli.onnxgraph import graph_view, load_model
from optcli.passes.base import Context
from optcli.passes.quantize.config import Config


@dataclass(frozen=True)
class Settings:
    """One int8 configuration (what quantize_onnx needs)."""

    mode: str = "dynamic"
    per_channel: bool = False
    calibration: str = "minmax"
    smooth_alpha: float | None = None
    exclude: frozenset[str] = frozenset()
    op_types: tuple[str, ...] | None = None
    # Set by the search's CNN candidates; None: the pass config's value.
    reduce_range: bool | None = None
    activation_symmetric: bool | None = None
    source: str = "input"  # which graph the search writes from: input | raw (no pre-processing) | folded (BN folded)
    tag: str = ""  # how the search made this candidate (latency-fallback, ...)

    def name(self) -> str:
        parts = [self.mode, "per-channel" if self.per_channel else "per-tensor"]
        if self.mode == "static":
            parts.append(self.calibration)
        if self.smooth_alpha is not None:
            parts.append(f"smooth{self.smooth_alpha:g}")
        if self.source == "folded":
            parts.insert(0, "bn-folded")
        if self.source == "raw":
            parts.append("no-preprocess")
        if self.op_types is not None and self.source == "folded":
            parts.append("+".join(o.lower() for o in self.op_types))
        elif self.source == "folded":
            parts.append("all-ops")
        if self.activation_symmetric:
            parts.append("sym-act")
        if self.reduce_range:
            parts.append("reduce-range")
        if self.exclude:
            parts.append(f"fp32x{len(self.exclude)}")
        if self.tag:
            parts.append(self.tag)
        return "/".join(parts)

    def summary(self) -> dict:
        out = {
            "mode": self.mode,
            "per_channel": self.per_channel,
            "smoothquant_alpha": self.smooth_alpha,
            "fp32_nodes": len(self.exclude),
        }
        if self.mode == "static":
            out["calibration"] = self.calibration
        if self.source != "input":
            out["source"] = self.source
        if self.op_types is not None:
            out["op_types"] = list(self.op_types)
        for key in ("reduce_range", "activation_symmetric"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        if self.tag:
            out["tag"] = self.tag
        return out


class CalibrationBatches:
    """The calibration data as batches made from the data source one at a time, afresh on every pass over it.

    Never a list of every batch: a search keeps its calibration data for all its trials, and ORT's calibrator only
    ever needs the batch it is running."""

    def __init__(self, make: Callable[[], Iterable[dict]], count: int, samples: int):
        self._make = make  # a new iterator over the batches on each call
        self.count = count  # batches per pass
        self.samples = samples

    def __iter__(self) -> Iterator[dict]:
        return iter(self._make())

    def __len__(self) -> int:
        return self.count


# One chunk of calibration batches may hold about this much in intermediate outputs. ORT's entropy and percentile
# calibrators keep every float tensor of every batch they are given until they histogram them; past this, the
# batches are fed in chunks (CalibStridedMinMax) and the histograms merged chunk by chunk.
CALIB_CHUNK_BYTES = 256 * 2**20


class CalibrationReader:
    """ONNX Runtime's CalibrationDataReader over calibration batches, each one made when the calibrator asks for it.

    Indexed by chunk (`chunk` batches each): with extra_options CalibStridedMinMax 1, quantize_static calls
    set_range(i, i + 1) and collect_data once per chunk, so the calibrator holds one chunk's outputs at a time."""

    def __init__(self, batches: CalibrationBatches | list[dict], chunk: int | None = None, on_batch=lambda: None):
        self._batches = batches
        self._chunk = chunk or max(len(batches), 1)
        self._on_batch = on_batch  # progress: one tick per batch handed over
        self.rewind()

    def __len__(self) -> int:
        return -(-len(self._batches) // self._chunk)

    def get_next(self):
        if self._pos >= self._stop:
            return None
        batch = next(self._it, None)
        if batch is not None:
            self._pos += 1
            self._on_batch()
        return batch

    def rewind(self):
        self._it, self._pos, self._stop = iter(self._batches), 0, len(self._batches)

    def set_range(self, start_index: int, end_index: int):
        first = start_index * self._chunk
        if first < self._pos:
            self.rewind()
        # ORT asks for the chunks in order: one pass over the data; skipping only happens out of order.
        while self._pos < first and next(self._it, None) is not None:
            self._pos += 1
        self._stop = min(end_index * self._chunk, len(self._batches))


def calibration_chunk(batch_bytes: int, batches: int, method: str, extra: dict) -> int | None:
    """Batches per chunk so one chunk's intermediate outputs stay near CALIB_CHUNK_BYTES; None: one chunk holds all.

    MinMax ranges are maxima and minima, the same whatever the chunking (its calibrator keeps only ReduceMin/ReduceMax
    outputs per batch anyway); a moving average is not, so with CalibMovingAverage MinMax is left in one chunk."""
    if "CalibStridedMinMax" in extra:
        return 1  # the recipe's own stride, counted in batches as ORT documents it
    if method == "minmax" and extra.get("CalibMovingAverage"):
        return None
    chunk = max(1, CALIB_CHUNK_BYTES // max(batch_bytes, 1))
    return chunk if chunk < batches else None


def preprocess(source: Path, work: Path, ctx: Context) -> Path:
    """ONNX Runtime's pre-processing of a graph optcli exported itself, as prepare's ladder (nothing lands in the cwd)."""
    from optcli.passes.quantize.prepare import preprocess_ladder

    path, record = preprocess_ladder(source, work, None, [], 1.0, "full", None)
    if record["rung"] != "full":
        ctx.warn(f"quantization pre-processing: rung {record['rung']} used ({'; '.join(record['tried'])})")
    return path


# Masks filled with finfo(float32).min (HF BERT) are finite but wreck a calibrated range as surely as -inf.
HUGE = 1e30


def _unusable(arr: np.ndarray) -> bool:
    return arr.size > 0 and (not np.isfinite(arr).all() or float(np.abs(arr).max()) >= HUGE)


def nonfinite_tensors(path: Path, batches: Iterable[dict]) -> tuple[set[str], int]:
    """Float tensors that hold +-inf, NaN or |x| >= 1e30 on calibration data (attention masks), and the bytes of
    every float tensor of one batch (what a histogram calibrator keeps per batch: it sizes the chunks)."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, numpy_helper

    proto = onnx.shape_inference.infer_shapes(load_model(path))
    bad = {
        t.name
        for t in proto.graph.initializer
        if t.data_type == TensorProto.FLOAT and _unusable(numpy_helper.to_array(t))
    }
    float_names = {v.name for v in proto.graph.value_info if v.type.tensor_type.elem_type == TensorProto.FLOAT}
    outputs = {o.name for o in proto.graph.output}
    for node in proto.graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if (
                    attr.name == "value"
                    and attr.t.data_type == TensorProto.FLOAT
                    and _unusable(numpy_helper.to_array(attr.t))
                ):
                    bad.add(node.output[0])
    produced = {o for node in proto.graph.node for o in node.output if o}
    # value_info can name tensors no node of the main graph produces (subgraphs, stale entries): ORT refuses those as outputs.
    extra = [n for n in float_names if n not in outputs and n in produced]
    proto.graph.output.extend(onnx.helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in extra)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    batch_bytes = 0
    for feeds in itertools.islice(batches, 2):
        batch_bytes = 0
        for name, value in zip(names, session.run(None, feeds), strict=False):
            if value.dtype.kind == "f":
                batch_bytes += value.nbytes
                if _unusable(value):
                    bad.add(name)
    return bad, batch_bytes


def nodes_touching(proto, tensors: set[str]) -> list[str]:
    return [n.name for n in proto.graph.node if n.name and (set(n.input) | set(n.output)) & tensors]


def resolve_exclude(proto, items: list[str], ctx: Context) -> set[str]:
    node_names = {n.name for n in proto.graph.node}
    op_types = {n.op_type for n in proto.graph.node}
    exclude = set()
    for item in items:
        if item in node_names:
            exclude.add(item)
        elif item in op_types:
            exclude.update(n.name for n in proto.graph.node if n.op_type == item)
        else:
            ctx.warn(f"exclude: {item!r} is neither a node name nor an op type in the graph (after pre-processing)")
    return exclude


def quantize_onnx(
    source: Path,
    target: Path,
    settings,
    config: Config,
    calib_batches: CalibrationBatches | list[dict] | None,
    smooth_batches: CalibrationBatches | list[dict] | None,
    ctx: Context,
    details: dict | None = None,
    cache: dict | None = None,
) -> dict:
    """Write one int8 model: optional SmoothQuant, then onnxruntime.quantization dynamic or static QDQ.

    `settings` is a Settings (mode, per_channel, calibration, smooth_alpha, exclude, op_types);
    the remaining knobs come from the pass config (types and reduce_range it leaves null: isa.py's choice for this
    CPU). A search passes `cache` ({"dir": folder}) so the smoothed graph and the inf screen are computed once per
    source, not once per trial, and calibration ranges once per calibration setting (ranges_file). Calibration
    batches are read lazily (CalibrationBatches) and, past CALIB_CHUNK_BYTES of intermediate outputs, fed to ORT
    chunk by chunk.
    """
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static

    from optcli.artifact import ONNX_EXTERNAL_THRESHOLD, artifact_files
    from optcli.passes.quantize.isa import choose_int8

    details = {} if details is None else details
    source, target = Path(source).resolve(), Path(target).resolve()  # the quantizer runs in a scratch cwd
    if settings.smooth_alpha is not None:
        source = smoothed_source(source, target, settings, calib_batches, smooth_batches, details, cache)
    exclude = set(settings.exclude)
    large = sum(f.stat().st_size for f in artifact_files(Path(source))) > ONNX_EXTERNAL_THRESHOLD
    qtype = {"int8": QuantType.QInt8, "uint8": QuantType.QUInt8}
    extra = dict(config.extra_options)
    op_types = list(settings.op_types) if settings.op_types else None
    per_channel = settings.per_channel and per_channel_allowed(source, details)
    int8 = choose_int8(
        config, ctx.recipe.report.target if ctx.recipe is not None else "cpu"
    )  # the types and reduce_range the recipe left to the CPU
    reduce_range = int8.reduce_range if settings.reduce_range is None else settings.reduce_range
    static = None
    if settings.mode == "static":
        static = static_setup(source, settings, config, calib_batches, op_types, exclude, extra, details, ctx, cache)

    def write(exclude: set[str]) -> None:
        if static is None:
            quantize_dynamic(
                str(source),
                str(target),
                op_types_to_quantize=op_types,
                per_channel=per_channel,
                reduce_range=reduce_range,
                weight_type=qtype[int8.weight_type],
                nodes_to_exclude=sorted(exclude),
                use_external_data_format=large,
                extra_options=extra,
            )
            return
        cached = static.ranges is not None and static.ranges.exists()
        title = f"{ctx.step_name}: calibration" + (" (ranges cached)" if cached else "")
        assert calib_batches is not None, "static_setup sized the calibration chunks from them"
        with ctx.progress.task(title, total=0 if cached else len(calib_batches or [])) as task:
            quantize_static(
                str(source),
                str(target),
                CalibrationReader(calib_batches, static.chunk, task.advance),
                quant_format=QuantFormat.QDQ,
                op_types_to_quantize=op_types,
                per_channel=per_channel,
                reduce_range=reduce_range,
                activation_type=qtype[int8.activation_type],
                weight_type=qtype[int8.weight_type],
                nodes_to_exclude=sorted(exclude),
                use_external_data_format=large,
                calibrate_method=static.method,
                extra_options=extra,
                calibration_cache_path=static.ranges,
            )

    write_with_fallback(write, source, target, exclude, details)
    if settings.smooth_alpha is not None and cache is None:
        for f in artifact_files(Path(source)):
            f.unlink(missing_ok=True)
    details["excluded_nodes"] = sorted(exclude)
    return details


def smoothed_source(source: Path, target: Path, settings, calib_batches, smooth_batches, details: dict, cache) -> Path:
    """The SmoothQuant-ed graph to quantize (once per source and alpha in a search, whose cache keeps it)."""
    from optcli.passes.quantize.smoothquant import smooth

    key = ("smooth", str(source), settings.smooth_alpha)
    if cache is None or key not in cache:
        smoothed = (
            cache["dir"] / f"smoothed_{settings.smooth_alpha:g}.onnx"
            if cache is not None
            else target.with_name("smoothed.onnx")
        )
        info = smooth(source, smoothed, smooth_batches or calib_batches or [], settings.smooth_alpha)
        if cache is None:
            details["smoothquant"] = info
        else:
            cache[key] = (smoothed, info)
    if cache is not None:
        smoothed, details["smoothquant"] = cache[key]
    return smoothed


def per_channel_allowed(source: Path, details: dict) -> bool:
    from optcli.onnx_check import MIN_OPSET, default_opset

    opset = default_opset(graph_view(source).proto)
    if opset < MIN_OPSET:
        # ORT writes per-axis DequantizeLinear for opset 11/12 anyway, a model it then refuses to load.
        details["per_channel_off"] = f"the graph is opset {opset}; per-channel int8 needs opset >= {MIN_OPSET}"
        return False
    return True


@dataclass(frozen=True)
class StaticSetup:
    method: object  # onnxruntime.quantization.CalibrationMethod
    chunk: int | None  # calibration batches per chunk (None: all in one)
    ranges: Path | None  # a search's file of this calibration's ranges (ORT's calibration cache)


def static_setup(source: Path, settings, config, calib_batches, op_types, exclude, extra, details, ctx, cache):
    """Static QDQ's calibration: nodes touching inf/NaN tensors kept float (added to `exclude`), the calibrator's
    options (added to `extra`), chunking past CALIB_CHUNK_BYTES and the search's cached ranges."""
    from onnxruntime.quantization import CalibrationMethod

    key, size_key = ("inf", str(source)), ("batch_bytes", str(source))
    if cache is not None and key in cache:
        inf, batch_bytes = cache[key], cache[size_key]
    else:
        inf, batch_bytes = nonfinite_tensors(Path(source), calib_batches)
    if cache is not None:
        cache[key], cache[size_key] = inf, batch_bytes
    if inf:
        touched = nodes_touching(graph_view(source).proto, inf)
        exclude.update(touched)
        details["nonfinite_tensors"] = sorted(inf)
        details["nonfinite_nodes"] = sorted(touched)
    method = {
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
    }
    if settings.calibration == "percentile":
        extra.setdefault("CalibPercentile", config.calibration.percentile)
    symmetric = config.symmetric_activation if settings.activation_symmetric is None else settings.activation_symmetric
    extra.setdefault("ActivationSymmetric", symmetric)
    if inf:
        # Ranges are still collected for every tensor of a quantizable op; keep the inf ones out of the calibrator.
        extra.setdefault("CalibTensorRangeSymmetric", False)
    chunk = calibration_chunk(batch_bytes, len(calib_batches), settings.calibration, extra)
    if chunk is not None and "CalibStridedMinMax" not in extra:
        extra["CalibStridedMinMax"] = 1  # one chunk of the reader per collect_data
        details["calibration_chunks"] = len(CalibrationReader(calib_batches, chunk))
    ranges = None
    if cache is not None:
        ranges = ranges_file(Path(cache["dir"]).resolve(), source, op_types, settings.calibration, chunk, extra)
    warned = ("warned", "CalibMaxIntermediateOutputs")
    if "CalibMaxIntermediateOutputs" in extra and (cache is None or warned not in cache):
        if cache is not None:
            cache[warned] = True  # once per search, not once per trial
        ctx.warn(
            "extra_options CalibMaxIntermediateOutputs: ONNX Runtime 1.32 clears the outputs it collected without "
            "merging them (onnxruntime issue #18893), so ranges come from the last samples only; drop it "
            "(optcli feeds calibration in chunks already)"
        )
    return StaticSetup(method[settings.calibration], chunk, ranges)


def ranges_file(folder: Path, source: Path, op_types, method: str, chunk: int | None, extra: dict) -> Path:
    """Where a search keeps the ranges of one calibration (ORT's calibration_cache_path: a small JSON, never the
    intermediate outputs). They depend on the graph, the tensors calibrated (op types), the method, the chunking and
    the calibrator's own options; not on what ORT reads after calibration (exclusions, per-channel, types,
    reduce_range, ActivationSymmetric), so the trials that differ only there reuse them instead of calibrating again."""
    import hashlib
    import json

    options = {k: extra[k] for k in sorted(extra) if k.startswith(("Calib", "SmoothQuant"))}
    key = json.dumps([str(source), method, sorted(op_types or []), chunk, options], default=str)
    return folder / f"ranges_{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"


def count_quant_ops(path: Path) -> dict:

    from optcli.onnx_check import all_nodes

    proto = graph_view(path).proto
    counts: dict[str, int] = {}
    for node in all_nodes(proto):  # If / Loop bodies too: dynamic int8 quantizes inside them
        if node.op_type in (
            "QuantizeLinear",
            "DequantizeLinear",
            "DynamicQuantizeLinear",
            "MatMulInteger",
            "ConvInteger",
            "QLinearMatMul",
            "QLinearConv",
            "QGemm",
            "QAttention",
            "DynamicQuantizeMatMul",
        ) or node.op_type.startswith("QLinear"):
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


MAX_FALLBACKS = 8


def write_with_fallback(write, source: Path, target: Path, exclude: set[str], details: dict) -> None:
    """Run the quantizer; when it breaks on a node (raises, or writes a model ONNX Runtime refuses), keep that node
    in fp32 with the reason in details["kept_fp32"] and try again. Raises what it cannot pin on one node."""
    import tempfile

    from optcli.onnx_check import reason, session
    from optcli.passes.quantize.fallback import culprit
    from optcli.passes.quantize.prepare import working_dir

    kept = details.setdefault("kept_fp32", {})
    proto = None
    while True:
        try:
            # ORT's quantizer and calibrator write temp models relative to the working directory.
            with tempfile.TemporaryDirectory(dir=target.parent) as scratch, working_dir(Path(scratch)):
                write(exclude)
            session(target)
            break
        except Exception as e:
            proto = proto or graph_view(source).proto
            blamed = culprit(proto, e)
            if blamed is None or blamed[0] in exclude or len(kept) >= MAX_FALLBACKS:
                raise
            exclude.add(blamed[0])
            kept[blamed[0]] = f"{blamed[1]} kept in fp32: ONNX Runtime's quantizer failed on it ({reason(e, 200)})"
            target.unlink(missing_ok=True)
    if not kept:
        details.pop("kept_fp32")
