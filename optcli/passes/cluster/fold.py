"""Fold each BatchNorm into the Conv/Linear that feeds it, before the layer's weights are shared.

An exporter folds an eval-mode BatchNorm into the conv before it by scaling each output channel by its own
gamma / sigma: a layer clustered into 16 values leaves the export holding up to 16 per channel, and the file
deflates hardly better than the dense one. Folded first, the values the graph stores are the shared ones, and a
following finetune trains the folded layer (its centroids, and the bias the BatchNorm became).

The pairs come from the torch.export graph, not from module order: a conv is folded only when its output goes to
the BatchNorm and nowhere else, and each module runs once, so the fold cannot change what the model computes.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeGuard

if TYPE_CHECKING:
    from torch.fx import Node

_CONVS = ("aten.conv1d", "aten.conv2d", "aten.conv3d", "aten.convolution", "aten.linear")


@dataclass(frozen=True)
class Pairs:
    pairs: dict[str, str]  # layer name -> the BatchNorm module it feeds
    reason: str = ""  # why no pairs could be found (the graph could not be exported), else ""


def find_pairs(module, inputs) -> Pairs:
    import torch

    from optcli.model import example_inputs

    feeds = example_inputs(inputs, batch=2)
    args = tuple(torch.from_numpy(feeds[s.name]) for s in inputs)
    was_training = module.training
    try:
        program = torch.export.export(module.eval(), args, strict=False)
    except Exception as e:  # a model torch.export cannot trace keeps its BatchNorms; the pass says so
        return Pairs({}, f"torch.export could not trace it ({type(e).__name__}: {str(e).splitlines()[0][:160]})")
    finally:
        module.train(was_training)
    core = [n for n in program.graph.nodes if _is_core(n)]
    runs = Counter(_owner(n) for n in core)
    modules = dict(module.named_modules())
    pairs = {}
    for node in core:
        producer = node.args[0] if "batch_norm" in str(node.target) and node.args else None
        if not (_is_core(producer) and "batch_norm" not in str(producer.target) and len(producer.users) == 1):
            continue
        layer, norm = _owner(producer), _owner(node)
        # A module run twice (shared weights) would fold one BatchNorm into both of its uses.
        if runs[layer] == 1 and runs[norm] == 1 and _foldable(modules.get(layer), modules.get(norm), producer):
            pairs[layer] = norm
    return Pairs(pairs)


def _is_core(node) -> TypeGuard[Node]:
    target = str(getattr(node, "target", ""))
    return getattr(node, "op", "") == "call_function" and (target.startswith(_CONVS) or "batch_norm" in target)


def _owner(node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    return path.removeprefix("L['self'].").removeprefix("L__self__.")


def _foldable(layer, norm, producer) -> bool:
    from torch import nn

    if not isinstance(norm, nn.modules.batchnorm._BatchNorm) or norm.running_var is None:
        return False  # no running statistics: eval uses the batch's own, which no weight can hold
    if isinstance(layer, nn.Linear):
        value = producer.meta.get("val")
        return value is not None and value.dim() == 2  # BatchNorm1d's channels are the features only for (N, C)
    return isinstance(layer, nn.modules.conv._ConvNd) and not layer.transposed


def fold(module, layer_name: str, norm_name: str) -> None:
    """In place: the layer's weight and bias take the BatchNorm's affine map; the BatchNorm becomes Identity."""
    import torch
    from torch import nn

    modules = dict(module.named_modules())
    layer, norm = modules[layer_name], modules[norm_name]
    with torch.no_grad():
        scale = torch.rsqrt(norm.running_var + norm.eps)
        shift = -norm.running_mean * scale
        if norm.affine:
            scale, shift = scale * norm.weight, shift * norm.weight + norm.bias
        # A pruned layer's mask multiplies weight_orig: scaling that keeps the zeros where they are.
        weight = layer.weight_orig if hasattr(layer, "weight_orig") else layer.weight
        weight.mul_(scale.reshape(-1, *([1] * (weight.dim() - 1))).to(weight.dtype))
        bias = shift if layer.bias is None else layer.bias * scale + shift
        layer.bias = nn.Parameter(bias.to(weight.dtype))
    parent_name, _, child = norm_name.rpartition(".")
    setattr(modules[parent_name] if parent_name else module, child, nn.Identity())
