"""int8 quantization of an ONNX model with onnxruntime.quantization (dynamic, or static QDQ with calibration).

The pass itself; the int8 write is ort.py, the accuracy-aware search search.py, SmoothQuant smoothquant.py.
"""

from __future__ import annotations

import shutil

from optcli.errors import PassFailed
from optcli.model import fixed_batch
from optcli.passes.base import Context, PassSpec
from optcli.passes.quantize.config import Config

# int8 settings each hardware target runs well, applied to the keys a recipe leaves unset.
TARGET_PRESETS = {
    # TensorRT reads explicit QDQ and wants symmetric int8 on both sides (S8S8), weights per channel.
    "tensorrt": {
        "mode": "static",
        "activation_type": "int8",
        "weight_type": "int8",
        "symmetric_activation": True,
        "per_channel": True,
    },
    "openvino": {"mode": "static"},  # OpenVINO takes QDQ graphs and fuses them itself
}


def for_target(config: Config, target: str) -> Config:
    """The config with the target's preset filled into the keys the recipe did not set."""
    if config.weights is not None or config.target is not None:
        return config
    preset = {k: v for k, v in TARGET_PRESETS.get(target, {}).items() if k not in config.model_fields_set}
    return config.model_copy(update=preset) if preset else config


def check(config: Config, recipe, input_format: str) -> None:
    target = recipe.report.target
    if (
        target == "tensorrt"
        and config.weights is None
        and config.mode == "dynamic"
        and "mode" in config.model_fields_set
    ):
        raise ValueError(
            "report.target tensorrt runs static QDQ int8 only: drop mode: dynamic (the preset is static S8S8)"
        )
    preset_mode = target in TARGET_PRESETS and "mode" not in config.model_fields_set
    config = for_target(config, target)
    if config.target is not None:
        if recipe.data.eval is None:
            raise ValueError("target needs data.eval (the inputs the metric is measured on; cosine needs no labels)")
        if config.search.modes == ["static"] and recipe.data.calibration is None:
            raise ValueError("search.modes: [static] needs data.calibration; add it or include dynamic")
        return
    if config.mode == "static" and recipe.data.calibration is None:
        raise ValueError(
            "static quantization needs calibration data: add data.calibration (path: ..., samples: 128) or use mode: dynamic"
            + (f" (report.target {target} presets mode: static)" if preset_mode else "")
        )


def _calibration_batches(model, config: Config, ctx: Context) -> list[dict]:
    data = ctx.data.calibration
    batch = fixed_batch(model.inputs) or min(data.batch_size, 32)
    return [feeds for feeds, _ in data.batches(batch_size=batch, limit=config.calibration.samples)]


def apply(model, config: Config, ctx: Context):
    import onnx

    from optcli.passes.quantize.ort import Settings, count_quant_ops, preprocess, quantize_onnx, resolve_exclude

    if config.weights is not None:
        return _weight_only(model, config, ctx)
    target = ctx.recipe.report.target
    preset = for_target(config, target)
    if preset is not config:
        ctx.details["target_preset"] = {
            "target": target,
            **{k: getattr(preset, k) for k in TARGET_PRESETS[target] if k not in config.model_fields_set},
        }
        config = preset
    if target == "cuda":
        ctx.warn(
            "int8 on the plain CUDA execution provider is often slower than fp32 (onnxruntime issue #24807): "
            "compare the latency rows, or use report.target: tensorrt"
        )
    work = ctx.step_dir / "work"
    work.mkdir(exist_ok=True)
    source = preprocess(model.path, work / "preprocessed.onnx", ctx) if config.preprocess else model.path
    proto = onnx.load(str(source), load_external_data=False)
    exclude = resolve_exclude(proto, config.exclude, ctx)
    del proto  # an inline model's weights: the quantizer loads its own copy
    target = ctx.step_dir / "model.onnx"
    has_calibration = ctx.data.calibration is not None
    calib = _calibration_batches(model, config, ctx) if has_calibration else None
    if config.target is not None:
        from optcli.passes.quantize.search import run_search

        run_search(model, config, ctx, source, target, exclude, calib)
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
    ctx.details["quantized_ops"] = count_quant_ops(target)
    shutil.rmtree(work, ignore_errors=True)
    return model.with_(path=target)


def _weight_only(model, config: Config, ctx: Context):
    import onnx

    from optcli.passes.quantize.ort import resolve_exclude
    from optcli.passes.quantize.weight_only import quantize_weights

    exclude = resolve_exclude(onnx.load(str(model.path), load_external_data=False), config.exclude, ctx)
    target = ctx.step_dir / "model.onnx"
    ctx.details["weight_only"] = quantize_weights(model.path, target, config, exclude, ctx)
    return model.with_(path=target)


def _eval_head(ctx: Context, model, samples: int) -> list[dict]:
    """SmoothQuant needs activation ranges; without data.calibration they come from data.eval."""
    data = ctx.data.eval
    if data is None:
        raise PassFailed(
            ctx.step_name, "smoothquant needs data.calibration (or data.eval) to measure activation ranges"
        )
    batch = fixed_batch(model.inputs) or min(data.batch_size, 32)
    return [feeds for feeds, _ in data.batches(batch_size=batch, limit=samples)]


PASS = PassSpec(
    type="quantize",
    config=Config,
    consumes=frozenset({"onnx"}),
    apply=apply,
    check=check,
    summary="int8 with onnxruntime.quantization: dynamic, or static QDQ calibrated on data.calibration; int4/int8 weight-only (MatMulNBits)",
)
