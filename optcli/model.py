"""What a model is between passes: a torch module in memory or an ONNX file, its inputs, example feeds.

Shared by every pass family and by measurement; loading and saving by format live in artifact.py.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from optcli.errors import BadInput

BATCH = "batch"


@dataclass(frozen=True)
class InputSpec:
    name: str
    shape: tuple[int, ...]  # concrete example shape; shape[0] is the batch when batch_dynamic
    dtype: str
    batch_dynamic: bool = True
    dynamic_axes: tuple[int, ...] = ()  # axes besides the batch the model leaves free (a text model's sequence)
    high: int | None = None  # exclusive bound of generated integer inputs (token ids inside the vocabulary)

    def shape_for(self, batch: int) -> tuple[int, ...]:
        if self.batch_dynamic and self.shape:
            return (batch, *self.shape[1:])
        return self.shape


@dataclass
class Model:
    """A model between passes: a torch module in memory, or an ONNX file on disk."""

    format: str  # "torch" | "onnx"
    inputs: list[InputSpec]
    module: Any = None
    path: Path | None = None
    output_names: list[str] = field(default_factory=list)
    kind: str = ""  # how it was loaded: onnx, torchscript, torch.export, state_dict, pickle, hf ...
    task: str = ""  # Hugging Face folders: feature-extraction, text-classification, token-classification, causal-lm
    notes: tuple[str, ...] = ()  # what loading it did that the user should read (keys model.strict: false ignored)

    def with_(self, **changes) -> Model:
        return replace(self, **changes)


def torch_dynamic_shapes(inputs: list[InputSpec], batch_free: bool = True) -> dict:
    """torch.export dynamic_shapes by input name: one shared batch Dim; other free axes left for torch to bound.

    A text model's sequence is bounded by its position table (64, 512 ...), which torch.export derives itself.
    """
    import torch

    batch = torch.export.Dim("batch", min=1, max=65536)
    shapes = {}
    for s in inputs:
        axes = {0: batch} if s.batch_dynamic and batch_free and s.shape else {}
        axes.update({axis: torch.export.Dim.DYNAMIC for axis in s.dynamic_axes})
        shapes[s.name] = axes or None
    return shapes


def fixed_batch(inputs: list[InputSpec]) -> int | None:
    """The batch size a model's inputs pin (a fixed first dimension), or None when the batch is free."""
    fixed = [s.shape[0] for s in inputs if not s.batch_dynamic and s.shape]
    return fixed[0] if fixed else None


def copy_module(module):
    """A deep copy that also works on modules carrying torch.nn.utils.prune masks after a training forward."""
    import copy
    import warnings

    import torch
    from torch.nn.utils import prune

    with torch.no_grad():
        # After a forward with grad enabled the masked `weight` is a non-leaf tensor, which deepcopy refuses: recompute it as a leaf.
        for sub in module.modules():
            for hook in list(sub._forward_pre_hooks.values()):
                if isinstance(hook, prune.BasePruningMethod):
                    setattr(sub, hook._tensor_name, hook.apply_mask(sub))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch's own pytree notice when copying a torch.export graph
        return copy.deepcopy(module)


def fold_pruning(module):
    """A copy of the module with pruning masks / parametrizations folded into plain weights."""
    import torch
    from torch.nn.utils import parametrize, prune

    module = copy_module(module)
    for sub in module.modules():
        for hook in list(sub._forward_pre_hooks.values()):
            if isinstance(hook, prune.BasePruningMethod):
                prune.remove(sub, hook._tensor_name)
        if parametrize.is_parametrized(sub):
            for name in list(sub.parametrizations.keys()):
                parametrize.remove_parametrizations(sub, name, leave_parametrized=True)
    return module.eval() if isinstance(module, torch.nn.Module) else module


def available_memory() -> int:
    """Bytes of memory the OS can give us now without swapping (MemAvailable)."""
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


# ONNX tensor types optcli cannot feed (model inputs come from numpy arrays of numbers): the name users know them by.
_UNFEEDABLE = {8: "string", 14: "complex64", 15: "complex128", 4: "uint16", 5: "int16", 12: "uint32", 13: "uint64"}


def check_feedable(inputs: list[InputSpec], path: Path) -> None:
    """Refuse, in one line, a model whose inputs are not numbers optcli can generate, load and feed."""
    for spec in inputs:
        if spec.dtype.startswith("onnx:"):
            code = int(spec.dtype.split(":")[1]) if spec.dtype.split(":")[1].isdigit() else -1
            kind = _UNFEEDABLE.get(code, f"ONNX type {code}")
            raise BadInput(
                f"{path.name}: input {spec.name!r} takes {kind} tensors; optcli measures and quantizes models whose "
                "inputs are float, int or bool tensors only, so it can do nothing with this one as it stands "
                "(move the string handling out of the graph and give the numeric part)"
            )


def check_memory(inputs: list[InputSpec], batch: int, setting: str) -> None:
    """Refuse, before allocating, a batch of inputs larger than the memory available.

    Past the limit Linux overcommits, and the OOM killer ends the run without a word.
    """
    import numpy as np

    need = 0
    for spec in inputs:
        elements = math.prod(spec.shape_for(batch))
        # generated values pass through a float64/int64 array before the cast
        need += elements * (np.dtype("float32" if spec.dtype == "bfloat16" else spec.dtype).itemsize + 8)
    have = available_memory()
    if need > have:
        biggest = max(inputs, key=lambda s: math.prod(s.shape_for(batch)))
        raise BadInput(
            f"input {biggest.name!r}: batch {batch} of shape {readable_shape(biggest.shape_for(batch))} ({biggest.dtype}) needs {need / 1e9:,.1f} GB, "
            f"more than the {have / 1e9:,.1f} GB of memory available; lower {setting} or the input shape"
        )


def example_inputs(inputs: list[InputSpec], batch: int = 2, seed: int = 0) -> dict:
    """Plausible inputs of the declared shapes: floats ~N(0,1), ids in a small range, masks of ones."""
    import numpy as np

    check_memory(inputs, batch, "the batch size")
    rng = np.random.default_rng(seed)
    feeds = {}
    for spec in inputs:
        shape = spec.shape_for(batch)
        lname = spec.name.lower()
        if spec.dtype.startswith("float") or spec.dtype == "bfloat16":
            arr = rng.standard_normal(shape).astype("float32" if spec.dtype == "bfloat16" else spec.dtype)
        elif spec.dtype == "bool":
            arr = np.ones(shape, dtype=bool)
        elif "mask" in lname:
            arr = np.ones(shape, dtype=spec.dtype)
        elif "type" in lname or "segment" in lname:
            arr = np.zeros(shape, dtype=spec.dtype)
        else:
            arr = rng.integers(0, spec.high or 100, size=shape).astype(spec.dtype)
        feeds[spec.name] = arr
    return feeds


_MACHINE_DIM = re.compile(r"^(DynamicDimension|unk_*|dim|Dim|input_dim|s)[._]?\d*$")


def readable_dim(d) -> int | str:
    """A dimension as a person reads it: its size, its name where an exporter gave it a meaningful one ("batch",
    "height"), else "?" (never a generated name such as 'DynamicDimension.0' or a shape formula)."""
    if isinstance(d, int) and d > 0:
        return d
    if isinstance(d, str) and d.isidentifier() and len(d) <= 24 and not _MACHINE_DIM.match(d):
        return d
    return "?"


def readable_shape(dims, batch: str | None = None, free: tuple[int, ...] = (), sep: str = " x ") -> str:
    """A shape as a person reads it in a message: "? x 3 x 320 x 320", "batch x 3 x height x width", "N x 1 x 8 x 8"
    (`batch` names a free first axis, `free` other axes the model leaves free); never a raw ONNX dim name such as
    'DynamicDimension.0', 'unk__123' or an empty dim_param. The one formatter of shapes in optcli's messages."""
    dims = list(dims)
    if not dims:
        return "scalar"
    shown = [
        batch
        if i == 0 and batch is not None
        else "?"
        if i in free
        else str(d)
        if isinstance(d, int) and not isinstance(d, bool) and d >= 0
        else str(readable_dim(d))
        for i, d in enumerate(dims)
    ]
    return sep.join(shown)


def spec_shape(spec: InputSpec) -> str:
    """What an input takes, as a message says it: "N x 3 x 224 x 224" with the free batch as N."""
    return readable_shape(spec.shape, batch="N" if spec.batch_dynamic else None, free=spec.dynamic_axes)
