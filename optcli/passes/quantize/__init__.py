"""int8 quantization of an ONNX model with onnxruntime.quantization (dynamic, or static QDQ with calibration).

The pass itself; the int8 write is ort.py, the accuracy-aware search search.py, SmoothQuant smoothquant.py.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from optcli.errors import PassFailed
from optcli.model import fixed_batch
from optcli.onnxgraph import graph_view
from optcli.passes.base import Context, PassSpec
from optcli.passes.quantize.config import Config
from optcli.passes.quantize.details import QuantizeDetails

# Below this many elements int8 weights save less than the scales and Q/DQ nodes they add.
MIN_WEIGHT_ELEMENTS = 256
WEIGHT_DTYPES = (1, 10, 11, 16)  # float, float16, double, bfloat16


def largest_weight(proto) -> int:
    """Elements of the largest float initializer, inside If / Loop bodies too: what int8 could shrink."""
    import math

    from optcli.onnx_check import all_initializers

    return max((math.prod(t.dims) for t in all_initializers(proto) if t.data_type in WEIGHT_DTYPES), default=0)


# Ops whose weights onnxruntime.quantization turns into int8 (the ones worth counting when they stay float).
QUANTIZABLE = ("MatMul", "Conv", "ConvTranspose", "Gemm", "Gather", "Attention", "LSTM", "GRU")


def float_weights_in_subgraphs(proto) -> tuple[int, int]:
    """(tensors, bytes) of float weights above MIN_WEIGHT_ELEMENTS read by a quantizable op inside an If / Loop /
    Scan body, whether the weight sits in the body or in an outer graph: what int8 left float there."""
    import math

    from optcli.onnx_check import all_initializers, subgraphs

    floats = {
        t.name: math.prod(t.dims) * (2 if t.data_type in (10, 16) else 8 if t.data_type == 11 else 4)
        for t in all_initializers(proto)
        if t.data_type in WEIGHT_DTYPES and math.prod(t.dims) > MIN_WEIGHT_ELEMENTS
    }
    used = {i for g in subgraphs(proto.graph) for n in g.node if n.op_type in QUANTIZABLE for i in n.input}
    names = used & floats.keys()
    return len(names), sum(floats[n] for n in names)


def has_subgraphs(proto) -> bool:
    from optcli.onnx_check import subgraphs

    return next(subgraphs(proto.graph), None) is not None


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
TARGET_PRESETS: dict[str, dict[str, Any]] = {
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


def _check_decoder(config: Config, input_format: str) -> None:
    """A decoder takes weight-only quantization (with a perplexity target) or dynamic int8 of its MatMuls."""
    perplexity = config.target is not None and config.target.metric == "perplexity"
    if input_format != DECODER_FORMAT:
        if perplexity:
            raise ValueError("target metric perplexity scores a decoder: put a decoder pass (precision: fp32) first")
        return
    if config.weights is None and (config.mode == "static" or config.target is not None or config.smoothquant):
        raise ValueError(
            "a decoder takes dynamic int8 (mode: dynamic, no target, no smoothquant) or weight-only quantization "
            "(weights: int4, a perplexity target); static int8 of its activations is not offered"
        )
    if config.target is not None and not perplexity:
        raise ValueError(f"a decoder's target is scored by perplexity: metric: perplexity, not {config.target.metric}")


def check(config: Config, recipe, input_format: str) -> None:
    _check_decoder(config, input_format)
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
    if config.weights is not None and config.algorithm in ("gptq", "awq") and input_format != DECODER_FORMAT:
        raise ValueError(
            f"algorithm: {config.algorithm} calibrates on a decoder's text (a decoder pass first); for other models "
            "use rtn or hqq"
        )
    if config.weights is not None and config.algorithm == "awq" and not _has_text(recipe):
        raise ValueError("algorithm: awq calibrates on text: set data.calibration.text (or data.eval.text)")
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


def _has_text(recipe) -> bool:
    return any(getattr(getattr(recipe.data, key, None), "text", None) is not None for key in ("calibration", "eval"))


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


def calibrates(config: Config) -> bool:
    """Whether the samples are used: static ranges, SmoothQuant's activation scales, or a search that may try static.
    Plain dynamic int8 measures its ranges at run time: a note on how many samples it "used" would be false."""
    return config.mode == "static" or config.smoothquant is not None or config.target is not None


# A calibration batch holds at most this much input when the model leaves the batch free: the calibrator's session
# holds the batch's activations (a 32-image batch at 320x320 took several GB), and ranges do not depend on batching.
CALIB_BATCH_INPUT_BYTES = 2**20


def calibration_batch_size(data, fixed: int | None) -> int:
    if fixed:
        return fixed
    axes = getattr(data, "axes", {})  # where an array holds its samples; None: one array fed whole with every batch
    per_sample = sum(
        v.nbytes // max(v.shape[axes.get(k, 0)], 1) for k, v in data.arrays.items() if axes.get(k, 0) is not None
    )
    return max(1, min(data.batch_size, 32, CALIB_BATCH_INPUT_BYTES // max(per_sample, 1)))


def _calibration_batches(model, config: Config, ctx: Context):
    """The calibration data as a CalibrationBatches: batches read lazily from data.calibration on each pass."""
    from optcli.passes.quantize.ort import CalibrationBatches

    data = ctx.data.calibration
    batch = calibration_batch_size(data, fixed_batch(model.inputs))
    wanted, used, note = calibration_samples(config, ctx.recipe, len(data), ctx.step_name)
    if note and calibrates(config):
        ctx.warn(note)
    ctx.details["calibration_samples_requested"] = wanted
    count = used if data.unbatched else -(-used // batch)  # Dataset.batches feeds unbatched inputs one sample at a time
    return CalibrationBatches(lambda: (feeds for feeds, _ in data.batches(batch_size=batch, limit=used)), count, used)


def apply(model, config: Config, ctx: Context):
    from optcli.onnx_check import place
    from optcli.passes.quantize.isa import choose_int8
    from optcli.passes.quantize.ort import count_quant_ops, preprocess, resolve_exclude

    if model.format == DECODER_FORMAT:
        return _decoder_step(model, config, ctx)
    if config.weights is not None:
        return _weight_only(model, config, ctx)
    target = ctx.recipe.report.target
    preset = for_target(config, target)
    preset_keys: frozenset[str] = frozenset()
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
    proto = graph_view(source).proto
    exclude = resolve_exclude(proto, config.exclude, ctx)
    largest = largest_weight(proto)
    into_bodies = has_subgraphs(proto) and "EnableSubgraph" not in config.extra_options
    if into_bodies:
        # ORT's dynamic quantizer reaches into If / Loop bodies only when asked (its static QDQ never does).
        config = config.model_copy(update={"extra_options": {**config.extra_options, "EnableSubgraph": True}})
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
        _quantize_once(model, config, ctx, source, target, exclude, calib, into_bodies)
    ctx.details["quantized_ops"] = count_quant_ops(target)
    _say_float_in_subgraphs(target, config.mode, ctx)
    shutil.rmtree(work, ignore_errors=True)
    return model.with_(path=target)


def _quantize_once(model, config: Config, ctx: Context, source, target, exclude: set[str], calib, into_bodies: bool):
    """The pass without a target: one int8 model as the recipe says, its warnings in ctx."""
    from optcli.passes.quantize.ort import Settings, quantize_onnx

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
    try:
        quantize_onnx(source, target, settings, config, calib, smooth_batches, ctx, ctx.details)
    except Exception as e:
        if not into_bodies:
            raise
        # Subgraph quantization is the younger path of ORT's quantizer: where it breaks, the bodies stay float
        # (and the count of what stayed float below says how much) rather than the whole step failing.
        from optcli.onnx_check import reason

        ctx.warn(
            f"int8 inside If/Loop/Scan bodies failed in ONNX Runtime's quantizer ({reason(e, 200)}): retried without"
        )
        options = {k: v for k, v in config.extra_options.items() if k != "EnableSubgraph"}
        config = config.model_copy(update={"extra_options": options})
        target.unlink(missing_ok=True)
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
        ctx.details["calibration_samples"] = calib.samples


def _say_float_in_subgraphs(path, mode: str, ctx: Context) -> None:
    """Weights inside If / Loop bodies that int8 did not reach: counted in the details and said in a warning."""
    proto = graph_view(path).proto
    if not has_subgraphs(proto):
        return
    count, nbytes = float_weights_in_subgraphs(proto)
    if not count:
        return
    static = mode == "static" or any(n.op_type == "QuantizeLinear" for n in proto.graph.node)  # a search's pick
    why = (
        "ONNX Runtime's static (QDQ) quantizer does not enter subgraphs; mode: dynamic quantizes them"
        if static
        else "ONNX Runtime's quantizer left them float"
    )
    ctx.details["float_weights_in_subgraphs"] = {"tensors": count, "bytes": nbytes}
    ctx.warn(f"{count} weight tensor(s) ({nbytes:,} bytes) inside If/Loop/Scan bodies stayed float: {why}")


def _weight_only(model, config: Config, ctx: Context):
    from optcli.passes.quantize.ort import resolve_exclude
    from optcli.passes.quantize.weight_only import nothing_done
    from optcli.passes.quantize.weight_pass import quantize_weights

    exclude = resolve_exclude(graph_view(model.path).proto, config.exclude, ctx)
    target = ctx.step_dir / "model.onnx"
    if config.target is not None:
        from optcli.passes.quantize.weight_mix import run_search

        ctx.details["weight_only"] = run_search(model, config, ctx, model.path, target, exclude)
    else:
        ctx.details["weight_only"] = quantize_weights(model, target, config, exclude, ctx)
    if nothing_done(ctx.details["weight_only"]):
        # The opset upgrade alone made the copy bigger: a no-op keeps the input's bytes, so no size gate trips on it.
        from optcli.artifact import artifact_files
        from optcli.onnx_check import place

        for f in artifact_files(target):
            f.unlink()
        details = ctx.details["weight_only"]
        details["opset"] = {"from": details["opset"]["from"], "to": details["opset"]["from"]}  # the upgrade is dropped
        ctx.details["skipped"] = details["skipped"]
        return model.with_(path=place(_kept_input(ctx, model.path), ctx.step_dir, move=False))
    return model.with_(path=target)


DECODER_FORMAT = "genai"  # optcli.llm.FORMAT: a decoder folder (model.onnx, genai_config.json, tokenizer)
DECODER_DIR = "decoder"  # the folder a decoder step writes, as the decoder pass names it


# A decoder's weight-only defaults where the recipe leaves them unset: the builder's int4 (symmetric blocks of 32,
# accuracy_level 4: int8 activations in the kernel, without which MatMulNBits decoded slower than fp32 here), an
# untied embedding table left float (as the builder leaves it: int4 there cost 10x the perplexity of all the MatMuls
# on the bench's model; a tied one shares the lm_head's quantized blocks, see share_tied_embeddings), and the lm_head in int8 (the largest, most output-sensitive MatMul: llama.cpp's Q4_K_M keeps
# it at 6 bits, the builder's k_quant_last in int8).
DECODER_DEFAULTS = {
    "block_size": 32,
    "symmetric": True,
    "accuracy_level": 4,
    "lm_head": "int8",
    "embeddings": "fp32",
}


def decoder_defaults(config: Config) -> Config:
    unset = {k: v for k, v in DECODER_DEFAULTS.items() if k not in config.model_fields_set}
    if config.op_types:
        unset.pop("embeddings", None)  # op_types says what is quantized
    if config.weights == "int8" or config.target is not None:
        unset.pop("lm_head", None)  # int8 weights: nothing to keep; a target: the search decides the lm_head
    filled = config.model_copy(update=unset)
    filled._written = frozenset(config.model_fields_set)
    return filled


def _decoder_step(model, config: Config, ctx: Context):
    """A decoder folder in, a decoder folder out: weight-only (int4 / int8, a perplexity target) or dynamic int8 of
    its model.onnx, with genai_config.json and the tokenizer files beside it."""
    from optcli.passes.quantize.decoder import copy_side_files, int8_dynamic
    from optcli.passes.quantize.isa import choose_int8
    from optcli.passes.quantize.ort import count_quant_ops

    folder = Path(model.path)
    out = ctx.step_dir / DECODER_DIR
    out.mkdir(parents=True, exist_ok=True)
    source = folder / "model.onnx"
    target = out / "model.onnx"
    if config.weights is not None:
        from optcli.passes.quantize.weight_mix import run_search
        from optcli.passes.quantize.weight_pass import quantize_weights

        config = decoder_defaults(config)
        ctx.details["decoder_defaults"] = {k: getattr(config, k) for k in DECODER_DEFAULTS}
        inner = model.with_(format="onnx", path=source)
        exclude = set(config.exclude)
        if config.target is not None:
            ctx.details["weight_only"] = run_search(inner, config, ctx, source, target, exclude)
        else:
            ctx.details["weight_only"] = quantize_weights(inner, target, config, exclude, ctx)
    else:
        int8 = choose_int8(config, ctx.recipe.report.target)
        ctx.details["int8"] = int8.record()
        ctx.details["decoder_int8"] = int8_dynamic(source, target, config, int8, ctx)
        ctx.details["quantized_ops"] = count_quant_ops(target)
    names = {f.name for f in out.iterdir()}
    ctx.details["decoder_files"] = copy_side_files(folder, out, names | {"model.onnx", "model.onnx.data"})
    return model.with_(path=out)


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
    from optcli.errors import BadInput

    if graph_view(model.path).by_op("Conv", "ConvTranspose"):
        raise BadInput(
            "quantize target on a CNN needs data.calibration (static int8; dynamic int8 on Conv is slower than fp32): "
            "add data.calibration: {path: samples.npz, samples: 128}"
        )


def machine_key(config: Config, recipe) -> str:
    """The int8 settings this CPU decides where the recipe left them unset (--resume reuses a step only for the same)."""
    if config.weights is not None:
        return ""
    from optcli.passes.quantize.isa import choose_int8

    return repr(sorted(choose_int8(for_target(config, recipe.report.target), recipe.report.target).values().items()))


PASS = PassSpec(
    type="quantize",
    config=Config,
    consumes=frozenset({"onnx", DECODER_FORMAT}),
    apply=apply,
    check=check,
    preflight=preflight,
    makes_int8=True,
    machine_key=machine_key,
    summary="int8 with onnxruntime.quantization: dynamic, or static QDQ calibrated on data.calibration; int4/int8 weight-only (MatMulNBits)",
    details=QuantizeDetails,
)
