"""int8 quantization of an ONNX model with onnxruntime.quantization (dynamic, or static QDQ with calibration).

The pass itself; the int8 write is ort.py, the accuracy-aware search search.py, SmoothQuant smoothquant.py.
"""

from __future__ import annotations

import shutil

from optcli.errors import PassFailed
from optcli.model import fixed_batch
from optcli.passes.base import Context, PassSpec
from optcli.passes.quantize.config import Config

# Below this many elements int8 weights save less than the scales and Q/DQ nodes they add.
MIN_WEIGHT_ELEMENTS = 256
WEIGHT_DTYPES = (1, 10, 11, 16)  # float, float16, double, bfloat16


def largest_weight(proto) -> int:
    """Elements of the largest float initializer: what int8 could shrink."""
    import math

    return max((math.prod(t.dims) for t in proto.graph.initializer if t.data_type in WEIGHT_DTYPES), default=0)


def _kept_input(ctx: Context, path):
    """What a skipped quantize keeps: the user's own file when only preparation ran before (its shape annotations
    would make a tiny graph bigger), else the step's input."""
    index = int(ctx.step_name.split("-")[0])
    before = [p.type for p in ctx.recipe.passes[: index - 1]]
    original = ctx.reference
    if original.format == "onnx" and original.path is not None and all(t == "prepare" for t in before):
        return original.path
    return path


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
    if config.weights is not None and config.ratio < 1 and recipe.data.eval is None:
        raise ValueError(
            "ratio < 1 ranks MatMuls by how far their low-bit weights move the outputs: add data.eval (inputs only; "
            "the cosine to the original needs no labels)"
        )
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


def calibration_samples(config: Config, recipe, available: int, where: str) -> tuple[int, int, str]:
    """Calibration samples (requested, used), and a warning when fewer than the recipe asked for are used.

    One knob governs: the pass's calibration.samples when written, else data.calibration.samples, else 128.
    """
    data_ask = recipe.data.calibration.samples if recipe.data.calibration is not None else None
    pass_set = "samples" in config.calibration.model_fields_set
    wanted = config.calibration.samples if pass_set or data_ask is None else data_ask
    used = min(wanted, available)
    note = ""
    if pass_set and data_ask is not None and config.calibration.samples < data_ask:
        note = f"calibration: {data_ask} samples requested (data.calibration.samples), {used} used (calibration.samples of {where})"
    elif used < wanted:
        asked = f"calibration.samples of {where}" if pass_set or data_ask is None else "data.calibration.samples"
        note = f"calibration: {wanted} samples requested ({asked}), {used} used (all that data.calibration holds)"
    return wanted, used, note


def _calibration_batches(model, config: Config, ctx: Context) -> list[dict]:
    data = ctx.data.calibration
    batch = fixed_batch(model.inputs) or min(data.batch_size, 32)
    wanted, used, note = calibration_samples(config, ctx.recipe, len(data), ctx.step_name)
    if note:
        ctx.warn(note)
    ctx.details["calibration_samples_requested"] = wanted
    return [feeds for feeds, _ in data.batches(batch_size=batch, limit=used)]


def apply(model, config: Config, ctx: Context):
    import onnx

    from optcli.onnx_check import place
    from optcli.passes.quantize.isa import choose_int8
    from optcli.passes.quantize.ort import Settings, count_quant_ops, preprocess, quantize_onnx, resolve_exclude

    if config.weights is not None:
        return _weight_only(model, config, ctx)
    target = ctx.recipe.report.target
    preset = for_target(config, target)
    preset_keys = frozenset()
    if preset is not config:
        preset_keys = frozenset(k for k in TARGET_PRESETS[target] if k not in config.model_fields_set)
        ctx.details["target_preset"] = {"target": target, **{k: getattr(preset, k) for k in preset_keys}}
        config = preset
    int8 = choose_int8(config, target, preset_keys)
    ctx.details["int8"] = int8.record()
    if int8.contradiction():
        ctx.warn(int8.contradiction())
    if target == "cuda":
        ctx.warn(
            "int8 on the plain CUDA execution provider is often slower than fp32 (onnxruntime issue #24807): "
            "compare the latency rows, or use report.target: tensorrt"
        )
    work = ctx.step_dir / "work"
    work.mkdir(exist_ok=True)
    source = preprocess(model.path, work, ctx) if config.preprocess else model.path
    proto = onnx.load(str(source), load_external_data=False)
    exclude = resolve_exclude(proto, config.exclude, ctx)
    largest = largest_weight(proto)
    convs = any(n.op_type in ("Conv", "ConvTranspose") for n in proto.graph.node)
    if (
        config.target is None
        and config.mode == "dynamic"
        and convs
        and (not config.op_types or "Conv" in config.op_types)
    ):
        ctx.warn(
            "dynamic int8 on Conv emits ConvInteger, which has no fast kernel in ONNX Runtime (issue #12854): expect it "
            "slower than fp32; use mode: static with data.calibration, or a target to search for int8 that pays"
        )
    del proto  # an inline model's weights: the quantizer loads its own copy
    if largest <= MIN_WEIGHT_ELEMENTS:
        # Q/DQ pairs and scales around activations alone make such a graph bigger and slower, never smaller.
        note = f"nothing to quantize here (no weight tensor above {MIN_WEIGHT_ELEMENTS} elements): the input is kept"
        ctx.details["skipped"] = note
        ctx.warn(note)
        kept = place(_kept_input(ctx, model.path), ctx.step_dir, move=False)
        shutil.rmtree(work, ignore_errors=True)
        return model.with_(path=kept)
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
        if ctx.details.get("per_channel_off"):
            ctx.warn(f"per-tensor int8 used: {ctx.details['per_channel_off']}")
        for note in (ctx.details.get("kept_fp32") or {}).values():
            ctx.warn(note)
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
    if config.target is not None:
        from optcli.passes.quantize.weight_mix import run_search

        ctx.details["weight_only"] = run_search(model, config, ctx, model.path, target, exclude)
    else:
        ctx.details["weight_only"] = quantize_weights(model, target, config, exclude, ctx)
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


def preflight(config: Config, recipe, model) -> None:
    """A CNN's search tries static int8 only (dynamic Conv is ConvInteger, slower than fp32): it needs calibration."""
    if config.target is None or recipe.data.calibration is not None or model.format != "onnx" or model.path is None:
        return
    import onnx

    from optcli.errors import BadInput

    graph = onnx.load(str(model.path), load_external_data=False).graph
    if any(n.op_type in ("Conv", "ConvTranspose") for n in graph.node):
        raise BadInput(
            "quantize target on a CNN needs data.calibration (static int8; dynamic int8 on Conv is slower than fp32): "
            "add data.calibration: {path: samples.npz, samples: 128}"
        )


PASS = PassSpec(
    type="quantize",
    config=Config,
    consumes=frozenset({"onnx"}),
    apply=apply,
    check=check,
    preflight=preflight,
    makes_int8=True,
    summary="int8 with onnxruntime.quantization: dynamic, or static QDQ calibrated on data.calibration; int4/int8 weight-only (MatMulNBits)",
)
