"""What a model is between passes: a torch module in memory or an ONNX file, its inputs, example feeds.

Shared by every pass family and by measurement; loading and saving by format live in artifact.py.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, cast

from optcli.errors import BadInput

BATCH = "batch"


@dataclass(frozen=True)
class InputSpec:
    name: str
    shape: tuple[int, ...]  # concrete example shape; shape[batch_axis] is the batch
    dtype: str
    batch_dynamic: bool = True  # the batch axis is free (False: the file pins its size)
    dynamic_axes: tuple[int, ...] = ()  # axes besides the batch the model leaves free (a text model's sequence)
    high: int | None = None  # exclusive bound of generated integer inputs (token ids inside the vocabulary)
    # The axis samples are stacked on: 0 for most inputs, 1 for a recurrent state (layers x batch x hidden), None
    # for an input with no batch axis (a sample rate, a state of its own size): the same value is fed with every batch.
    batch_axis: int | None = 0
    value: float | int | bool | None = None  # the recipe's value of an input without batch axis (a sample rate)
    python: str | None = None  # TorchScript: forward takes a Python int / float / bool here, not a tensor

    def __post_init__(self):
        if not self.shape or (self.batch_axis is not None and self.batch_axis >= len(self.shape)):
            object.__setattr__(self, "batch_axis", None)
        if self.batch_axis is None:
            object.__setattr__(self, "batch_dynamic", False)

    def shape_for(self, batch: int) -> tuple[int, ...]:
        if self.batch_dynamic and self.batch_axis is not None:
            return tuple(batch if axis == self.batch_axis else d for axis, d in enumerate(self.shape))
        return self.shape

    @property
    def pinned_batch(self) -> int | None:
        """The one batch size the file allows on this input's batch axis (None: free, or no batch axis)."""
        return None if self.batch_dynamic or self.batch_axis is None else self.shape[self.batch_axis]

    def can_batch(self, batch: int) -> bool:
        return self.pinned_batch in (None, batch)


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
    # the inputs as the file declares them ({name, shape, dtype...}), before load_model resolves them into `inputs`
    file_inputs: list[dict] = field(default_factory=list)

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
        axes = {s.batch_axis: batch} if s.batch_dynamic and batch_free and s.batch_axis is not None else {}
        axes.update({axis: torch.export.Dim.DYNAMIC for axis in s.dynamic_axes})
        shapes[s.name] = axes or None
    return shapes


def fixed_batch(inputs: list[InputSpec]) -> int | None:
    """The batch size a model's inputs pin (a fixed batch axis), or None when the batch is free.

    A model whose inputs have no batch axis at all (one vector, scalars) takes one sample at a time: 1."""
    fixed = [s.pinned_batch for s in inputs if s.pinned_batch is not None]
    if fixed:
        return fixed[0]
    return 1 if inputs and all(s.batch_axis is None for s in inputs) else None


def batch_refusal(inputs: list[InputSpec], batch: int) -> str | None:
    """Why the model cannot run at this batch size (a note for the latency table), or None when it can."""
    for s in inputs:
        if not s.can_batch(batch):
            where = f"axis {s.batch_axis} of " if s.batch_axis else ""
            return (
                f"batch {batch} skipped: {where}input {s.name!r} ({spec_shape(s)}) fixes the batch at {s.pinned_batch}"
            )
    if batch != 1 and inputs and all(s.batch_axis is None for s in inputs):
        return f"batch {batch} skipped: no input has a batch axis, so the model takes one sample at a time"
    return None


def feeds_for_batch(inputs: list[InputSpec], batch: int, seed: int = 0) -> dict | None:
    """Generated inputs for one run at this batch size, or None where the inputs pin another batch size."""
    if batch_refusal(inputs, batch) is not None:
        return None
    return example_inputs(inputs, batch=batch, seed=seed)


def batch_sizes_taken(inputs: list[InputSpec], wanted: list[int]) -> list[int]:
    """The batch sizes of `wanted` the model can run, else the one it pins (a model fixed at batch 1: [1])."""
    taken = [b for b in wanted if batch_refusal(inputs, b) is None]
    return taken or [fixed_batch(inputs) or 1]


def split_batches(feeds: dict, inputs: list[InputSpec], size: int) -> list[dict]:
    """Feeds of many samples cut into batches of `size` along each input's batch axis; inputs without a batch
    axis (a sample rate, a state of its own size) go whole with every batch."""
    import numpy as np

    axes = {s.name: s.batch_axis for s in inputs}
    batched = [k for k in feeds if axes.get(k, 0) is not None and getattr(feeds[k], "ndim", 0) > 0]
    if not batched:
        return [feeds]
    n = feeds[batched[0]].shape[axes.get(batched[0], 0) or 0]
    out = []
    for start in range(0, n, size):
        part = {}
        for k, v in feeds.items():
            axis = axes.get(k, 0)
            part[k] = v if k not in batched else np.take(v, range(start, min(n, start + size)), axis=axis or 0)
        out.append(part)
    return out


_BATCH_NAMES = {"batch", "batch_size", "batchsize", "bs", "n", "b", "num_batch", "batch_dim"}


def _free(d) -> bool:
    return not (isinstance(d, int) and d > 0)


def batch_axes(file_inputs: list[dict]) -> list[int | None]:
    """Each input's batch axis, read from the file's dims (ints, or names / None where free).

    An axis named like the batch ("batch", "N"); else a free first axis; else a free axis named as another input's
    batch; else axis 0 where it is 1; else, beside batched inputs, a state's one free axis or its axis of size 1
    (layers x 1 x hidden); else, where no input has a batch axis, axis 0 (a model exported at batch 4). None: no
    batch axis (a scalar, a vector, a state with no axis of size 1): fed the same with every batch."""
    dims = [list(item["shape"]) for item in file_inputs]
    named: dict[str, int] = {}
    for shape in dims:
        if shape and _free(shape[0]) and isinstance(shape[0], str):
            named.setdefault(shape[0], 0)
    axes: list[int | str | None] = []  # "fixed" until decided below
    for shape in dims:
        by_name = [a for a, d in enumerate(shape) if isinstance(d, str) and d.lower() in _BATCH_NAMES]
        if by_name:
            axes.append(by_name[0])
        elif shape and _free(shape[0]):
            axes.append(0)
        elif any(isinstance(d, str) and d in named for d in shape):
            axes.append(next(a for a, d in enumerate(shape) if isinstance(d, str) and d in named))
        else:
            axes.append("fixed")  # decided below, once the other inputs' axes are known
    for i, shape in enumerate(dims):
        if axes[i] == "fixed" and shape and shape[0] == 1:
            axes[i] = 0
    others = any(a not in ("fixed", None) for a in axes)
    for i, shape in enumerate(dims):
        if axes[i] != "fixed":
            continue
        free = [a for a, d in enumerate(shape) if _free(d)]
        if others and len(free) == 1:  # a state's one free axis (layers x ? x hidden) beside batched inputs
            axes[i] = free[0]
        elif len(shape) >= 2 and not others:
            axes[i] = 0
        elif len(shape) >= 2 and 1 in shape[1:]:
            axes[i] = shape.index(1, 1)
        else:
            axes[i] = None
    return cast("list[int | None]", axes)  # every "fixed" was decided just above


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
    """Plausible inputs of the declared shapes: floats ~N(0,1), ids in a small range (inside the table they index),
    masks of ones. Inputs without a batch axis are the same whatever the batch: the recipe's value, else a neutral
    one for a scalar (1: a rate, a count, a scale). Where the inputs pin a batch size, that one is generated."""
    import numpy as np

    batch = fixed_batch(inputs) or batch
    check_memory(inputs, batch, "the batch size")
    rng = np.random.default_rng(seed)
    feeds = {}
    for spec in inputs:
        shape = spec.shape_for(batch)
        lname = spec.name.lower()
        dtype = "float32" if spec.dtype == "bfloat16" else spec.dtype
        if spec.value is not None:
            arr = np.full(shape, spec.value, dtype=dtype)
        elif not shape:
            arr = np.asarray(rng.integers(0, spec.high) if spec.high else 1, dtype=dtype)
        elif spec.dtype.startswith("float") or spec.dtype == "bfloat16":
            arr = rng.standard_normal(shape).astype(dtype)
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
    if spec.python:
        return f"a Python {spec.python}"
    dims = ["N" if spec.batch_dynamic and axis == spec.batch_axis else d for axis, d in enumerate(spec.shape)]
    return readable_shape(dims, free=spec.dynamic_axes)
