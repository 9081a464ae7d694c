"""How shared weights are held: a forward pre-hook on torch modules, uint8 indices + codebook in ONNX."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.nn.utils import prune


class WeightSharing(prune.BasePruningMethod):
    """`weight` = `weight_centroids`[`weight_indices`], recomputed before every forward.

    A pruning method by type, so that torch.nn.utils.prune.remove (called by optcli.model.fold_pruning) folds it and
    copy_module re-materializes it like a mask; centroid 0 stays exactly 0 when `keep_zero` (pruned weights).
    """

    PRUNING_TYPE = "unstructured"

    def __init__(self, name: str, keep_zero: bool):
        self._tensor_name = name
        self.keep_zero = keep_zero

    def compute_mask(self, t, default_mask):  # abstract in torch; sharing has no mask
        return default_mask

    def apply_mask(self, module):
        centroids = getattr(module, self._tensor_name + "_centroids")
        if self.keep_zero:
            centroids = torch.cat([centroids.new_zeros(1), centroids[1:]])
        return centroids[getattr(module, self._tensor_name + "_indices").long()]

    def remove(self, module):
        weight = self.apply_mask(module).detach().clone()
        if hasattr(module, self._tensor_name):
            delattr(module, self._tensor_name)
        del module._parameters[self._tensor_name + "_centroids"]
        del module._buffers[self._tensor_name + "_indices"]
        module.register_parameter(self._tensor_name, nn.Parameter(weight))


def share(module: nn.Module, centroids: np.ndarray, indices: np.ndarray, keep_zero: bool, name: str = "weight") -> None:
    """Replace module.<name> by shared values: centroids (trainable) gathered by fixed indices."""
    weight = getattr(module, name)
    hook = WeightSharing(name, keep_zero)
    del module._parameters[name]
    module.register_parameter(
        name + "_centroids",
        nn.Parameter(torch.tensor(centroids, dtype=weight.dtype, device=weight.device), weight.requires_grad),
    )
    small = np.uint8 if len(centroids) <= 256 else np.int64
    module.register_buffer(name + "_indices", torch.from_numpy(indices.astype(small)).to(weight.device))
    with torch.no_grad():
        setattr(module, name, hook.apply_mask(module))
    module.register_forward_pre_hook(hook)


def store_as_indices(proto, name: str, centroids, indices) -> None:
    """Replace initializer `name` by uint8 indices + a float codebook, gathered back at run time.

    ONNX's Gather takes int32/int64 indices only, so a Cast widens the stored uint8 first. Both inputs are constants:
    ONNX Runtime folds the pair when it builds the session, so the weights are float again in memory.
    """
    from onnx import TensorProto, helper, numpy_helper

    inits = {t.name: t for t in proto.graph.initializer}
    dtype = numpy_helper.to_array(inits[name]).dtype
    book, idx = f"{name}.codebook", f"{name}.indices"
    proto.graph.initializer.remove(inits[name])
    proto.graph.initializer.extend(
        [
            numpy_helper.from_array(np.asarray(centroids, dtype=dtype), book),
            numpy_helper.from_array(np.asarray(indices, dtype=np.uint8), idx),
        ]
    )
    nodes = [
        helper.make_node("Cast", [idx], [f"{idx}.int32"], name=f"{name}/Cast", to=TensorProto.INT32),
        helper.make_node("Gather", [book, f"{idx}.int32"], [name], name=f"{name}/Gather", axis=0),
    ]
    for node in reversed(nodes):
        proto.graph.node.insert(0, node)


def session_seconds(path, repeats: int = 3) -> float:
    """Median time to build an ONNX Runtime session on the file (where the indices' Gathers are folded)."""
    import time

    import onnxruntime as ort

    times = []
    for _ in range(repeats):
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        start = time.perf_counter()
        ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        times.append(time.perf_counter() - start)
    return float(np.median(times))
