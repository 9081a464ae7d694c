"""torch -> ONNX with the torch.export-based exporter (TorchScript exporter as fallback), checked against torch."""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from dataclasses import replace
from typing import Literal

import numpy as np
from pydantic import Field

from optcli.errors import first_line
from optcli.library_warnings import quiet_loggers
from optcli.passes.base import Context, PassConfig, PassSpec


class Config(PassConfig):
    type: Literal["export"] = "export"
    format: Literal["onnx"] = "onnx"
    opset: int = Field(default=18, ge=11, le=23, description="ONNX opset version")
    exporter: Literal["auto", "dynamo", "torchscript"] = Field(
        default="auto", description="auto: torch.export-based exporter, TorchScript exporter if that fails"
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
        with warnings.catch_warnings():
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
            program.save(str(target), external_data=_needs_external(module))
    else:
        axes = {s.name: {0: "batch"} for s in inputs if s.batch_dynamic and config.dynamic_batch}
        for s in inputs:  # a text model's sequence axis (and any other free axis) stays free too
            axes.setdefault(s.name, {}).update(
                {axis: "sequence" if axis == 1 else f"axis{axis}" for axis in s.dynamic_axes}
            )
        axes = {n: a for n, a in axes.items() if a}
        if output_names and config.dynamic_batch:
            axes.update({n: {0: "batch"} for n in output_names})
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


def _needs_external(module) -> bool:
    from optcli.artifact import ONNX_EXTERNAL_THRESHOLD

    return sum(t.numel() * t.element_size() for t in module.state_dict().values()) > ONNX_EXTERNAL_THRESHOLD


def apply(model, config: Config, ctx: Context):
    import torch

    from optcli.errors import PassFailed
    from optcli.measure import onnx_runner, torch_runner
    from optcli.model import example_inputs, fold_pruning

    module = fold_pruning(model.module) if not isinstance(model.module, torch.jit.ScriptModule) else model.module
    feeds = example_inputs(model.inputs, batch=2, seed=ctx.seed)
    args = tuple(torch.from_numpy(feeds[s.name]) for s in model.inputs)
    target = ctx.step_dir / "model.onnx"
    export_inputs = model.inputs if config.dynamic_sequence else [replace(i, dynamic_axes=()) for i in model.inputs]
    is_script = isinstance(module, torch.jit.ScriptModule)
    order = {"auto": ["dynamo", "torchscript"], "dynamo": ["dynamo"], "torchscript": ["torchscript"]}[config.exporter]
    if is_script and "torchscript" in order:
        order = ["torchscript"]  # the torch.export-based exporter cannot read TorchScript
    errors = []
    for exporter in order:
        try:
            with _quiet_exporter():
                _export(module, args, export_inputs, model.output_names, config, target, exporter)
            break
        except Exception as e:  # exporters raise many types; the message is what the user needs
            errors.append(f"{exporter}: {type(e).__name__}: {first_line(e)}")
            for leftover in ctx.step_dir.glob("model.onnx*"):
                leftover.unlink()
    else:
        raise PassFailed(ctx.step_name, "export to ONNX failed; " + " | ".join(errors))
    if exporter != order[0] or errors:
        ctx.warn(f"the torch.export-based exporter failed ({errors[0]}); used the TorchScript exporter")
    ctx.details["exporter"] = exporter
    ctx.details["opset"] = config.opset

    import onnx

    output_names = [o.name for o in onnx.load(str(target), load_external_data=False).graph.output]
    check = example_inputs(model.inputs, batch=config.check_samples, seed=ctx.seed + 1)
    eval_data = ctx.data.eval
    if eval_data is not None:
        check = eval_data.head(config.check_samples)
    ref = torch_runner(module, model.inputs, threads=2)(check)
    try:
        got = onnx_runner(target, model.inputs, threads=2)(check)
    except Exception as e:  # e.g. a tracer that baked the example batch into the graph
        raise PassFailed(
            ctx.step_name,
            f"the exported ONNX graph does not run on new inputs ({first_line(e, 200)}); "
            "the model likely has data-dependent Python code the exporter could not capture",
        ) from None
    max_err = max(
        float(np.abs(r.astype(np.float64) - g.astype(np.float64)).max()) if r.size else 0.0
        for r, g in zip(ref, got, strict=False)
    )
    scale = max(float(np.abs(r).max()) if r.size else 0.0 for r in ref)
    limit = config.atol + config.rtol * scale
    ctx.details["max_abs_error_vs_torch"] = max_err
    ctx.details["error_limit"] = limit
    if not np.isfinite(max_err) or max_err > limit:
        raise PassFailed(
            ctx.step_name,
            f"ONNX output differs from torch by {max_err:.3g} (limit {limit:.3g} = atol {config.atol} + rtol {config.rtol} x {scale:.3g}); try exporter: torchscript or another opset",
        )
    return model.with_(format="onnx", module=None, path=target, output_names=output_names)


PASS = PassSpec(
    type="export",
    config=Config,
    consumes=frozenset({"torch"}),
    produces="onnx",
    apply=apply,
    summary="torch -> ONNX (torch.export-based exporter, TorchScript fallback), output checked against torch",
)
