"""int8 quantization of an ONNX model with onnxruntime.quantization (dynamic, or static QDQ with calibration).

The pass itself; the int8 write is ort.py, the accuracy-aware search search.py, SmoothQuant smoothquant.py.
"""

from __future__ import annotations

import shutil

from optcli.errors import PassFailed
from optcli.model import fixed_batch
from optcli.passes.base import Context, PassSpec
from optcli.passes.quantize.config import Config


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

    from optcli.passes.quantize.ort import Settings, count_quant_ops, preprocess, quantize_onnx, resolve_exclude

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
    makes_int8=True,
    summary="int8 with onnxruntime.quantization: dynamic, or static QDQ calibrated on data.calibration",
)
