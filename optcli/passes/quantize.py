"""int8 quantization of an ONNX model with onnxruntime.quantization (dynamic, or static QDQ with calibration)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field

from optcli.config import StrictModel
from optcli.passes.base import Context, PassConfig, PassSpec


class Calibration(StrictModel):
    method: Literal["minmax", "entropy", "percentile"] = "minmax"
    samples: int = Field(default=128, ge=1, le=1_000_000, description="calibration samples read from data.calibration")
    percentile: float = Field(default=99.999, gt=0, le=100, description="for method: percentile")


class Config(PassConfig):
    type: Literal["quantize"] = "quantize"
    mode: Literal["dynamic", "static"] = Field(default="dynamic", description="dynamic: weights int8, activations at run time; static: QDQ with calibrated activations")
    per_channel: bool = False
    reduce_range: bool = Field(default=False, description="7-bit weights, for CPUs without VNNI")
    weight_type: Literal["int8", "uint8"] = "int8"
    activation_type: Literal["int8", "uint8"] = Field(default="uint8", description="static mode only")
    symmetric_activation: bool = False
    calibration: Calibration = Calibration()
    exclude: list[str] = Field(default_factory=list, description="node names or op types left in float")
    op_types: list[str] | None = Field(default=None, description="only quantize these op types (default: all ONNX Runtime supports)")
    preprocess: bool = Field(default=True, description="ONNX Runtime's quantization pre-processing (shape inference, graph optimization)")
    extra_options: dict[str, Any] = Field(default_factory=dict, description="passed through to onnxruntime.quantization")


def check(config: Config, recipe, input_format: str) -> None:
    if config.mode == "static" and recipe.data.calibration is None:
        raise ValueError("static quantization needs calibration data: add data.calibration (path: ..., samples: 128) or use mode: dynamic")


class _Reader:
    """Feeds calibration batches to onnxruntime's calibrator (a CalibrationDataReader)."""

    def __init__(self, batches: list[dict]):
        self._batches = batches
        self._it = iter(batches)

    def get_next(self):
        return next(self._it, None)

    def rewind(self):
        self._it = iter(self._batches)

    def set_range(self, start_index: int, end_index: int):  # used by some ORT calibrators
        self._it = iter(self._batches[start_index:end_index])


def _calibration_batches(model, config: Config, ctx: Context) -> list[dict]:
    data = ctx.data.calibration
    fixed = [s.shape[0] for s in model.inputs if not s.batch_dynamic and s.shape]
    batch = fixed[0] if fixed else min(data.batch_size, 32)
    return [feeds for feeds, _ in data.batches(batch_size=batch, limit=config.calibration.samples)]


def _preprocess(source: Path, target: Path, ctx: Context) -> Path:
    from onnxruntime.quantization.shape_inference import quant_pre_process

    try:
        quant_pre_process(str(source), str(target), skip_symbolic_shape=False)
        return target
    except Exception as e:  # pre-processing is an optimization; quantize the raw graph if it fails
        ctx.warn(f"quantization pre-processing skipped ({type(e).__name__}: {str(e)[:120]})")
        target.unlink(missing_ok=True)
        return source


def nonfinite_tensors(path: Path, batches: list[dict]) -> set[str]:
    """Float tensors that hold +-inf or NaN on calibration data (attention masks filled with -inf)."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, numpy_helper

    proto = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
    bad = {t.name for t in proto.graph.initializer if t.data_type == TensorProto.FLOAT and not np.isfinite(numpy_helper.to_array(t)).all()}
    float_names = {v.name for v in proto.graph.value_info if v.type.tensor_type.elem_type == TensorProto.FLOAT}
    outputs = {o.name for o in proto.graph.output}
    for node in proto.graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value" and attr.t.data_type == TensorProto.FLOAT and not np.isfinite(numpy_helper.to_array(attr.t)).all():
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
    for feeds in batches[:2]:
        for name, value in zip(names, session.run(None, feeds)):
            if value.dtype.kind == "f" and not np.isfinite(value).all():
                bad.add(name)
    return bad


def _nodes_touching(proto, tensors: set[str]) -> list[str]:
    return [n.name for n in proto.graph.node if n.name and (set(n.input) | set(n.output)) & tensors]


def apply(model, config: Config, ctx: Context):
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_dynamic, quantize_static

    from optcli.artifact import ONNX_EXTERNAL_THRESHOLD, artifact_files

    work = ctx.step_dir / "work"
    work.mkdir(exist_ok=True)
    source = _preprocess(model.path, work / "preprocessed.onnx", ctx) if config.preprocess else model.path
    proto = onnx.load(str(source), load_external_data=False)
    node_names = {n.name for n in proto.graph.node}
    op_types = {n.op_type for n in proto.graph.node}
    exclude = set()
    for item in config.exclude:
        if item in node_names:
            exclude.add(item)
        elif item in op_types:
            exclude.update(n.name for n in proto.graph.node if n.op_type == item)
        else:
            ctx.warn(f"exclude: {item!r} is neither a node name nor an op type in the graph (after pre-processing)")
    large = sum(f.stat().st_size for f in artifact_files(Path(source))) > ONNX_EXTERNAL_THRESHOLD
    target = ctx.step_dir / "model.onnx"
    qtype = {"int8": QuantType.QInt8, "uint8": QuantType.QUInt8}
    extra = dict(config.extra_options)
    if config.mode == "dynamic":
        quantize_dynamic(
            str(source), str(target), op_types_to_quantize=config.op_types, per_channel=config.per_channel,
            reduce_range=config.reduce_range, weight_type=qtype[config.weight_type],
            nodes_to_exclude=sorted(exclude), use_external_data_format=large, extra_options=extra,
        )
    else:
        batches = _calibration_batches(model, config, ctx)
        inf = nonfinite_tensors(Path(source), batches)
        if inf:
            touched = _nodes_touching(proto, inf)
            exclude.update(touched)
            ctx.warn(f"{len(inf)} tensors hold inf/NaN on calibration data (e.g. attention masks); left {len(touched)} nodes touching them in float: {', '.join(sorted(touched)[:5])}")
            ctx.details["nonfinite_tensors"] = sorted(inf)
        method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy, "percentile": CalibrationMethod.Percentile}
        if config.calibration.method == "percentile":
            extra.setdefault("CalibPercentile", config.calibration.percentile)
        extra.setdefault("ActivationSymmetric", config.symmetric_activation)
        if inf:
            # Ranges are still collected for every tensor of a quantizable op; keep the inf ones out of the calibrator.
            extra.setdefault("CalibTensorRangeSymmetric", False)
        quantize_static(
            str(source), str(target), _Reader(batches), quant_format=QuantFormat.QDQ, op_types_to_quantize=config.op_types,
            per_channel=config.per_channel, reduce_range=config.reduce_range, activation_type=qtype[config.activation_type],
            weight_type=qtype[config.weight_type], nodes_to_exclude=sorted(exclude), use_external_data_format=large,
            calibrate_method=method[config.calibration.method], extra_options=extra,
        )
        ctx.details["calibration_samples"] = sum(len(next(iter(b.values()))) for b in batches)
    ctx.details["excluded_nodes"] = sorted(exclude)
    ctx.details["quantized_ops"] = _count_quant_ops(target)
    for f in work.iterdir():
        f.unlink()
    work.rmdir()
    return model.with_(path=target)


def _count_quant_ops(path: Path) -> dict:
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    counts: dict[str, int] = {}
    for node in proto.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "MatMulInteger", "ConvInteger", "QLinearMatMul", "QLinearConv", "QGemm", "QAttention", "DynamicQuantizeMatMul") or node.op_type.startswith("QLinear"):
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


PASS = PassSpec(
    type="quantize",
    config=Config,
    consumes=frozenset({"onnx"}),
    apply=apply,
    check=check,
    summary="int8 with onnxruntime.quantization: dynamic, or static QDQ calibrated on data.calibration",
)
