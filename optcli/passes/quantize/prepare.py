"""Graph preparation: bring an ONNX graph exported by another tool into the form ONNX Runtime's quantizer and
session optimizer work on. Runs as a step of its own before quantize on ONNX input, or alone as `prepare`.

Each change is checked: the changed model must load in ONNX Runtime and give the input model's outputs on the
same feeds; a change that does not is dropped and the report says why.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

from pydantic import Field

from optcli.errors import BadInput
from optcli.onnx_check import MIN_OPSET
from optcli.onnxgraph import graph_view, load_model
from optcli.passes.base import Context, PassConfig, PassSpec
from optcli.passes.quantize.details import PrepareDetails

RUNGS = ("full", "no_symbolic_shape", "no_optimization", "none")
# Ops that only reshape or retype a constant: a weight built by them is a weight in all but storage.
WEIGHT_OPS = frozenset({"Cast", "CastLike", "Transpose", "Reshape", "Squeeze", "Unsqueeze", "Identity", "Flatten"})
WEIGHT_CONSUMERS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})
EXTERNAL_DATA_BYTES = 256 << 20  # above this the prepared model keeps its weights in a side file
# ONNX Runtime's inference build has no kernels for these domains: no rewrite makes such a graph loadable.
UNLOADABLE_DOMAINS = ("ai.onnx.preview.training",)


@contextlib.contextmanager
def working_dir(path: Path) -> Iterator[None]:
    """contextlib.chdir, which Python 3.10 (that optcli supports) lacks: ORT's tools write beside the working dir."""
    before = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(before)


class Config(PassConfig):
    type: Literal["prepare"] = "prepare"
    lift_constants: bool = Field(
        default=True,
        description="Constant-node weights lifted to initializers, weight-only Cast/Transpose/Reshape of constants folded",
    )
    upgrade_opset: int | None = Field(
        default=MIN_OPSET,
        ge=7,
        le=30,
        description="graphs below this opset are converted to it (per-channel int8 needs 13); null: keep the opset",
    )
    preprocess: Literal["auto", "full", "no_symbolic_shape", "no_optimization", "none"] = Field(
        default="auto",
        description="ONNX Runtime's quant_pre_process, tried as a ladder full -> no_symbolic_shape -> no_optimization "
        "-> none (the first rung whose model loads and matches is kept); a rung name starts the ladder there",
    )
    symbolic_shape_max_mb: int = Field(
        default=512,
        ge=0,
        description="auto skips symbolic shape inference above this model size (it holds several copies of the graph)",
    )
    rtol: float = Field(
        default=1e-3, gt=0, le=1, description="largest output change kept, relative to the largest output value"
    )


def _nodes(graph):
    """Every node, subgraphs (If/Loop bodies) included."""
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.HasField("g"):
                yield from _nodes(attr.g)
            for g in attr.graphs:
                yield from _nodes(g)


def unused_opsets(proto) -> list[str]:
    used = {n.domain or "" for n in _nodes(proto.graph)}
    for f in proto.functions:
        used.add(f.domain)
        used.update(n.domain or "" for n in f.node)
    return [o.domain for o in proto.opset_import if o.domain not in ("", "ai.onnx") and o.domain not in used]


def initializer_inputs(proto) -> list[str]:
    names = {t.name for t in proto.graph.initializer}
    return [i.name for i in proto.graph.input if i.name in names]


def constant_nodes(proto) -> int:
    return sum(1 for n in _nodes(proto.graph) if n.op_type == "Constant" and n.domain in ("", "ai.onnx"))


def lift_and_fold(proto) -> tuple[object, dict]:
    """Weight-only subgraphs (Cast/Transpose/Reshape of constants) folded, Constant weights lifted to initializers."""
    import onnx_ir as ir
    from onnx_ir.passes.common import LiftConstantsToInitializersPass, RemoveUnusedNodesPass
    from onnxscript.optimizer import fold_constants

    model = ir.from_proto(proto)

    def count(op: str | None = None) -> int:
        return sum(1 for n in ir.traversal.RecursiveGraphIterator(model.graph) if op is None or n.op_type == op)

    nodes, constants = count(), count("Constant")

    def weight_only(node) -> bool:
        if node.domain not in ("", "ai.onnx") or not node.inputs:
            return False
        if any(v is not None and v.const_value is None for v in node.inputs):
            return False
        if node.op_type in WEIGHT_OPS:
            return True
        # ConstantOfShape feeding a weight slot is a weight (a zero bias); elsewhere folding it would bloat the file.
        return node.op_type == "ConstantOfShape" and all(
            use.node.op_type in WEIGHT_CONSUMERS and use.idx > 0 for use in node.outputs[0].uses()
        )

    # onnxscript's default output_size_limit (512x512 elements) is smaller than most conv weights: the predicate decides.
    fold_constants(model, input_size_limit=2**62, output_size_limit=2**62, should_fold=weight_only)
    RemoveUnusedNodesPass()(model)
    folded_nodes, remaining = count(), count("Constant")
    LiftConstantsToInitializersPass(lift_all_constants=False, size_limit=1)(model)
    counts = {
        "nodes_folded": max(nodes - folded_nodes - (constants - remaining), 0),
        "constants_lifted": remaining - count("Constant"),
    }
    return ir.to_proto(model), counts


@contextlib.contextmanager
def _errors_of(logger_name: str):
    """ERROR records of one library logger, kept from the terminal (quant_pre_process logs a failed optimization and goes on)."""
    records: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    logger = logging.getLogger(logger_name)
    handler = Collect(level=logging.ERROR)
    logger.addHandler(handler)
    propagate, logger.propagate = logger.propagate, False
    try:
        yield records
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate


def ort_preprocess(source: Path, folder: Path, rung: str, external: bool) -> Path:
    """One rung of ONNX Runtime's quant_pre_process, run with `folder` as the working directory."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    folder.mkdir(parents=True, exist_ok=True)
    source, folder = source.resolve(), folder.resolve()
    target = folder / "model.onnx"
    # On failure it saves sym_shape_infer_temp.onnx and uuid-named weight files into the working directory.
    with working_dir(folder), _errors_of("onnxruntime.quantization.shape_inference") as errors:
        quant_pre_process(
            str(source),
            str(target),
            skip_optimization=rung == "no_optimization",
            skip_symbolic_shape=rung != "full",
            save_as_external_data=external,
            all_tensors_to_one_file=True,
            external_data_location=target.name + ".data" if external else None,
        )
    if errors:
        raise RuntimeError(errors[0].strip().splitlines()[0][:200])
    return target


def preprocess_ladder(current: Path, work: Path, reference, feeds, rtol: float, start: str, skip_reason: str | None):
    """(path, record): the first rung from `start` whose model loads and matches the reference."""
    from optcli.onnx_check import Unloadable, mismatch, model_bytes, outputs_of, reason

    record: dict = {"tried": [skip_reason] if skip_reason else []}
    external = model_bytes(current) > EXTERNAL_DATA_BYTES
    for rung in RUNGS[RUNGS.index(start) :]:
        if rung == "none":
            break
        try:
            out = ort_preprocess(current, work / f"pre-{rung}", rung, external)
            why = mismatch(reference, outputs_of(out, feeds), rtol) if reference is not None else None
        except Unloadable as e:
            why = f"ONNX Runtime cannot load the result ({e})"
        except Exception as e:  # each rung's failure is the reason to try the next one
            why = reason(e, 200)
        if why:
            record["tried"].append(f"{rung}: {why}")
            continue
        record["rung"] = rung
        return out, record
    record["rung"] = "none"
    return current, record


def prepare(source: Path, step_dir: Path, feeds: list[dict], config: Config) -> tuple[Path, dict]:
    """Write the prepared model into step_dir; returns its path and what changed (for the report)."""

    from optcli.onnx_check import Unloadable, default_opset, mismatch, model_bytes, outputs_of, place, reason, upgrade

    work = step_dir / "work"
    work.mkdir(parents=True, exist_ok=True)
    try:
        size = model_bytes(source)
        details: dict = {"changes": [], "not_applied": []}
        scan = graph_view(source).proto  # read only
        opset = default_opset(scan)
        details["opset"] = {"from": opset, "to": opset}
        unused, init_inputs = unused_opsets(scan), initializer_inputs(scan)
        constants = constant_nodes(scan) if config.lift_constants else 0
        old = config.upgrade_opset is not None and 0 < opset < config.upgrade_opset
        del scan  # an inline model's weights: the edits below load their own copy only when there is something to edit
        input_error = None
        try:
            reference = outputs_of(source, feeds)
        except Unloadable as e:  # an old opset ORT has no kernels for: the first loadable form becomes the reference
            reference, input_error = None, str(e)
            details["input_unloadable"] = input_error

        def accept(proto, what: str) -> bool:
            nonlocal reference
            try:
                got = outputs_of(proto, feeds)
            except Unloadable as e:
                details["not_applied"].append(f"{what}: ONNX Runtime cannot load the result ({e})")
                return False
            why = mismatch(reference, got, config.rtol) if reference is not None else None
            if why:
                details["not_applied"].append(f"{what}: outputs changed ({why})")
                return False
            reference = reference if reference is not None else got
            return True

        current = source
        if unused or init_inputs or constants or old:
            proto = load_model(source)  # edited below: its own copy
            if unused:
                keep = [o for o in proto.opset_import if o.domain not in unused]
                del proto.opset_import[:]
                proto.opset_import.extend(keep)
                details["changes"].append(f"unused opset imports removed: {', '.join(unused)}")
            if old:
                target = config.upgrade_opset
                assert target is not None, "old is only set against an upgrade_opset"
                try:
                    converted = upgrade(proto, target)
                except ValueError as e:
                    converted, why = None, str(e)
                    details["not_applied"].append(f"opset {opset} -> {target}: {why}")
                if converted is not None and accept(converted, f"opset {opset} -> {target}"):
                    proto = converted
                    details["opset"]["to"] = target
                    details["changes"].append(f"opset {opset} -> {target}")
                elif input_error is not None:
                    raise BadInput(
                        f"ONNX Runtime cannot load this model ({input_error}) and upgrading opset {opset} -> {target} "
                        f"failed: {details['not_applied'][-1]}"
                    )
                if default_opset(proto) < MIN_OPSET:
                    why = details["not_applied"][-1] if details["not_applied"] else f"upgrade_opset: {target}"
                    details["per_tensor_reason"] = (
                        f"opset {default_opset(proto)} kept ({why}): per-channel int8 needs opset >= {MIN_OPSET}"
                    )
            if init_inputs:
                # Only now: onnx's converter resolves the names of IR < 4 graphs through these input entries.
                names = set(initializer_inputs(proto))
                keep = [i for i in proto.graph.input if i.name not in names]
                del proto.graph.input[:]
                proto.graph.input.extend(keep)
                details["changes"].append(f"{len(names)} initializers removed from the graph inputs")
            if constants:
                try:
                    lifted, counts = lift_and_fold(proto)
                except Exception as e:  # onnx_ir refusing an odd graph: the Constant nodes stay
                    details["not_applied"].append(f"lifting Constant weights: {reason(e, 200)}")
                else:
                    if accept(lifted, "lifting Constant weights"):
                        proto = lifted
                        if counts["nodes_folded"]:
                            details["changes"].append(
                                f"{counts['nodes_folded']} weight-only nodes folded (Cast/Transpose/Reshape of constants)"
                            )
                        if counts["constants_lifted"]:
                            details["changes"].append(
                                f"{counts['constants_lifted']} Constant nodes lifted to initializers"
                            )
            if reference is None and not accept(proto, "the prepared graph"):
                raise BadInput(f"ONNX Runtime cannot load this model: {input_error}")
            from optcli.artifact import save_onnx

            (work / "graph").mkdir()
            current = save_onnx(proto, work / "graph" / "model.onnx")
            del proto
        elif reference is None:
            raise BadInput(f"ONNX Runtime cannot load this model: {input_error}")

        start, skip = (config.preprocess, None) if config.preprocess != "auto" else ("full", None)
        if config.preprocess == "auto" and size > config.symbolic_shape_max_mb << 20:
            start = "no_symbolic_shape"
            skip = (
                f"full: skipped, the model is {size / 1e9:.2f} GB (symbolic shape inference holds several copies of it; "
                f"symbolic_shape_max_mb: {config.symbolic_shape_max_mb})"
            )
        current, details["preprocess"] = preprocess_ladder(current, work, reference, feeds, config.rtol, start, skip)
        details["checked_on"] = f"{len(feeds)} batch{'es' if len(feeds) > 1 else ''} of inputs, rtol {config.rtol:g}"
        return place(current, step_dir, move=current != source), details
    finally:
        shutil.rmtree(work, ignore_errors=True)


def unloadable_domains(path: Path) -> list[str]:

    proto = graph_view(path).proto
    return sorted({n.domain for n in _nodes(proto.graph) if n.domain in UNLOADABLE_DOMAINS})


def preflight(config, recipe, model) -> None:
    """A graph no rewrite can make loadable is refused before any work (validate says it too)."""
    if model.format != "onnx" or model.path is None:
        return
    domains = unloadable_domains(model.path)
    if domains:
        raise BadInput(
            f"ONNX Runtime cannot load this model: it uses {', '.join(domains)} ops, which ONNX Runtime's inference "
            "build does not implement (they are for training); export the model for inference"
        )


def apply(model, config: Config, ctx: Context):
    from optcli.onnx_check import check_feeds

    feeds = check_feeds(model, ctx.data, ctx.seed)
    path, details = prepare(model.path, ctx.step_dir, feeds, config)
    ctx.details.update(details)
    for line in details["not_applied"]:
        ctx.warn(f"not applied: {line}")
    if details.get("per_tensor_reason"):
        ctx.warn(details["per_tensor_reason"])
    return model.with_(path=path)


PASS = PassSpec(
    type="prepare",
    config=Config,
    consumes=frozenset({"onnx"}),
    apply=apply,
    preflight=preflight,
    summary="graph preparation for int8 (constants lifted, opset upgraded, ONNX Runtime pre-processing), checked numerically",
    details=PrepareDetails,
)
