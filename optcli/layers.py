"""Which Conv / Linear / MatMul weights a pass touches: the layers of a torch module or an ONNX graph, in execution
order, and the plan that globs (`layers`, `exclude`) and `min_params` make of them.

Shared by the passes that work layer by layer on weights (prune, cluster), which never import each other.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Any

from optcli.errors import BadInput


@dataclass
class Layer:
    name: str
    kind: str  # "conv" | "linear"
    numel: int
    handle: Any = None  # the nn.Module (torch) or the holder of an ONNX initializer


@dataclass
class Plan:
    """Which layers get which sparsity; each group is pruned to its sparsity as one pool of weights."""

    groups: list[tuple[list[Layer], float]] = field(default_factory=list)
    excluded: dict[str, str] = field(default_factory=dict)  # layer -> why it is left alone

    @property
    def layers(self) -> list[Layer]:
        return [layer for members, _ in self.groups for layer in members]


def default_exclusions(ordered: list[Layer]) -> set[str]:
    """The first conv (few weights, every later layer depends on it) and the last layer (the classifier head)."""
    names = set()
    first_conv = next((layer for layer in ordered if layer.kind == "conv"), None)
    if first_conv is not None:
        names.add(first_conv.name)
    if ordered:
        names.add(ordered[-1].name)
    return names


def make_plan(ordered: list[Layer], config, what: str, family: str = "prune", amount: str = "sparsity") -> Plan:
    """Resolve exclude / layers globs / min_params / scope into groups. Raises BadInput on an impossible request.

    `ordered` is every prunable layer in execution order; `what` names the model in messages, `family` the pass
    asking (prune, cluster) and `amount` its per-layer figure (sparsity, clusters; 0 leaves a layer alone).
    `config` has layers (glob -> amount), exclude, min_params, sparsity (the default amount) and scope.
    """
    able = {"prune": "prunable"}.get(family, f"{family}able")
    if not ordered:
        raise BadInput(f"{family}: {what} has no {able} layers (Conv or Linear weights); nothing to {family}")
    names = [layer.name for layer in ordered]
    overrides: dict[str, float] = {}
    for pattern, sparsity in config.layers.items():
        hits = fnmatch.filter(names, pattern)
        if not hits:
            raise BadInput(
                f"{family}: layers glob {pattern!r} matches no {able} layer of {what} (layers: {_few(names)})"
            )
        for name in hits:
            overrides.setdefault(name, sparsity)  # the first glob that names a layer wins
    plan = Plan()
    if config.exclude is None:
        for name in default_exclusions(ordered):
            if name not in overrides:
                plan.excluded[name] = (
                    f"excluded by default (first conv / classifier head); set exclude: [] to {family} it"
                )
    else:
        for pattern in config.exclude:
            hits = fnmatch.filter(names, pattern)
            if not hits:
                raise BadInput(
                    f"{family}: exclude glob {pattern!r} matches no {able} layer of {what} (layers: {_few(names)})"
                )
            for name in hits:
                plan.excluded[name] = f"exclude: {pattern}"
    shared: list[Layer] = []
    for layer in ordered:
        if layer.name in plan.excluded:
            continue
        if layer.name in overrides:
            if overrides[layer.name] > 0:
                plan.groups.append(([layer], overrides[layer.name]))
            else:
                plan.excluded[layer.name] = f"layers: {amount} 0"
        elif layer.numel < config.min_params:
            plan.excluded[layer.name] = f"{layer.numel} weights < min_params {config.min_params}"
        elif config.sparsity > 0:
            shared.append(layer)
    if shared:
        if config.scope == "global":
            plan.groups.append((shared, config.sparsity))
        else:
            plan.groups.extend(([layer], config.sparsity) for layer in shared)
    if not plan.groups and (config.sparsity > 0 or overrides):
        raise BadInput(
            f"{family}: no layer of {what} is left to {family} after exclude/min_params ({len(plan.excluded)} of {len(names)} "
            f"left alone: {_few(sorted(plan.excluded))}); loosen exclude or min_params"
        )
    return plan


def _few(names: list[str], n: int = 8) -> str:
    return ", ".join(names[:n]) + (f", ... ({len(names)} in all)" if len(names) > n else "")


def torch_layers(module, inputs) -> list:
    """Every Conv/Linear with its weight, in the order the forward pass reaches it."""
    import torch
    from torch import nn

    from optcli.model import example_inputs

    kinds = {
        name: ("conv" if isinstance(m, nn.modules.conv._ConvNd) else "linear", m)
        for name, m in module.named_modules()
        if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))
    }
    seen: list[str] = []
    hooks = [
        m.register_forward_pre_hook(lambda _m, _a, n=name: seen.append(n) if n not in seen else None)
        for name, (_, m) in kinds.items()
    ]
    was_training = module.training
    try:
        feeds = example_inputs(inputs, batch=2)
        with torch.no_grad():
            module.eval()(*[torch.from_numpy(feeds[s.name]) for s in inputs])
    finally:
        for h in hooks:
            h.remove()
        module.train(was_training)
    order = seen + [n for n in kinds if n not in seen]  # layers the forward never reached go last
    return [Layer(n, kinds[n][0], kinds[n][1].weight.numel(), kinds[n][1]) for n in order]


def onnx_layers(proto, with_weights: bool) -> list:
    """Float weight initializers of Conv / Gemm / MatMul in graph order (ONNX stores nodes topologically sorted).

    A layer is named after its initializer without ".weight" (the torch.export-based exporter keeps module
    names: "features.0"), else after its node ("/features/features.0/Conv" from the TorchScript exporter).
    """
    import math

    from onnx import numpy_helper

    inits = {t.name: t for t in proto.graph.initializer}
    layers, seen = [], set()
    for node in proto.graph.node:
        if node.op_type not in ("Conv", "Gemm", "MatMul"):
            continue
        candidates = [node.input[1], node.input[0]] if node.op_type == "MatMul" else node.input[1:2]
        weight = next((i for i in candidates if i in inits), None)
        if (
            weight is None
            or weight in seen
            or inits[weight].data_type not in (1, 10, 11)
            or len(inits[weight].dims) < 2
        ):
            continue  # float32/16/64 matrices and kernels only: int8 weights of a quantized graph stay as they are
        seen.add(weight)
        name = weight.removesuffix(".weight") if weight.endswith(".weight") or not node.name else node.name
        holder = None
        if with_weights:
            import torch

            arr = numpy_helper.to_array(inits[weight])
            holder = torch.nn.Module()
            holder.weight = torch.nn.Parameter(torch.from_numpy(arr.astype("float32", copy=True)), requires_grad=False)
            # nn.Module takes plain attributes at run time; its __setattr__ is typed for tensors and modules only
            holder.onnx_name, holder.dtype = weight, arr.dtype  # type: ignore[assignment]
        layers.append(
            Layer(name, "conv" if node.op_type == "Conv" else "linear", math.prod(inits[weight].dims), holder)
        )
    return layers
