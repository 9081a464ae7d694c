"""`optcli init MODEL`: a starter recipe with the inputs read from the file."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from optcli.errors import BadInput
from optcli.model import fixed_batch


@dataclass
class Starter:
    text: str  # the recipe, comments first
    notes: list[str]  # what the user should know, for stderr (the recipe's comments say it too)


def starter_recipe(
    path: Path,
    factory: str | None = None,
    shapes: Sequence[str] = (),
    data: Path | None = None,
    trust_pickle: bool = False,
    recipe_dir: Path | None = None,
) -> Starter:
    """The recipe for a model file, its paths relative to recipe_dir (where it is written; default: the working
    folder, what `> recipe.yaml` needs), checked the way `optcli validate` checks it before it is returned."""
    from optcli.artifact import load_any
    from optcli.model import batch_sizes_taken, check_feedable

    recipe_dir = Path(os.path.abspath(recipe_dir or Path.cwd()))
    if path.is_dir():
        from optcli.llm.starter import exportable, llm_recipe

        if _is_causal_lm(path) and exportable(path):  # never loaded: a decoder LLM may not fit in memory
            return Starter(llm_recipe(path, recipe_dir, data), [])
        return Starter(_folder_recipe(path, load_any(path), recipe_dir), [])
    if path.suffix.lower() == ".safetensors" and factory is None:
        raise BadInput(f"{path} holds only weights; pass --factory module:callable that builds the nn.Module")
    try:
        model = _load(path, shapes, factory, trust_pickle)
        check_feedable(model.inputs, path)
    except BadInput as e:
        if "does not record its inputs" in str(e) and "forward takes" not in str(e):
            raise BadInput(
                f"{path} does not record its input shapes; pass --shape name=1x3x32x32 (and :int64 for ids)"
            ) from None
        if "is a state_dict" in str(e):  # the loader speaks recipe keys; init takes options
            raise BadInput(
                f"{path} is a state_dict (weights only); pass --factory module:callable that builds the nn.Module"
            ) from None
        raise
    spec: dict[str, Any] = {"path": _shown(path, recipe_dir)}
    if factory:
        spec["factory"] = factory
    if model.kind == "pickle":
        spec["trust_pickle"] = True  # --trust-pickle was given for this file: the recipe runs as init checked it
    spec["inputs"] = [_input_entry(s) for s in model.inputs]
    cnn = _is_cnn(model)
    # Static int8 (what pays on a CNN) needs calibration inputs; without data, dynamic int8 runs as written.
    static = cnn and data is not None
    passes: list[dict[str, Any]] = [
        CNN_QUANTIZE if static else {"type": "quantize", "mode": "dynamic", "per_channel": True}
    ]
    if model.format == "torch":
        passes.insert(0, {"type": "export", "opset": 18})
    int8 = already_int8(model)
    if int8:
        passes, cnn, static = (
            [],
            False,
            False,
        )  # nothing to quantize: the recipe measures the model as it is (no data to write)
    recipe: dict[str, Any] = {"model": spec}
    if data is not None:
        shown = _shown(data, recipe_dir)
        # One file: calibration and evaluation take disjoint halves, so int8 is not scored on what calibrated it.
        recipe["data"] = (
            {
                "calibration": {"path": shown, "take": [0, 0.5], "samples": 128},
                "eval": {"path": shown, "take": [0.5, 1]},
            }
            if static
            else {"eval": {"path": shown}}
        )
    recipe |= {
        "passes": passes,
        "report": {
            "latency": {"batch_sizes": batch_sizes_taken(model.inputs, [1, 32]), "warmup": 5, "runs": 30, "threads": 2}
        },
        "gates": fidelity_gate_limits(model),
    }
    try:
        labels = _check(recipe, recipe_dir, trust_pickle)
    except BadInput as e:
        if "leaves none" not in str(e):
            raise
        raise BadInput(f"{data}: too few samples to split into calibration and eval; give at least 2 (~100)") from None
    header = f"# optcli recipe for {path.name} (written by optcli init; paths are relative to this file)\n"
    notes = []
    if int8:
        header += (
            f"# No quantize step: the model is int8 already ({int8}).\n"
            "# `optcli run` refuses to quantize an int8 model a second time; this recipe measures it as it is.\n"
            "# To quantize, give the fp32 model to optcli init.\n"
        )
    elif static and data is not None:  # static implies data; said again for the checker
        header += (
            "# A CNN: int8 pays only where ONNX Runtime fuses it (static QDQ, BatchNorm folded, slow regions kept fp32);\n"
            "# the quantize step searches for the fastest int8 model within the target, measured on this machine.\n"
            f"# {data.name}: its first half calibrates, its second half measures (take: [start, stop]).\n"
        )
    if data is not None and labels is not None:
        header += f"# {data.name} holds labels ({labels!r}): the report scores accuracy on them as well as fidelity.\n"
    if data is None and not int8:
        header += "# No data: fidelity to the original is measured on generated inputs, and int8 is dynamic (no calibration).\n"
        if cnn:
            header += "# Dynamic int8 on Conv (ConvInteger) is often slower than fp32: static int8 needs real inputs.\n"
        header += (
            "# Rerun `optcli init MODEL --data samples.npz` (~100 real inputs keyed by input name) to calibrate and\n"
            "# measure on them.\n"
        )
        notes.append(
            "no --data: the recipe measures fidelity on generated inputs and uses dynamic int8; "
            "--data FILE.npz (real inputs keyed by input name) calibrates and measures on real inputs"
        )
    elif not static and not int8:
        header += "# For static int8 (mode: static) add data.calibration (a .npz keyed by input name).\n"
    header += _inputs_note(model.inputs)
    if model.kind == "pickle":
        header += "# model.trust_pickle: loading this file runs code from it (you passed --trust-pickle).\n"
    header += "# `optcli passes` lists every option; `optcli validate` checks this file.\n"
    return Starter(header + yaml.safe_dump(recipe, sort_keys=False), notes)


def _is_causal_lm(path: Path) -> bool:
    from optcli.hf import is_folder
    from optcli.hf.folder import raw_config, task_of

    if not is_folder(path):
        return False
    return any(task_of(str(a)) == "causal-lm" for a in raw_config(path).get("architectures") or [])


def _shown(path: Path, recipe_dir: Path) -> str:
    """A path as the recipe writes it: relative to the recipe's folder (recipes resolve paths against it)."""
    if path.is_absolute():
        return str(path)
    return os.path.relpath(os.path.abspath(path), recipe_dir)


def _check(recipe: dict, recipe_dir: Path, trust_pickle: bool) -> str | None:
    """Validate the recipe as `optcli validate` would (data keyed like the model's inputs, ...): the same messages,
    exit 2. Returns the labels key the eval data holds, if any."""
    from optcli.recipe import recipe_from_dict
    from optcli.runner import preflight

    rec = recipe_from_dict(recipe, recipe_dir)
    _, data = preflight(rec, trust_pickle)
    assert data is not None, "init writes a model recipe, never an LLM one (the only kind preflight opens no data for)"
    evaluation = data.get("eval")
    return evaluation.label_key if evaluation is not None else None


def _load(path: Path, shapes: Sequence[str], factory: str | None, trust_pickle: bool = False):
    """The model, as `load_any` reads it; a TorchScript forward's Python numbers (a sample rate) get a placeholder
    value the recipe shows, so init writes every argument the schema names."""
    from optcli.artifact import is_torchscript, load_any

    if path.suffix.lower() not in (".pt", ".pth") or not is_torchscript(path):
        return load_any(path, shapes, trust_pickle=trust_pickle, factory=factory)
    import torch

    from optcli.artifact import load_model, parse_shape_arg, torchscript_inputs
    from optcli.config import ModelSpec, TensorSpec

    given = [
        TensorSpec.model_validate({"name": n, "shape": s, "dtype": d})
        for n, s, d in (parse_shape_arg(x) for x in shapes)
    ]
    try:
        schema = torchscript_inputs(torch.jit.load(str(path), map_location="cpu"))
    except BadInput:
        raise
    except Exception:
        schema = []  # load_model says what is wrong with the file
    named = {t.name for t in given}
    given += [
        TensorSpec(name=i["name"], value=_PLACEHOLDER[i["python"]])
        for i in schema
        if i.get("python") and not i["optional"] and i["name"] not in named
    ]
    return load_model(ModelSpec(path=path, inputs=given or None))


_PLACEHOLDER = {"int": 1, "float": 1.0, "bool": True}


def _input_entry(spec) -> dict:
    """One model.inputs entry: a Python argument or a scalar by its value, an unusual batch axis said."""
    if spec.python:
        return {"name": spec.name, "value": spec.value}
    entry = {"name": spec.name, "shape": list(spec.shape), "dtype": spec.dtype}
    if not spec.shape:
        entry["value"] = spec.value if spec.value is not None else _PLACEHOLDER.get(spec.dtype, 1)
        if spec.dtype.startswith("float"):
            entry["value"] = float(entry["value"])
        elif spec.dtype == "bool":
            entry["value"] = bool(entry["value"])
    elif spec.batch_axis != 0:
        entry["batch_axis"] = spec.batch_axis
    return entry


def _inputs_note(inputs) -> str:
    """Header lines on inputs that are not stacked samples: values to set, a batch pinned by the file."""
    lines = ""
    for s in inputs:
        if s.python or not s.shape:
            what = f"forward's Python {s.python} argument" if s.python else "a scalar"
            lines += f"# {s.name}: {what}, fed the same with every batch: set value: to the one your model runs with.\n"
        elif s.batch_axis is None:
            lines += f"# {s.name}: no batch axis (batch_axis: null): fed the same with every batch.\n"
    fixed = fixed_batch(inputs)
    if fixed is not None:
        lines += f"# The file fixes the batch size at {fixed}: latency is measured at that batch size.\n"
    return lines


# What a CNN gets by default: the latency-aware search (fidelity to the original, int8 only where it is faster).
CNN_QUANTIZE = {"type": "quantize", "target": {"metric": "cosine", "min_value": 0.99}}


def _is_cnn(model) -> bool:
    """Conv in the graph (ONNX) or a Conv module (torch): dynamic int8 would make it slower (ConvInteger)."""
    if model.format == "onnx":
        from optcli.onnxgraph import graph_view

        return bool(graph_view(model.path).by_op("Conv", "ConvTranspose"))
    module = getattr(model, "module", None)
    if module is None:
        return False
    import torch

    convs = (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.ConvTranspose2d)
    return any(isinstance(m, convs) for m in module.modules())


def already_int8(model) -> str | None:
    """What makes the model int8 already (its int8 ops), or None. ONNX: the check `run` refuses a second quantize
    with; torch: int8 weights (torch.ao modules) or quantized:: ops in a TorchScript graph."""
    from collections import Counter

    if model.format == "onnx":
        from optcli.recipe import holds_int8

        if model.path is None or not holds_int8(model.path):
            return None
        from optcli.onnx_check import QUANTIZED_OPS, all_nodes
        from optcli.onnxgraph import graph_view

        proto = graph_view(model.path).proto
        ops = Counter(n.op_type for n in all_nodes(proto) if n.op_type in QUANTIZED_OPS)
        return ", ".join(f"{k} {op}" for op, k in ops.most_common(3))
    import torch

    module = model.module
    if isinstance(module, torch.jit.ScriptModule):
        from optcli.verbs.inspection import node_kinds

        ops = Counter(k for k in node_kinds(module.inlined_graph) if k.startswith("quantized::"))
        return ", ".join(f"{k} {op}" for op, k in ops.most_common(3)) or None
    if module is None:
        return None
    state = module.state_dict()
    int8 = [k for k, v in state.items() if isinstance(v, torch.Tensor) and (v.is_quantized or v.dtype == torch.int8)]
    kinds = Counter(
        type(m).__name__ for m in module.modules() if type(m).__module__.startswith("torch.ao.nn.quantized")
    )
    if not int8 and not kinds:
        return None
    return ", ".join(f"{k} {name}" for name, k in kinds.most_common(3)) or f"{len(int8)} int8 weight tensors"


def fidelity_gate_limits(model) -> dict:
    """The recipe gates that judge this model's outputs in their own terms (optcli.gates.fidelity_gates), read from
    one run on generated inputs: class scores by top-1 agreement, sequences per position, a probability or a
    regression by its error over its range, embeddings and other tensors by cosine (alongside any agreement)."""
    from optcli.gates import DEFAULT_MAX_VALUE_ERROR, DEFAULT_MIN_AGREEMENT, DEFAULT_MIN_COSINE
    from optcli.measure import output_kind, runner_for
    from optcli.model import batch_sizes_taken, feeds_for_batch

    try:
        feeds = feeds_for_batch(model.inputs, batch_sizes_taken(model.inputs, [4])[0])
        assert feeds is not None, "batch_sizes_taken picked a batch size the inputs take"
        outputs = runner_for(model, threads=1)(feeds)
    except Exception:  # noqa: BLE001 (generated inputs may not suit the model: the cosine gate then stands)
        return {"min_fidelity_cosine": DEFAULT_MIN_COSINE}
    kinds = {output_kind(out) for out in outputs}
    gates = {}
    if kinds - {"value", "labels"}:
        gates["min_fidelity_cosine"] = DEFAULT_MIN_COSINE
    if kinds & {"classes", "labels"}:
        gates["min_top1_agreement"] = DEFAULT_MIN_AGREEMENT
    if "sequence" in kinds:
        gates["min_position_agreement"] = DEFAULT_MIN_AGREEMENT
    if "value" in kinds:
        gates["max_value_error"] = DEFAULT_MAX_VALUE_ERROR
    return gates or {"min_fidelity_cosine": DEFAULT_MIN_COSINE}


GATES_BY_TASK = {
    "feature-extraction": {"min_fidelity_cosine": 0.99},
    "text-classification": {"max_accuracy_drop": 0.01},
    "token-classification": {"max_accuracy_drop": 0.01},
    "causal-lm": {"max_perplexity_increase": 0.05},
}


def _folder_recipe(path: Path, model, recipe_dir: Path) -> str:
    """A Hugging Face folder: its task, text data read by its own tokenizer, export + dynamic per-channel int8."""
    labelled = model.task in ("text-classification", "token-classification")
    recipe = {
        "model": {"path": _shown(path, recipe_dir), "task": model.task},
        "data": {
            "calibration": {"text": "calibration.txt", "samples": 256, "max_length": 128},
            "eval": {"text": "eval.jsonl" if labelled else "eval.txt", "max_length": 128},
        },
        "passes": [
            {"type": "export", "opset": 18},
            {"type": "quantize", "mode": "dynamic", "per_channel": True},
        ],
        "report": {"latency": {"batch_sizes": [1, 32], "warmup": 5, "runs": 30, "threads": 2}},
        "gates": GATES_BY_TASK[model.task],
    }
    data_note = (
        '# eval.jsonl: one {"text": "the dog sat", "labels": [one per word]} per line (class indices or label2id names).\n'
        if model.task == "token-classification"
        else '# eval.jsonl: one {"text": ..., "label": ...} per line (labels: class index or a name in config.json label2id).\n'
        if labelled
        else "# eval.txt: one example per line"
        + (
            " (perplexity is measured on it).\n"
            if model.task == "causal-lm"
            else " (fidelity to fp32 is measured on it).\n"
        )
    )
    header = (
        f"# optcli recipe for the Hugging Face folder {path.name} ({model.kind.removeprefix('hf ')}, written by optcli init)\n"
        "# Put your text beside this file: calibration.txt holds one example per line, tokenized by the folder's tokenizer.\n"
        + data_note
        + "# `optcli passes` lists every option; `optcli validate` checks this file.\n"
    )
    return header + yaml.safe_dump(recipe, sort_keys=False)
