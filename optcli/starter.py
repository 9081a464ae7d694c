"""`optcli init MODEL`: a starter recipe with the inputs read from the file."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import yaml

from optcli.errors import BadInput


@dataclass
class Starter:
    text: str  # the recipe, comments first
    notes: list[str]  # what the user should know, for stderr (the recipe's comments say it too)


def starter_recipe(
    path: Path,
    factory: str | None = None,
    shapes: list[str] = (),
    data: Path | None = None,
    trust_pickle: bool = False,
    recipe_dir: Path | None = None,
) -> Starter:
    """The recipe for a model file, its paths relative to recipe_dir (where it is written; default: the working
    folder, what `> recipe.yaml` needs), checked the way `optcli validate` checks it before it is returned."""
    from optcli.artifact import load_any
    from optcli.model import check_feedable

    recipe_dir = Path(os.path.abspath(recipe_dir or Path.cwd()))
    if path.is_dir():
        return Starter(_folder_recipe(path, load_any(path), recipe_dir), [])
    if path.suffix.lower() == ".safetensors" and factory is None:
        raise BadInput(f"{path} holds only weights; pass --factory module:callable that builds the nn.Module")
    try:
        model = load_any(path, shapes, trust_pickle=trust_pickle, factory=factory)
        check_feedable(model.inputs, path)
    except BadInput as e:
        if "does not record its inputs" in str(e):
            raise BadInput(
                f"{path} does not record its input shapes; pass --shape name=1x3x32x32 (and :int64 for ids)"
            ) from None
        if "is a state_dict" in str(e):  # the loader speaks recipe keys; init takes options
            raise BadInput(
                f"{path} is a state_dict (weights only); pass --factory module:callable that builds the nn.Module"
            ) from None
        raise
    spec = {"path": _shown(path, recipe_dir)}
    if factory:
        spec["factory"] = factory
    if model.kind == "pickle":
        spec["trust_pickle"] = True  # --trust-pickle was given for this file: the recipe runs as init checked it
    spec["inputs"] = [{"name": s.name, "shape": list(s.shape), "dtype": s.dtype} for s in model.inputs]
    cnn = _is_cnn(model)
    # Static int8 (what pays on a CNN) needs calibration inputs; without data, dynamic int8 runs as written.
    static = cnn and data is not None
    passes = [CNN_QUANTIZE if static else {"type": "quantize", "mode": "dynamic", "per_channel": True}]
    if model.format == "torch":
        passes.insert(0, {"type": "export", "opset": 18})
    recipe = {"model": spec}
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
        "report": {"latency": {"batch_sizes": [1, 32], "warmup": 5, "runs": 30, "threads": 2}},
        "gates": {"min_fidelity_cosine": 0.99},
    }
    try:
        labels = _check(recipe, recipe_dir, trust_pickle)
    except BadInput as e:
        if "leaves none" not in str(e):
            raise
        raise BadInput(f"{data}: too few samples to split into calibration and eval; give at least 2 (~100)") from None
    header = f"# optcli recipe for {path.name} (written by optcli init; paths are relative to this file)\n"
    notes = []
    if static:
        header += (
            "# A CNN: int8 pays only where ONNX Runtime fuses it (static QDQ, BatchNorm folded, slow regions kept fp32);\n"
            "# the quantize step searches for the fastest int8 model within the target, measured on this machine.\n"
            f"# {data.name}: its first half calibrates, its second half measures (take: [start, stop]).\n"
        )
    if data is not None and labels is not None:
        header += f"# {data.name} holds labels ({labels!r}): the report scores accuracy on them as well as fidelity.\n"
    if data is None:
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
    elif not static:
        header += "# For static int8 (mode: static) add data.calibration (a .npz keyed by input name).\n"
    if model.kind == "pickle":
        header += "# model.trust_pickle: loading this file runs code from it (you passed --trust-pickle).\n"
    header += "# `optcli passes` lists every option; `optcli validate` checks this file.\n"
    return Starter(header + yaml.safe_dump(recipe, sort_keys=False), notes)


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
    evaluation = data.get("eval")
    return evaluation.label_key if evaluation is not None else None


# What a CNN gets by default: the latency-aware search (fidelity to the original, int8 only where it is faster).
CNN_QUANTIZE = {"type": "quantize", "target": {"metric": "cosine", "min_value": 0.99}}


def _is_cnn(model) -> bool:
    """Conv in the graph (ONNX) or a Conv module (torch): dynamic int8 would make it slower (ConvInteger)."""
    if model.format == "onnx":
        import onnx

        graph = onnx.load(str(model.path), load_external_data=False).graph
        return any(n.op_type in ("Conv", "ConvTranspose") for n in graph.node)
    module = getattr(model, "module", None)
    if module is None:
        return False
    import torch

    convs = (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.ConvTranspose2d)
    return any(isinstance(m, convs) for m in module.modules())


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
