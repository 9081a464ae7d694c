"""torch -> ONNX with the torch.export-based exporter (TorchScript exporter as fallback), checked against torch."""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field

from optcli.errors import first_line
from optcli.exporter_table import torchlib_table_built_once
from optcli.library_warnings import quiet_loggers
from optcli.onnxgraph import graph_view, load_model
from optcli.passes.base import Context, PassConfig, PassSpec
from optcli.report.model import Number, StepDetails


class Config(PassConfig):
    type: Literal["export"] = "export"
    format: Literal["onnx"] = "onnx"
    opset: int = Field(default=18, ge=11, le=23, description="ONNX opset version")
    exporter: Literal["auto", "dynamo", "torchscript"] = Field(
        default="auto",
        description="auto: both exporters, the graph ONNX Runtime runs faster is kept (one only if the other fails, "
        "or where the model is too big to export twice)",
    )
    dynamic_batch: bool = Field(default=True, description="leave the batch dimension free in the ONNX graph")
    dynamic_sequence: bool = Field(
        default=True,
        description="text models: leave the sequence axis free; false fixes it at the data's max_length "
        "(ONNX Runtime's symbolic shape inference, used by quantize pre-processing, needs that for torch.export graphs)",
    )
    atol: float = Field(default=1e-4, ge=0, description="ONNX vs torch: allowed absolute error ...")
    rtol: float = Field(default=1e-3, ge=0, description="... plus this fraction of the largest torch output")
    check_samples: int = Field(default=8, ge=1, le=4096, description="inputs used for the numeric check")


@contextlib.contextmanager
def _quiet_exporter():
    # The dynamo exporter prints progress to stdout and logs to stderr; --json needs a clean stdout.
    buf = io.StringIO()
    names = ("torch.onnx", "torch.export", "torch._export", "onnxscript", "torch.fx")
    with quiet_loggers(*names, level=logging.ERROR), contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        yield buf


def _export(module, args, inputs, output_names, config: Config, target, exporter: str) -> None:
    import torch

    from optcli.model import torch_dynamic_shapes

    names = [s.name for s in inputs]
    if exporter == "dynamo":
        dynamic = torch_dynamic_shapes(inputs, batch_free=config.dynamic_batch)
        with warnings.catch_warnings(), torchlib_table_built_once():
            # Inputs sharing one batch/sequence Dim get one axis name; torch says so once per input.
            warnings.filterwarnings("ignore", message=".*shares the same shape constraints with another axis")
            program = torch.onnx.export(
                module,
                args,
                dynamo=True,
                opset_version=config.opset,
                dynamic_shapes=dynamic,
                input_names=list(names),
                output_names=output_names or None,
                external_data=False,
            )
            assert program is not None, "dynamo=True without a file argument returns the ONNXProgram"
            program.save(str(target), external_data=_needs_external(module))
    else:
        axes = {s.name: {s.batch_axis: "batch"} for s in inputs if s.batch_dynamic and config.dynamic_batch}
        for s in inputs:  # a text model's sequence axis (and any other free axis) stays free too
            axes.setdefault(s.name, {}).update(
                {axis: "sequence" if axis == 1 else f"axis{axis}" for axis in s.dynamic_axes}
            )
        axes = {n: a for n, a in axes.items() if a}
        if output_names and config.dynamic_batch:
            axes.update({n: {0: "batch"} for n in output_names})
        with warnings.catch_warnings(record=True) as seen:  # TracerWarnings: see TraceMayNotGeneralize
            warnings.simplefilter("always", torch.jit.TracerWarning)
            torch.onnx.export(
                module,
                args,
                str(target),
                dynamo=False,
                opset_version=config.opset,
                input_names=list(names),
                output_names=output_names or None,
                dynamic_axes=axes or None,
            )
        traced = [w for w in seen if issubclass(w.category, torch.jit.TracerWarning)]
        if traced:
            raise TraceMayNotGeneralize(str(traced[0].message).split(". ")[0])


def _needs_external(module) -> bool:
    from optcli.artifact import ONNX_EXTERNAL_THRESHOLD

    return sum(t.numel() * t.element_size() for t in module.state_dict().values()) > ONNX_EXTERNAL_THRESHOLD


class CheckFailed(Exception):
    """An exported graph that does not run or does not match torch (the message says which)."""


class TraceMayNotGeneralize(Exception):
    """The TorchScript tracer warned that the graph may hold values of the example inputs (a Python bool, a loop
    count): the graph is written, then checked once more on inputs unlike the example (probe_inputs)."""


def probe_inputs(inputs, seed: int) -> dict:
    """Inputs unlike the export's example: batch 3, free axes at half length, attention masks with padding."""
    from optcli.model import example_inputs

    shorter = [
        replace(s, shape=tuple(max(1, d // 2) if a in s.dynamic_axes and d else d for a, d in enumerate(s.shape)))
        if s.shape
        else s
        for s in inputs
    ]
    feeds = example_inputs(shorter, batch=3, seed=seed)
    for spec in shorter:
        arr = feeds[spec.name]
        if "mask" in spec.name.lower() and arr.ndim >= 2 and arr.shape[-1] > 1:
            arr[1:, arr.shape[-1] // 2 :] = 0  # rows 2 and 3 end in padding
    return feeds


def _check(module, model, target, check, config: Config) -> tuple[float, float]:
    """Max |ONNX - torch| over the check inputs, and the limit it must stay under."""
    from optcli.measure import onnx_runner, torch_runner

    ref = torch_runner(module, model.inputs, threads=2)(check)
    try:
        got = onnx_runner(target, model.inputs, threads=2)(check)
    except Exception as e:  # e.g. a tracer that baked the example batch into the graph
        raise CheckFailed(
            f"the exported ONNX graph does not run on new inputs ({first_line(e, 200)}); "
            "the model likely has data-dependent Python code the exporter could not capture",
        ) from None
    max_err = max(
        float(np.abs(r.astype(np.float64) - g.astype(np.float64)).max()) if r.size else 0.0
        for r, g in zip(ref, got, strict=False)
    )
    scale = max(float(np.abs(r).max()) if r.size else 0.0 for r in ref)
    limit = config.atol + config.rtol * scale
    if not np.isfinite(max_err) or max_err > limit:
        raise CheckFailed(
            f"ONNX output differs from torch by {max_err:.3g} (limit {limit:.3g} = atol {config.atol} + rtol "
            f"{config.rtol} x {scale:.3g}); try exporter: torchscript or another opset",
        )
    return max_err, limit


MIN_TIMED_MS = 1.0  # below this per call, two graphs' times differ by overhead and noise, not by their kernels
# Ops that move or reshape data: two graphs differing only in these run the same kernels where the time goes.
_LAYOUT_OPS = frozenset(
    {
        "Constant",
        "Identity",
        "Shape",
        "Gather",
        "Unsqueeze",
        "Squeeze",
        "Concat",
        "Reshape",
        "Cast",
        "Range",
        "Expand",
        "Slice",
        "ConstantOfShape",
        "Equal",
        "Where",
        "Flatten",
    }
)


def kernels(path: Path) -> dict[str, int]:
    """Compute op counts of the graph ONNX Runtime's CPU session runs after its own fusions."""
    import tempfile
    from collections import Counter

    import onnxruntime as ort

    from optcli.onnx_check import session

    with tempfile.TemporaryDirectory(prefix="optcli-kernels-") as tmp:
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        opts.optimized_model_filepath = str(Path(tmp) / "session.onnx")
        session(path, opts=opts)
        graph = load_model(opts.optimized_model_filepath, external_data=False).graph
    return dict(Counter(n.op_type for n in graph.node if n.op_type not in _LAYOUT_OPS))


def _time_interleaved(paths: dict[str, Path], inputs, feeds: dict, threads: int, rounds: int = 7) -> dict[str, float]:
    """Median ms per graph, the graphs run in turn each round so a change of machine load hits both alike."""
    import time

    from optcli.measure import onnx_runner

    runners = {k: onnx_runner(p, inputs, threads) for k, p in paths.items()}
    for run in runners.values():
        run(feeds)  # warm-up: allocation and weight pre-packing
    times: dict[str, list[float]] = {k: [] for k in runners}
    for _ in range(rounds):
        for k, run in runners.items():
            t0 = time.perf_counter()
            run(feeds)
            times[k].append((time.perf_counter() - t0) * 1000)
    return {k: float(np.median(v)) for k, v in times.items()}


def apply(model, config: Config, ctx: Context):
    import shutil

    import torch

    from optcli.errors import PassFailed
    from optcli.model import example_inputs, fold_pruning

    module = fold_pruning(model.module) if not isinstance(model.module, torch.jit.ScriptModule) else model.module
    feeds = example_inputs(model.inputs, batch=2, seed=ctx.seed)
    args = tuple(torch.from_numpy(feeds[s.name]) for s in model.inputs)
    target = ctx.step_dir / "model.onnx"
    export_inputs = model.inputs if config.dynamic_sequence else [replace(i, dynamic_axes=()) for i in model.inputs]
    order = {"auto": ["dynamo", "torchscript"], "dynamo": ["dynamo"], "torchscript": ["torchscript"]}[config.exporter]
    if isinstance(module, torch.jit.ScriptModule) and "torchscript" in order:
        order = ["torchscript"]  # the torch.export-based exporter cannot read TorchScript
    check = example_inputs(model.inputs, batch=config.check_samples, seed=ctx.seed + 1)
    if ctx.data.eval is not None:
        check = ctx.data.eval.head(config.check_samples)
    # auto exports with both exporters and keeps the graph ONNX Runtime runs faster: their graphs fuse differently
    # (all-MiniLM-L6-v2: the TorchScript graph gets BiasGelu, the torch.export one unfused Erf, 0.84x vs 1x time).
    both = config.exporter == "auto" and len(order) == 2 and not _needs_external(module)
    written: dict[str, tuple[Path, float, float]] = {}
    errors = []
    for exporter in order:
        path = ctx.step_dir / exporter / "model.onnx"
        path.parent.mkdir(exist_ok=True)
        try:
            warned = None
            with _quiet_exporter():
                try:
                    _export(module, args, export_inputs, model.output_names, config, path, exporter)
                except TraceMayNotGeneralize as e:
                    warned = str(e)
            written[exporter] = (path, *_check(module, model, path, check, config))
            if warned:
                try:
                    _check(module, model, path, probe_inputs(export_inputs, ctx.seed + 2), config)
                except CheckFailed as e:
                    raise CheckFailed(
                        f"the tracer warned the graph may not generalize ({warned}); it does not: {e}"
                    ) from None
                ctx.details["tracer_warning"] = (
                    f"{warned} (the graph still matched torch at another batch size, length and padding)"
                )
        except CheckFailed as e:
            written.pop(exporter, None)
            errors.append(f"{exporter}: {e}")
        except Exception as e:  # exporters raise many types; the message is what the user needs
            errors.append(f"{exporter}: {type(e).__name__}: {first_line(e)}")
        else:
            if not both:
                break
            continue
        shutil.rmtree(path.parent, ignore_errors=True)
    if not written:
        raise PassFailed(ctx.step_name, "export to ONNX failed; " + " | ".join(errors))
    if "dynamo" in order and "dynamo" not in written:
        ctx.warn(f"the torch.export-based exporter failed ({errors[0]}); used the TorchScript exporter")
    if errors:
        ctx.details["exporter_errors"] = errors
    exporter = next(iter(written))
    if len(written) == 2 and kernels(written["dynamo"][0]) == kernels(written["torchscript"][0]):
        # Same kernels after ONNX Runtime's fusions: timing could only pick by noise, and a run must be repeatable.
        ctx.details["exporter_choice"] = "dynamo: both graphs run the same kernels in ONNX Runtime (not timed)"
    elif len(written) == 2:
        ms = _time_interleaved(
            {k: v[0] for k, v in written.items()}, model.inputs, check, ctx.recipe.report.latency.threads
        )
        # Within 5%, or under a millisecond a call (per-call overhead), the difference is noise and the torch.export
        # graph is kept: it is the exporter torch develops, and a re-run must choose the same.
        clear = ms["torchscript"] < 0.95 * ms["dynamo"] and ms["dynamo"] >= MIN_TIMED_MS
        exporter = "torchscript" if clear else "dynamo"
        other = "dynamo" if clear else "torchscript"
        ctx.details["exporters_ms"] = {k: round(v, 3) for k, v in ms.items()}
        ctx.details["exporter_choice"] = (
            f"{exporter}: ONNX Runtime ran its graph in {ms[exporter]:.3g} ms vs {ms[other]:.3g} ms on "
            f"{config.check_samples} check inputs (exporter: auto keeps the faster; within 5% or under "
            f"{MIN_TIMED_MS:g} ms the torch.export one)"
        )
    elif config.exporter == "auto" and not both and "dynamo" in written:
        ctx.details["exporter_choice"] = "dynamo (the model is too big to export twice for a timing comparison)"
    path, max_err, limit = written[exporter]
    for leftover in path.parent.iterdir():  # model.onnx and, for big models, its external data file
        shutil.move(str(leftover), ctx.step_dir / leftover.name)
    for folder in {p.parent for p, _, _ in written.values()}:
        shutil.rmtree(folder, ignore_errors=True)
    ctx.details["exporter"] = exporter
    ctx.details["opset"] = config.opset
    ctx.details["max_abs_error_vs_torch"] = max_err
    ctx.details["error_limit"] = limit
    output_names = list(graph_view(target).outputs)
    return model.with_(format="onnx", module=None, path=target, output_names=output_names)


class ExportDetails(StepDetails):
    """What an export step writes under "details" in report.json (registered below as PassSpec.details)."""

    exporter: str | None = None
    opset: int | None = None
    max_abs_error_vs_torch: Number | None = None
    error_limit: Number | None = None
    exporter_choice: str | None = None
    exporters_ms: dict[str, Number] | None = None
    exporter_errors: Any = None
    tracer_warning: str | None = None


PASS = PassSpec(
    type="export",
    config=Config,
    consumes=frozenset({"torch"}),
    produces="onnx",
    apply=apply,
    summary="torch -> ONNX (both exporters, the faster graph kept), output checked against torch",
    details=ExportDetails,
)
