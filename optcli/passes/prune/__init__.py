"""Magnitude pruning: unstructured masks (torch or ONNX initializers) or whole output channels (torch-pruning).

Unstructured pruning zeroes the smallest weights and keeps the tensor shapes: the file compresses
much better, dense kernels run no faster. Structured pruning removes whole channels / features and
fixes every dependent layer with torch-pruning's dependency graph: smaller tensors, real speed.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from optcli.config import StrictModel
from optcli.errors import first_line
from optcli.layers import onnx_layers, torch_layers
from optcli.onnxgraph import graph_view, load_model
from optcli.passes.base import Context, PassConfig, PassSpec, attach_training_hook


class Schedule(StrictModel):
    steps: int = Field(
        ge=1,
        le=10_000_000,
        description="optimizer steps of the following finetune over which sparsity ramps up (cubic, Zhu & Gupta 2017)",
    )
    initial_sparsity: float = Field(default=0.0, ge=0, lt=1, description="sparsity at step 0 of the ramp")
    every: int = Field(default=1, ge=1, description="raise the masks every this many optimizer steps")


class Config(PassConfig):
    type: Literal["prune"] = "prune"
    method: Literal["magnitude"] = Field(
        default="magnitude",
        description="smallest |w| first: L1 for unstructured weights, L2 norm of each channel for structured",
    )
    sparsity: float = Field(
        default=0.5,
        ge=0,
        lt=1,
        description="fraction of weights (unstructured) or output channels (structured) removed",
    )
    scope: Literal["global", "layer"] = Field(
        default="global",
        description="global: rank all pruned layers' weights together; layer: every layer reaches `sparsity` itself",
    )
    structured: Literal["none", "channels"] = Field(
        default="none",
        description="none: zero weights with masks; channels: remove output channels of Conv / output features of Linear (torch models)",
    )
    layers: dict[str, float] = Field(
        default_factory=dict,
        description='per-layer sparsity by glob on module names, e.g. {"features.*": 0.7}; 0 leaves a layer alone',
    )
    exclude: list[str] | None = Field(
        default=None,
        description="globs of layers left alone; default (null): the first conv and the last layer (classifier head)",
    )
    min_params: int = Field(default=0, ge=0, description="layers with fewer weights than this are left alone")
    schedule: Schedule | None = Field(
        default=None, description="gradual pruning during the following finetune: {steps: N}; unstructured only"
    )

    @field_validator("layers")
    @classmethod
    def _sparsities_in_range(cls, value: dict[str, float]) -> dict[str, float]:
        for pattern, sparsity in value.items():
            if not 0 <= sparsity < 1:
                raise ValueError(f"layers[{pattern!r}]: sparsity {sparsity} is outside [0, 1)")
        return value


def check(config: Config, recipe, input_format: str) -> None:
    if config.structured == "channels" and input_format == "onnx":
        raise ValueError(
            "structured: channels needs a torch model (an ONNX graph cannot be re-wired here); prune before the export pass, or use structured: none"
        )
    if config.schedule is not None:
        if config.structured != "none":
            raise ValueError(
                "schedule works with unstructured masks only; structured pruning is one shot (follow it with finetune to recover)"
            )
        index = next(i for i, p in enumerate(recipe.passes) if p is config)
        if not any(p.type == "finetune" for p in recipe.passes[index + 1 :]):
            raise ValueError(
                "schedule: gradual pruning happens during training; add a finetune pass after prune, or drop schedule for one-shot pruning"
            )
    if input_format == "onnx" and recipe.model.format == "onnx" and recipe.passes[0] is config:
        _check_onnx_layers(config, recipe.model.path)
    if input_format == "torch" and recipe.model.path.suffix.lower() in (".pt", ".pth"):
        from optcli.artifact import graph_file_kind

        if graph_file_kind(recipe.model.path) == "torchscript":  # every torch pass before this one keeps it so
            raise ValueError(graph_refusal(recipe.model.path.name, "torchscript").removeprefix("prune: "))
    if input_format == "torch" and recipe.model.path.suffix.lower() == ".pt2":
        raise ValueError(
            "a .pt2 (torch.export) file keeps no Conv/Linear modules to prune; give the state_dict with model.factory"
        )


def _check_onnx_layers(config: Config, path) -> None:
    """Globs and prunable layers can be checked before any work when the pass reads the recipe's own ONNX file."""
    from optcli.errors import BadInput
    from optcli.passes.prune.plan import make_plan

    if not path.is_file():
        return  # check_recipe reports the missing file
    try:
        proto = graph_view(path).proto
    except Exception:
        return  # the loader reports an unreadable file with its own message
    try:
        make_plan(onnx_layers(proto, with_weights=False), config, f"the ONNX graph {path.name}")
    except BadInput as e:
        raise ValueError(str(e).removeprefix("prune: ")) from None


def preflight(config: Config, recipe, original) -> None:
    """Globs that match nothing and models with nothing to prune fail at validate, before any work.

    Only for prune passes that see the original module: passes before them may rename or replace layers.
    """
    from optcli.passes.prune.plan import make_plan

    index = next(i for i, p in enumerate(recipe.passes) if p is config)
    if original.format != "torch" or any(p.type != "prune" for p in recipe.passes[:index]):
        return
    _refuse_scripted(original)
    make_plan(torch_layers(original.module, original.inputs), config, _describe(original.module))


def apply(model, config: Config, ctx: Context):
    if model.format == "onnx":
        return _prune_onnx(model, config, ctx)
    if config.structured == "channels":
        return _prune_channels(model, config, ctx)
    return _prune_masks(model, config, ctx)


# --------------------------------------------------------------------------- torch


def _describe(module) -> str:
    return f"the {type(module).__name__} model"


def _refuse_scripted(model) -> None:
    import torch

    from optcli.errors import BadInput

    if isinstance(model.module, (torch.jit.ScriptModule, torch.fx.GraphModule)):
        raise BadInput(graph_refusal(model.path.name if model.path else "the model", model.kind or "a graph"))


def graph_refusal(name: str, kind: str) -> str:
    return (
        f"prune: {name} was loaded as {kind}, which keeps no Conv/Linear modules to prune; give the state_dict with "
        "model.factory"
    )


def _param_counts(module) -> tuple[int, int]:
    """(parameters, nonzero) with any prune masks applied."""
    import torch

    total = nonzero = 0
    for sub in module.modules():
        for pname, p in sub.named_parameters(recurse=False):
            if pname.endswith("_orig") and hasattr(sub, pname[: -len("_orig")] + "_mask"):
                p = getattr(sub, pname[: -len("_orig")])
            total += p.numel()
            nonzero += int(torch.count_nonzero(p))
    return total, nonzero


def _prune_masks(model, config: Config, ctx: Context):
    import copy

    from optcli.passes.prune.plan import PruneSchedule, apply_plan, layer_sparsity, make_plan

    _refuse_scripted(model)
    module = copy.deepcopy(model.module)  # the original stays untouched: it is the reference / distillation teacher
    layers = torch_layers(module, model.inputs)
    plan = make_plan(layers, config, _describe(module))
    before, _ = _param_counts(module)
    if config.schedule is not None:
        s = config.schedule
        schedule = PruneSchedule(plan, steps=s.steps, initial=s.initial_sparsity, every=s.every)
        attach_training_hook(module, schedule)
        ctx.details["schedule"] = schedule.describe()
        ctx.log(f"{ctx.step_name}: gradual pruning to {config.sparsity:.0%} over {s.steps} finetune steps (cubic ramp)")
    else:
        apply_plan(plan)
    after, nonzero = _param_counts(module)
    _record(ctx, config, plan, {layer.name: layer_sparsity(layer.handle) for layer in layers}, before, after, nonzero)
    return model.with_(module=module)


def _prune_channels(model, config: Config, ctx: Context):
    import torch
    import torch_pruning as tp

    from optcli.errors import PassFailed
    from optcli.model import example_inputs, fold_pruning
    from optcli.passes.prune.plan import make_plan

    _refuse_scripted(model)
    module = fold_pruning(model.module)  # a copy, earlier masks folded: torch-pruning slices plain weights
    layers = torch_layers(module, model.inputs)
    plan = make_plan(layers, config, _describe(module))
    # Output features of the last layer are the model's outputs: never remove them, whatever exclude says.
    head = layers[-1]
    chosen = {layer.name for layer in plan.layers if layer.name != head.name}
    ratio_dict = {
        layer.handle: sparsity
        for members, sparsity in plan.groups
        for layer in members
        if layer.name in chosen and sparsity != config.sparsity
    }
    ignored = [layer.handle for layer in layers if layer.name not in chosen]
    feeds = example_inputs(model.inputs, batch=2, seed=ctx.seed)
    args = tuple(torch.from_numpy(feeds[s.name]) for s in model.inputs)
    module.eval()
    with torch.no_grad():
        shapes_before = [tuple(o.shape) for o in _outputs(module(*args))]
    shapes = {
        n: tuple(m.weight.shape)
        for n, m in module.named_modules()
        if isinstance(getattr(m, "weight", None), torch.Tensor)
    }
    before = sum(p.numel() for p in module.parameters())
    pruner = tp.pruner.MetaPruner(
        module,
        args[0] if len(args) == 1 else list(args),
        importance=tp.importance.MagnitudeImportance(p=2),
        global_pruning=config.scope == "global",
        pruning_ratio=config.sparsity,
        pruning_ratio_dict=ratio_dict or None,
        ignored_layers=ignored,
    )
    pruner.step()
    module.eval()
    with torch.no_grad():
        shapes_after = [tuple(o.shape) for o in _outputs(module(*args))]
    if shapes_after != shapes_before:
        raise PassFailed(
            ctx.step_name,
            f"channel pruning changed the output shapes {shapes_before} -> {shapes_after}; exclude the layers that produce outputs",
        )
    after = sum(p.numel() for p in module.parameters())
    shrunk = {
        n: {"before": list(shapes[n]), "after": list(m.weight.shape)}
        for n, m in module.named_modules()
        if n in shapes and tuple(m.weight.shape) != shapes[n]
    }
    per_layer = {layer.name: round(1 - layer.handle.weight.numel() / layer.numel, 6) for layer in layers}
    channels = {layer.name: round(1 - layer.handle.weight.shape[0] / shapes[layer.name][0], 6) for layer in layers}
    _record(ctx, config, plan, per_layer, before, after, after)
    ctx.details["per_layer_channels_removed"] = channels
    targets = {layer.name: sparsity for members, sparsity in plan.groups for layer in members if layer.name in chosen}
    total = sum(shapes[n][0] for n in targets)
    removed = sum(shapes[n][0] * channels[n] for n in targets)
    wanted = sum(shapes[n][0] * s for n, s in targets.items())
    ctx.details["channels_removed"] = round(removed / total, 6) if total else 0.0
    if abs(removed - wanted) > max(1, len(targets)):  # torch-pruning rounds each layer to whole channels
        ctx.warn(
            f"removed {removed:.0f} of {total} output channels of the pruned layers, not the {wanted:.0f} asked: torch-pruning keeps "
            "at least one channel per layer and leaves channels alone that an excluded layer shares (residual additions)"
        )
    ctx.details["shrunk_layers"] = shrunk
    ctx.details["output_shapes"] = [list(s) for s in shapes_after]
    if not shrunk:
        ctx.warn(
            "no channel could be removed (every group touches an excluded layer); try exclude: [<head>] or a higher sparsity"
        )
    return model.with_(module=module)


def _outputs(out) -> list:
    from optcli.measure import flatten_outputs

    return flatten_outputs(out)


# --------------------------------------------------------------------------- ONNX


def _prune_onnx(model, config: Config, ctx: Context):
    import onnx
    import torch
    from onnx import numpy_helper

    from optcli.artifact import save_onnx
    from optcli.errors import PassFailed
    from optcli.passes.prune.plan import apply_plan, layer_sparsity, make_plan

    proto = load_model(model.path)  # pruned in place below: its own copy
    inits = {t.name: t for t in proto.graph.initializer}
    layers = onnx_layers(proto, with_weights=True)
    plan = make_plan(layers, config, f"the ONNX graph {model.path.name}")
    before = sum(layer.numel for layer in layers)
    apply_plan(plan)
    for layer in plan.layers:
        arr = layer.handle.weight.detach().numpy().astype(layer.handle.dtype)
        inits[layer.handle.onnx_name].CopyFrom(numpy_helper.from_array(arr, layer.handle.onnx_name))
    nonzero = sum(int(torch.count_nonzero(layer.handle.weight)) for layer in layers)
    try:
        onnx.checker.check_model(proto, full_check=True)
    except Exception as e:
        raise PassFailed(ctx.step_name, f"pruned graph fails the ONNX checker: {first_line(e)}") from None
    target = save_onnx(proto, ctx.step_dir / "model.onnx")
    _record(ctx, config, plan, {layer.name: layer_sparsity(layer.handle) for layer in layers}, before, before, nonzero)
    ctx.details["parameters_counted"] = "weights of Conv/Gemm/MatMul initializers"
    return model.with_(path=target)


# --------------------------------------------------------------------------- report


def _record(ctx: Context, config: Config, plan, per_layer: dict, before: int, after: int, nonzero: int) -> None:
    pruned = plan.layers
    total = sum(layer.numel for layer in pruned)
    removed = sum(per_layer[layer.name] * layer.numel for layer in pruned)
    ctx.details.update(
        {
            "structured": config.structured,
            "scope": config.scope,
            "target_sparsity": config.sparsity,
            "pruned_layers_sparsity": round(removed / total, 6) if total else 0.0,
            "per_layer_sparsity": {k: round(float(v), 6) for k, v in per_layer.items()},
            "excluded_layers": plan.excluded,
            "parameters_before": before,
            "parameters_after": after,
            "nonzero_parameters_after": nonzero,
        }
    )


PASS = PassSpec(
    type="prune",
    config=Config,
    consumes=frozenset({"torch", "onnx"}),
    apply=apply,
    check=check,
    preflight=preflight,
    rerun_on_resume=True,  # seconds of work; reloading the .pt2 would lose the masks and the schedule a finetune needs
    summary="magnitude pruning: unstructured masks (torch, ONNX initializers) or whole channels removed with torch-pruning",
)
