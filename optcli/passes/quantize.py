"""int8 quantization of an ONNX model with onnxruntime.quantization (dynamic, or static QDQ with calibration)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import Field, model_validator

from optcli.config import StrictModel
from optcli.errors import PassFailed
from optcli.passes.base import Context, PassConfig, PassSpec


class Calibration(StrictModel):
    method: Literal["minmax", "entropy", "percentile"] = "minmax"
    samples: int = Field(default=128, ge=1, le=1_000_000, description="calibration samples read from data.calibration")
    percentile: float = Field(default=99.999, gt=0, le=100, description="for method: percentile")


class Target(StrictModel):
    """What the user can afford to lose; measured on data.eval against the original model."""

    metric: str = Field(
        default="cosine",
        description="cosine (fidelity vs the original, no labels needed) | accuracy | top5 | mse | module:callable(outputs, labels)",
    )
    max_drop: float | None = Field(
        default=None, ge=0, description="largest allowed drop vs the original (absolute; a rise for mse)"
    )
    min_value: float | None = Field(default=None, description="or: the lowest acceptable value of the metric")

    @model_validator(mode="after")
    def _one_bound(self) -> Target:
        if (self.max_drop is None) == (self.min_value is None):
            raise ValueError("give exactly one of max_drop (e.g. 0.01) or min_value (e.g. 0.995)")
        if self.metric not in ("cosine", "accuracy", "top5", "mse") and ":" not in self.metric:
            raise ValueError(f"metric {self.metric!r} is not cosine, accuracy, top5, mse or module:callable")
        if self.metric == "mse" and self.min_value is not None:
            raise ValueError("mse is lower-is-better: bound it with max_drop (the allowed rise)")
        if self.metric == "cosine" and self.min_value is not None and not -1 <= self.min_value <= 1:
            raise ValueError(f"a cosine lies in [-1, 1]; min_value {self.min_value} can never be met")
        return self


class Search(StrictModel):
    """The configurations tried when a target is given (each list is one axis of the grid)."""

    modes: list[Literal["dynamic", "static"]] = Field(
        default=["dynamic", "static"], min_length=1, description="static needs data.calibration"
    )
    per_channel: list[bool] = Field(default=[True, False], min_length=1)
    smoothquant: list[Annotated[float, Field(gt=0, le=1)] | None] = Field(
        default=[None, 0.5, 0.8], min_length=1, description="SmoothQuant alphas to try (null: no smoothing)"
    )
    calibration: list[Literal["minmax", "entropy", "percentile"]] = Field(
        default=["minmax"], min_length=1, description="calibration methods for static candidates"
    )
    fallback: bool = Field(
        default=True, description="fall back the most sensitive nodes to fp32 when a faster candidate misses the target"
    )
    max_fallback_fraction: float = Field(
        default=0.5, gt=0, le=1, description="most nodes (fraction of the quantizable ones) left in fp32"
    )
    sensitivity_samples: int = Field(
        default=64, ge=1, le=1_000_000, description="data.eval samples used to rank node sensitivity"
    )
    eval_samples: int | None = Field(
        default=None, ge=1, le=10_000_000, description="data.eval samples used to score candidates (default: all)"
    )
    latency_runs: int = Field(
        default=10, ge=1, le=10_000, description="timed runs per candidate (p50; batch and threads from report.latency)"
    )
    max_trials: int = Field(
        default=24, ge=1, le=10_000, description="int8 models written and measured, fallback included"
    )
    time_budget_s: float = Field(
        default=1800, gt=0, description="the search stops starting trials after this many seconds"
    )


class Config(PassConfig):
    type: Literal["quantize"] = "quantize"
    mode: Literal["dynamic", "static"] = Field(
        default="dynamic",
        description="dynamic: weights int8, activations at run time; static: QDQ with calibrated activations",
    )
    per_channel: bool = False
    reduce_range: bool = Field(default=False, description="7-bit weights, for CPUs without VNNI")
    weight_type: Literal["int8", "uint8"] = "int8"
    activation_type: Literal["int8", "uint8"] = Field(default="uint8", description="static mode only")
    symmetric_activation: bool = False
    calibration: Calibration = Calibration()
    smoothquant: float | None = Field(
        default=None,
        gt=0,
        le=1,
        description="SmoothQuant alpha: move activation outliers into the next MatMul's weights before int8 (null: off)",
    )
    exclude: list[str] = Field(default_factory=list, description="node names or op types left in float")
    op_types: list[str] | None = Field(
        default=None, description="only quantize these op types (default: all ONNX Runtime supports)"
    )
    preprocess: bool = Field(
        default=True, description="ONNX Runtime's quantization pre-processing (shape inference, graph optimization)"
    )
    extra_options: dict[str, Any] = Field(
        default_factory=dict, description="passed through to onnxruntime.quantization"
    )
    target: Target | None = Field(
        default=None,
        description="search for the fastest int8 model meeting this (mode/per_channel/calibration/smoothquant are then searched)",
    )
    search: Search = Search()
    allow_slower: bool = Field(
        default=False, description="with a target: keep an int8 model slower than fp32 (else the run fails its gate)"
    )


def check(config: Config, recipe, input_format: str) -> None:
    if config.target is not None:
        if recipe.data.eval is None:
            raise ValueError("target needs data.eval (the inputs the metric is measured on; cosine needs no labels)")
        if config.search.modes == ["static"] and recipe.data.calibration is None:
            raise ValueError("search.modes: [static] needs data.calibration; add it or include dynamic")
        return
    if config.mode == "static" and recipe.data.calibration is None:
        raise ValueError(
            "static quantization needs calibration data: add data.calibration (path: ..., samples: 128) or use mode: dynamic"
        )


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
        # Weights to a side file: an inline save fails past protobuf's 2 GB and costs ~2 GB more peak memory per GB of model.
        quant_pre_process(
            str(source),
            str(target),
            skip_symbolic_shape=False,
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            external_data_location=target.name + ".data",
        )
        return target
    except Exception as e:  # pre-processing is an optimization; quantize the raw graph if it fails
        ctx.warn(f"quantization pre-processing skipped ({type(e).__name__}: {str(e)[:120]})")
        target.unlink(missing_ok=True)
        return source


# Masks filled with finfo(float32).min (HF BERT) are finite but wreck a calibrated range as surely as -inf.
HUGE = 1e30


def _unusable(arr: np.ndarray) -> bool:
    return arr.size > 0 and (not np.isfinite(arr).all() or float(np.abs(arr).max()) >= HUGE)


def nonfinite_tensors(path: Path, batches: list[dict]) -> set[str]:
    """Float tensors that hold +-inf, NaN or |x| >= 1e30 on calibration data (attention masks)."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, numpy_helper

    proto = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
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
    for feeds in batches[:2]:
        for name, value in zip(names, session.run(None, feeds), strict=False):
            if value.dtype.kind == "f" and _unusable(value):
                bad.add(name)
    return bad


def _nodes_touching(proto, tensors: set[str]) -> list[str]:
    return [n.name for n in proto.graph.node if n.name and (set(n.input) | set(n.output)) & tensors]


def _resolve_exclude(proto, items: list[str], ctx: Context) -> set[str]:
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
    calib_batches: list[dict] | None,
    smooth_batches: list[dict] | None,
    ctx: Context,
    details: dict | None = None,
    cache: dict | None = None,
) -> dict:
    """Write one int8 model: optional SmoothQuant, then onnxruntime.quantization dynamic or static QDQ.

    `settings` is an optcli.quant_search.Settings (mode, per_channel, calibration, smooth_alpha, exclude, op_types);
    the remaining knobs (types, reduce_range, extra_options) come from the pass config. A search passes `cache`
    ({"dir": folder}) so the smoothed graph and the inf screen are computed once per source, not once per trial.
    """
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_dynamic, quantize_static

    from optcli.artifact import ONNX_EXTERNAL_THRESHOLD, artifact_files

    details = {} if details is None else details
    if settings.smooth_alpha is not None:
        from optcli.smoothquant import smooth

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
        source = smoothed
    exclude = set(settings.exclude)
    large = sum(f.stat().st_size for f in artifact_files(Path(source))) > ONNX_EXTERNAL_THRESHOLD
    qtype = {"int8": QuantType.QInt8, "uint8": QuantType.QUInt8}
    extra = dict(config.extra_options)
    op_types = list(settings.op_types) if settings.op_types else None
    if settings.mode == "dynamic":
        quantize_dynamic(
            str(source),
            str(target),
            op_types_to_quantize=op_types,
            per_channel=settings.per_channel,
            reduce_range=config.reduce_range,
            weight_type=qtype[config.weight_type],
            nodes_to_exclude=sorted(exclude),
            use_external_data_format=large,
            extra_options=extra,
        )
    else:
        key = ("inf", str(source))
        inf = cache[key] if cache is not None and key in cache else nonfinite_tensors(Path(source), calib_batches)
        if cache is not None:
            cache[key] = inf
        if inf:
            touched = _nodes_touching(onnx.load(str(source), load_external_data=False), inf)
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
        extra.setdefault("ActivationSymmetric", config.symmetric_activation)
        if inf:
            # Ranges are still collected for every tensor of a quantizable op; keep the inf ones out of the calibrator.
            extra.setdefault("CalibTensorRangeSymmetric", False)
        quantize_static(
            str(source),
            str(target),
            _Reader(calib_batches),
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=op_types,
            per_channel=settings.per_channel,
            reduce_range=config.reduce_range,
            activation_type=qtype[config.activation_type],
            weight_type=qtype[config.weight_type],
            nodes_to_exclude=sorted(exclude),
            use_external_data_format=large,
            calibrate_method=method[settings.calibration],
            extra_options=extra,
        )
    if settings.smooth_alpha is not None and cache is None:
        for f in artifact_files(Path(source)):
            f.unlink(missing_ok=True)
    details["excluded_nodes"] = sorted(exclude)
    return details


def apply(model, config: Config, ctx: Context):
    import onnx

    from optcli.quant_search import Settings

    work = ctx.step_dir / "work"
    work.mkdir(exist_ok=True)
    source = _preprocess(model.path, work / "preprocessed.onnx", ctx) if config.preprocess else model.path
    proto = onnx.load(str(source), load_external_data=False)
    exclude = _resolve_exclude(proto, config.exclude, ctx)
    del proto  # an inline model's weights: the quantizer loads its own copy
    target = ctx.step_dir / "model.onnx"
    has_calibration = ctx.data.calibration is not None
    calib = _calibration_batches(model, config, ctx) if has_calibration else None
    if config.target is not None:
        from optcli.quant_search import run_search

        run_search(model, config, ctx, source, target, exclude, calib, quantize_onnx)
    else:
        settings = Settings(
            config.mode,
            config.per_channel,
            config.calibration.method,
            config.smoothquant,
            frozenset(exclude),
            tuple(config.op_types) if config.op_types else None,
        )
        smooth_batches = calib or (
            _eval_head(ctx, model, config.calibration.samples) if config.smoothquant is not None else None
        )
        quantize_onnx(source, target, settings, config, calib, smooth_batches, ctx, ctx.details)
        if ctx.details.get("nonfinite_tensors"):
            touched = ctx.details.pop("nonfinite_nodes")
            ctx.warn(
                f"{len(ctx.details['nonfinite_tensors'])} tensors hold inf/NaN/huge values on calibration data (e.g. attention masks); "
                f"left {len(touched)} nodes touching them in float: {', '.join(touched[:5])}"
            )
        if calib is not None and config.mode == "static":
            ctx.details["calibration_samples"] = sum(len(next(iter(b.values()))) for b in calib)
    ctx.details["quantized_ops"] = _count_quant_ops(target)
    shutil.rmtree(work, ignore_errors=True)
    return model.with_(path=target)


def _eval_head(ctx: Context, model, samples: int) -> list[dict]:
    """SmoothQuant needs activation ranges; without data.calibration they come from data.eval."""
    data = ctx.data.eval
    if data is None:
        raise PassFailed(
            ctx.step_name, "smoothquant needs data.calibration (or data.eval) to measure activation ranges"
        )
    fixed = [s.shape[0] for s in model.inputs if not s.batch_dynamic and s.shape]
    return [
        feeds for feeds, _ in data.batches(batch_size=fixed[0] if fixed else min(data.batch_size, 32), limit=samples)
    ]


def _count_quant_ops(path: Path) -> dict:
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    counts: dict[str, int] = {}
    for node in proto.graph.node:
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


PASS = PassSpec(
    type="quantize",
    config=Config,
    consumes=frozenset({"onnx"}),
    apply=apply,
    check=check,
    summary="int8 with onnxruntime.quantization: dynamic, or static QDQ calibrated on data.calibration",
)
