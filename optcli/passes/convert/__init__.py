"""Half precision: fp16 (ONNX, torch) or bf16 (torch) weights and compute, for GPUs and accelerators.

ONNX goes through ONNX Runtime's own converter (onnxruntime.transformers.float16) and the repairs and overflow guard
of half.py; torch modules are cast with their inputs and outputs kept float32 (hooks), saved as .pt2 like any torch
step. On the CPU execution provider fp16 buys size, rarely speed (most CPU kernels run fp16 through casts to fp32):
the report says so rather than implying a speed-up.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from optcli.onnxgraph import load_model
from optcli.passes.base import Context, PassConfig, PassSpec


class Config(PassConfig):
    type: Literal["convert"] = "convert"
    dtype: Literal["fp16", "bf16"] = Field(default="fp16", description="fp16 (ONNX, torch) | bf16 (torch only)")
    keep_io_types: bool = Field(
        default=True, description="inputs and outputs stay float32 (a Cast at each end); false: fp16 inputs (ONNX only)"
    )
    op_block_list: list[str] | None = Field(
        default=None,
        description="op types left in fp32 (default: ONNX Runtime's list: TopK, Range, NonMaxSuppression ...)",
    )
    node_block_list: list[str] = Field(default_factory=list, description="node names left in fp32")
    overflow_guard: bool = Field(
        default=True,
        description="run the fp32 graph on calibration data and keep in fp32 the nodes whose tensors pass overflow_bound",
    )
    overflow_bound: float = Field(
        default=65504.0, gt=0, le=65504.0, description="largest |x| trusted to fp16 (65504: fp16's largest finite)"
    )
    samples: int = Field(
        default=32, ge=1, le=100_000, description="data.calibration (else data.eval) samples the guard runs"
    )


SCRIPTED = "convert: a TorchScript module cannot be re-saved; give a state_dict + factory or a .pt2"


def check(config: Config, recipe, input_format: str) -> None:
    index = next(i for i, p in enumerate(recipe.passes) if p is config)
    later = [p.type for p in recipe.passes[index + 1 :]]
    if input_format == "onnx":
        if config.dtype == "bf16":
            raise ValueError(
                "dtype: bf16 for ONNX: ONNX Runtime's converter writes fp16 only and its CPU provider has no bfloat16 "
                "MatMul/Conv kernels; use dtype: fp16, or convert the torch model to bf16 before the export pass"
            )
        if "quantize" in later:
            raise ValueError(
                "quantize after convert: int8 quantization reads fp32 graphs; quantize or convert, not both"
            )
        return
    from optcli.artifact import graph_file_kind

    if graph_file_kind(recipe.model.path) == "torchscript":  # what apply would refuse after the first measurement
        raise ValueError(SCRIPTED.removeprefix("convert: "))
    if not config.keep_io_types:
        raise ValueError("keep_io_types: false applies to ONNX graphs; a torch model keeps float32 inputs and outputs")
    trained = [t for t in later if t in ("finetune", "prune", "cluster")]
    if trained:
        raise ValueError(f"{trained[0]} after convert would train or edit half-precision weights: put convert after it")


def apply(model, config: Config, ctx: Context):
    if model.format == "onnx":
        return _convert_onnx(model, config, ctx)
    return _convert_torch(model, config, ctx)


def _guard_batches(model, config: Config, ctx: Context) -> list[dict]:
    from optcli.model import example_inputs, fixed_batch

    data = ctx.data.calibration or ctx.data.eval
    if data is None:
        ctx.details["overflow_guard_inputs"] = f"{config.samples} generated inputs (no data.calibration or data.eval)"
        feeds = example_inputs(model.inputs, batch=min(config.samples, fixed_batch(model.inputs) or config.samples))
        return [feeds]
    batch = fixed_batch(model.inputs) or min(data.batch_size, 32)
    batches = [feeds for feeds, _ in data.batches(batch_size=batch, limit=config.samples)]
    ctx.details["overflow_guard_inputs"] = (
        f"{sum(len(next(iter(b.values()))) for b in batches)} samples of data.{data.name}"
    )
    return batches


def _convert_onnx(model, config: Config, ctx: Context):
    import numpy as np
    import onnx
    import onnxruntime as ort

    from optcli.artifact import save_onnx
    from optcli.errors import PassFailed, first_line
    from optcli.onnx_check import name_nodes
    from optcli.passes.convert.half import (
        drop_fp16_round_trips,
        overflowing_nodes,
        sort_graph,
        tensor_max_abs,
    )

    with _quiet_converter():
        from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    proto = onnx.shape_inference.infer_shapes(load_model(model.path))
    name_nodes(proto)
    names = {n.name for n in proto.graph.node}
    for name in config.node_block_list:
        if name not in names:
            ctx.warn(f"node_block_list: {name!r} is no node of the graph")
    blocked = {n: "node_block_list" for n in config.node_block_list if n in names}
    batches = _guard_batches(model, config, ctx)
    reference = None
    if config.overflow_guard:
        peaks, sizes = tensor_max_abs(proto, batches)
        guard = overflowing_nodes(proto, peaks, config.overflow_bound, sizes)
        for node, why in guard.items():
            blocked.setdefault(node, f"overflow guard: {why}")
        ctx.details["overflow_guard"] = {"bound": config.overflow_bound, "kept_fp32": guard}
    ops = DEFAULT_OP_BLOCK_LIST if config.op_block_list is None else config.op_block_list
    try:
        half = convert_float_to_float16(
            proto,
            keep_io_types=config.keep_io_types,
            disable_shape_infer=True,
            op_block_list=list(ops),
            node_block_list=sorted(blocked),
        )
        round_trips = drop_fp16_round_trips(half)
        half = sort_graph(half)
        onnx.checker.check_model(half)
    except Exception as e:
        raise PassFailed(
            ctx.step_name, f"fp16 conversion failed: {type(e).__name__}: {first_line(str(e))[:300]}"
        ) from None
    target = save_onnx(half, ctx.step_dir / "model.onnx")
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    try:
        session = ort.InferenceSession(str(target), opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # e.g. a Cast whose type no longer matches its consumer
        raise PassFailed(
            ctx.step_name,
            f"the fp16 graph does not load in ONNX Runtime: {first_line(str(e))[:300]}; add the node to node_block_list",
        ) from None
    fp16_inputs = {i.name for i in session.get_inputs() if i.type == "tensor(float16)"}
    wanted = {i.name for i in session.get_inputs()}
    original = ort.InferenceSession(str(model.path), opts, providers=["CPUExecutionProvider"])
    first = {k: (v.astype(np.float16) if k in fp16_inputs else v) for k, v in batches[0].items() if k in wanted}
    reference = original.run(
        None, {k: v for k, v in batches[0].items() if k in {i.name for i in original.get_inputs()}}
    )
    for out, ref, meta in zip(session.run(None, first), reference, session.get_outputs(), strict=True):
        if out.dtype.kind == "f" and np.isfinite(ref).all() and not np.isfinite(out).all():
            raise PassFailed(
                ctx.step_name,
                f"output {meta.name} holds inf/NaN in fp16 but not in fp32; lower overflow_bound or add nodes to node_block_list",
            )
    kept = [n for n in half.graph.node if n.name in blocked]
    ctx.details.update(
        {
            "dtype": "fp16",
            "keep_io_types": config.keep_io_types,
            "fp16_initializers": sum(1 for t in half.graph.initializer if t.data_type == onnx.TensorProto.FLOAT16),
            "fp32_initializers": sum(1 for t in half.graph.initializer if t.data_type == onnx.TensorProto.FLOAT),
            "nodes_kept_fp32": {n.name: blocked[n.name] for n in kept},
            "casts_added": sum(1 for n in half.graph.node if n.op_type == "Cast")
            - sum(1 for n in proto.graph.node if n.op_type == "Cast"),
            "fp16_round_trips_removed": round_trips,
        }
    )
    ctx.warn(_CPU_NOTE)
    return model.with_(path=target)


_CPU_NOTE = (
    "on the CPU execution provider fp16 buys size, rarely speed: most CPU kernels run fp16 through casts to fp32; "
    "measure on the GPU (report.target: cuda) for the speed"
)


def _quiet_converter():
    from optcli.library_warnings import quiet_loggers

    return quiet_loggers("onnxruntime.transformers.float16", level=40)


def _convert_torch(model, config: Config, ctx: Context):
    import torch

    from optcli.errors import BadInput
    from optcli.model import copy_module

    if isinstance(model.module, torch.jit.ScriptModule):
        raise BadInput(SCRIPTED)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[config.dtype]
    module = copy_module(model.module).to(dtype)
    module.register_forward_pre_hook(CastInputs(dtype))
    module.register_forward_hook(float_outputs)
    ctx.details.update(
        {"dtype": config.dtype, "keep_io_types": True, "parameters_cast": sum(p.numel() for p in module.parameters())}
    )
    ctx.warn(_CPU_NOTE.replace("the CPU execution provider", "CPU").replace(" (report.target: cuda)", ""))
    return model.with_(module=module)


class CastInputs:
    """Forward pre-hook: float inputs to the module's dtype (a picklable class: fine-tune workers and copies keep it)."""

    def __init__(self, dtype):
        self.dtype = dtype

    def __call__(self, module, args):
        import torch

        return tuple(a.to(self.dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)


def float_outputs(module, args, out):
    """Forward hook: float outputs back to float32, so every later step and measure sees what the original gave."""
    import torch

    if isinstance(out, torch.Tensor):
        return out.float() if out.is_floating_point() else out
    if isinstance(out, (tuple, list)):
        return type(out)(float_outputs(module, args, o) for o in out)
    if isinstance(out, dict):
        return {k: float_outputs(module, args, v) for k, v in out.items()}
    return out


PASS = PassSpec(
    type="convert",
    config=Config,
    consumes=frozenset({"torch", "onnx"}),
    apply=apply,
    check=check,
    summary="fp16 / bf16: ONNX through ONNX Runtime's converter with an fp16-overflow guard, torch modules cast (inputs/outputs kept float32)",
)
