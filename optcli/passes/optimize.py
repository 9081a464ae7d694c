"""fp32 graph optimization on its own: the onnxscript optimizer, then ONNX Runtime's offline optimizer.

The artifact stays portable (standard ONNX ops only) at level basic; extended adds ONNX Runtime's fused
com.microsoft ops, which only ONNX Runtime loads. Each stage is kept only when the model still loads and
its outputs match the input's on the same feeds.
"""

from __future__ import annotations

import collections
import shutil
from pathlib import Path
from typing import Literal

from pydantic import Field

from optcli.errors import BadInput
from optcli.passes.base import Context, PassConfig, PassSpec

EXTERNAL_DATA_BYTES = 256 << 20  # above this the optimized model keeps its weights in a side file


class Config(PassConfig):
    type: Literal["optimize"] = "optimize"
    level: Literal["none", "basic", "extended"] = Field(
        default="basic",
        description="ONNX Runtime offline optimization: basic (constant folding, Conv+BatchNorm fusion, eliminations; "
        "any runtime loads the result) | extended (adds com.microsoft fused ops: ONNX Runtime only) | none",
    )
    # Off by default: on a PP-LCNet classifier it rewrote 28 HardSwish into HardSigmoid + Mul (two kernels each).
    onnxscript: bool = Field(default=False, description="run the onnxscript optimizer first (folding, rewrites)")
    rtol: float = Field(
        default=1e-3, gt=0, le=1, description="largest output change kept, relative to the largest output value"
    )


def _op_counts(path: Path) -> collections.Counter:
    from optcli.onnxgraph import graph_view

    return collections.Counter(
        n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}.{n.op_type}" for n in graph_view(path).nodes
    )


def _onnxscript(source: Path, target: Path, external: bool) -> Path:
    import onnx_ir as ir
    from onnxscript import optimizer

    model = ir.load(str(source))
    # The default output_size_limit (512x512 elements) leaves most conv weight expressions unfolded.
    optimizer.optimize(model, onnx_shape_inference=False, input_size_limit=2**62, output_size_limit=2**62)
    target.parent.mkdir(parents=True, exist_ok=True)
    ir.save(model, str(target), external_data=target.name + ".data" if external else None)
    return target


def _ort_offline(source: Path, target: Path, level: str, external: bool) -> Path:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.graph_optimization_level = {
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    }[level]
    target.parent.mkdir(parents=True, exist_ok=True)
    opts.optimized_model_filepath = str(target)
    if external:
        opts.add_session_config_entry("session.optimized_model_external_initializers_file_name", target.name + ".data")
        opts.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    ort.InferenceSession(str(source), opts, providers=["CPUExecutionProvider"])
    return target


def apply(model, config: Config, ctx: Context):
    from optcli import onnx_check as prep

    work = ctx.step_dir / "work"
    feeds = prep.check_feeds(model, ctx.data, ctx.seed)
    try:
        reference = prep.outputs_of(model.path, feeds)
    except prep.Unloadable as e:
        raise BadInput(
            f"ONNX Runtime cannot load this model: {e}; put a prepare step before optimize (it upgrades old opsets)"
        ) from None
    external = prep.model_bytes(model.path) > EXTERNAL_DATA_BYTES
    before = _op_counts(model.path)
    current, applied, kept = model.path, [], []
    stages = []
    if config.onnxscript:
        stages.append(
            ("onnxscript optimizer", lambda src: _onnxscript(src, work / "onnxscript" / "model.onnx", external))
        )
    if config.level != "none":
        stages.append(
            (
                f"ONNX Runtime {config.level}",
                lambda src: _ort_offline(src, work / "ort" / "model.onnx", config.level, external),
            )
        )
    for name, stage in stages:
        try:
            out = stage(current)
            why = prep.mismatch(reference, prep.outputs_of(out, feeds), config.rtol)
        except prep.Unloadable as e:
            why = f"ONNX Runtime cannot load the result ({e})"
        except Exception as e:  # an optimizer refusing an odd graph: keep the graph it had
            why = prep.reason(e, 200)
        if why:
            kept.append(f"{name}: not applied ({why})")
            continue
        applied.append(name)
        current = out
    final = prep.place(current, ctx.step_dir, move=current != model.path)
    after = _op_counts(final)
    changed = {
        op: [before.get(op, 0), after.get(op, 0)]
        for op in sorted(set(before) | set(after))
        if before.get(op, 0) != after.get(op, 0)
    }
    ctx.details.update(
        applied=applied,
        kept=kept,
        nodes={"before": sum(before.values()), "after": sum(after.values())},
        op_changes=changed,
        portable=not any("." in op for op in after),
    )
    for line in kept:
        ctx.warn(line)
    shutil.rmtree(work, ignore_errors=True)
    return model.with_(path=final)


PASS = PassSpec(
    type="optimize",
    config=Config,
    consumes=frozenset({"onnx"}),
    apply=apply,
    summary="fp32 graph optimization (onnxscript optimizer + ONNX Runtime offline basic/extended), checked numerically",
)
