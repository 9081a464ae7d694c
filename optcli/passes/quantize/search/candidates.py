"""Which int8 configurations the search tries, on which graph: the base grid (modes x per-channel x calibration x
SmoothQuant), a CNN's own candidates on its BatchNorm-folded graph, and the nodes a configuration turns into int8."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from optcli.onnxgraph import graph_view
from optcli.passes.quantize.isa import choose_int8
from optcli.passes.quantize.ort import Settings

# Ops ONNX Runtime quantizes that carry weights; sensitivity is ranked over these.
WEIGHT_OPS = ("MatMul", "Gemm", "Conv", "ConvTranspose", "Gather")
# Static candidates quantize only compute ops unless op_types is given: QDQ pairs around data-movement ops cost CPU time.
STATIC_COMPUTE_OPS = ["MatMul", "Gemm", "Conv", "ConvTranspose"]
# CNN candidates' op-type subsets, narrowest first; None: every op ORT can quantize (its QLinearSigmoid, QLinearMul,
# QLinearConcat ... keep SiLU-style activations in int8), less the post-processing tail.
CNN_OP_SUBSETS = (("Conv",), ("Conv", "Gemm"), ("Conv", "Gemm", "MatMul"), None)
DYNAMIC_CONV_NOTE = (
    "dynamic candidates skipped for this CNN: dynamic int8 turns Conv into ConvInteger, which has no fast kernel in "
    "ONNX Runtime (issue #12854; 4.6-6.3x slower than fp32 measured on two CNNs); static QDQ is tried instead"
)


def base_candidates(config, has_calibration: bool) -> list[Settings]:
    space = config.search
    user_ops = tuple(config.op_types) if config.op_types else None
    out = []
    for mode in space.modes:
        if mode == "static" and not has_calibration:
            continue
        for per_channel in space.per_channel:
            for alpha in space.smoothquant:
                methods = space.calibration if mode == "static" else ["minmax"]
                for method in methods:
                    ops = user_ops if (mode == "dynamic" or user_ops) else tuple(STATIC_COMPUTE_OPS)
                    out.append(Settings(mode, per_channel, method, alpha, frozenset(), ops))
    return out


def graph_ops(path: Path) -> dict[str, int]:
    return graph_view(path).op_counts()


def is_cnn(ops: dict[str, int]) -> bool:
    return ops.get("Conv", 0) + ops.get("ConvTranspose", 0) > 0


def cnn_candidates(config, ops: dict[str, int], has_calibration: bool, reduce_range: bool, tail: frozenset[str]):
    """Static QDQ on the BatchNorm-folded graph, one candidate per op-type subset, plus symmetric activations.

    `reduce_range` is isa.choose_int8's (the recipe's, else this CPU's). Axes the user set in `search` are kept; the others take CNN defaults (per-channel, no SmoothQuant)."""
    space = config.search
    chosen = space.model_fields_set
    if not has_calibration:
        return []
    per_channel = space.per_channel if "per_channel" in chosen else [True]
    subsets: list[tuple[str, ...] | None] = []
    if config.op_types:
        subsets.append(tuple(config.op_types))
    else:
        for subset in CNN_OP_SUBSETS:
            present = None if subset is None else tuple(o for o in subset if ops.get(o))
            if present != () and present not in subsets:
                subsets.append(present)
    out = []
    for ops_subset in subsets:
        for pc in per_channel:
            for method in space.calibration:
                exclude = tail if ops_subset is None else frozenset()
                out.append(
                    Settings("static", pc, method, None, exclude, ops_subset, reduce_range, False, source="folded")
                )
    # Symmetric uint8 activations (zero point 128) for the widest subset: fuses like asymmetric, ranges differ.
    if out:
        out.append(replace(out[-1], activation_symmetric=True))
    return out


def fold_batchnorm(source: Path, target: Path) -> Path:
    """BatchNorm folded into the convs (and constants folded): ONNX Runtime's offline basic-level optimization,
    which writes only standard ONNX ops, so any runtime loads it. Unnamed nodes get names (the profile maps the
    session's nodes back to them). The source is returned unchanged if ORT cannot write the model."""
    import onnxruntime as ort

    from optcli.onnx_check import name_nodes
    from optcli.onnxgraph import checked_save, load_model

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    opts.optimized_model_filepath = str(target)
    opts.log_severity_level = 3
    try:
        ort.InferenceSession(str(source), opts, providers=["CPUExecutionProvider"])
        proto = load_model(target)  # changed below: its own copy
        name_nodes(proto)
        checked_save(proto, target)  # weights past 2 GB go to a data file; a graph the checker refuses is not used
    except Exception:  # an optimization, never a reason to fail the search
        target.unlink(missing_ok=True)
        return source
    return target


def output_tail(path: Path) -> frozenset[str]:
    """Nodes between the last compute op and a graph output (decode, post-processing).

    Left fp32 in the all-ops candidate: a detector's output concatenates box coordinates (0..320) with class scores
    (0..1), and one int8 scale for both rounds every score to 0 (seen on YOLOv8n: box F1 0 at cosine 0.9997)."""
    view = graph_view(path)
    tail: set[str] = set()
    stack = list(view.outputs)
    while stack:
        node = view.producer(stack.pop())
        if node is None or node.name in tail or node.op_type in STATIC_COMPUTE_OPS:
            continue
        tail.add(node.name)
        stack.extend(node.input)
    return frozenset(n for n in tail if n)


def quantizable_nodes(path: Path, settings: Settings, excluded: set[str]) -> list[str]:
    """Nodes this configuration would turn into int8: weight ops (and, for static, activation MatMuls)."""
    view = graph_view(path)
    inits = view.initializers
    ops = set(settings.op_types or WEIGHT_OPS)
    names = []
    for node in view.nodes:
        if not node.name or node.name in excluded or node.op_type not in ops or node.op_type not in WEIGHT_OPS:
            continue
        has_weight = any(i in inits for i in node.input[:2])
        if node.op_type == "Gather":
            has_weight = bool(node.input) and node.input[0] in inits
        if has_weight or (settings.mode == "static" and node.op_type == "MatMul"):
            names.append(node.name)
    return names


def plan(config, ctx, model, source: Path, exclude: set[str], has_calibration: bool, work: Path):
    """The candidates to try, the graphs they are written from (Settings.source: "folded", "raw"; the pass's input
    is "input") and the notes saying why. A CNN gets static QDQ on its BatchNorm-folded graph."""
    sources: dict[str, Path] = {}
    ops = graph_ops(source)
    notes: list[str] = []
    explicit_modes = "modes" in config.search.model_fields_set
    if is_cnn(ops) and (not explicit_modes or "static" in config.search.modes):
        sources["folded"] = fold_batchnorm(source, work / "bn_folded.onnx")
        candidates = _cnn_plan(config, ctx, ops, has_calibration, exclude, sources["folded"], notes)
    else:
        candidates = [replace(c, exclude=frozenset(exclude)) for c in base_candidates(config, has_calibration)]
        if is_cnn(ops):
            notes.append(
                DYNAMIC_CONV_NOTE.replace("skipped", "asked for").replace(
                    "static QDQ is tried instead", "search.modes has no static"
                )
            )
            ctx.warn("search.modes without static on a CNN: " + DYNAMIC_CONV_NOTE.split(": ", 1)[1])
    if config.preprocess and Path(source) != Path(model.path) and not is_cnn(ops):
        sources["raw"] = Path(model.path)
    if "static" in config.search.modes and not has_calibration:
        ctx.warn("search: static candidates skipped (no data.calibration)")
    return candidates, sources, notes


def _cnn_plan(config, ctx, ops, has_calibration: bool, exclude: set[str], folded: Path, notes: list[str]):
    int8 = choose_int8(config, ctx.recipe.report.target)  # the recipe's reduce_range, else this CPU's
    candidates = cnn_candidates(config, ops, has_calibration, int8.reduce_range, output_tail(folded))
    candidates = [replace(c, exclude=c.exclude | frozenset(exclude)) for c in candidates]
    notes.append(
        f"CNN candidates: static QDQ on the BatchNorm-folded graph ({ops.get('BatchNormalization', 0)} BatchNormalization "
        f"in the input), reduce_range {int8.reduce_range} ({int8.chosen_by['reduce_range']}: {int8.reason})"
    )
    if "dynamic" in config.search.modes:
        notes.append(DYNAMIC_CONV_NOTE)
        weights = tuple(o for o in ("MatMul", "Gemm") if ops.get(o))
        explicit_modes = "modes" in config.search.model_fields_set
        if explicit_modes and weights:  # asked for: dynamic on the MatMul/Gemm part only, never on Conv
            candidates.append(Settings("dynamic", True, "minmax", None, frozenset(exclude), weights))
    if not has_calibration:
        ctx.warn("search: this CNN needs data.calibration for static int8 candidates")
    return candidates
