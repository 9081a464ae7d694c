"""Weight sharing: each layer's weights replaced by `clusters` shared values (per-layer 1-D k-means).

Torch: a layer's `weight` becomes `weight_centroids` (a k-vector, trained) gathered by `weight_indices` (a fixed
buffer) in a forward pre-hook, so a following finetune trains the centroids while the assignments stay (the
TensorFlow Model Optimization scheme; a weight's gradient adds into its centroid's). The hook is a
torch.nn.utils.prune method, so everything that keeps pruning masks through copies, the fine-tune's worker
processes and the final fold (optcli.model.copy_module / fold_pruning) keeps the sharing as well; layers already
pruned keep their zeros exact (one centroid pinned at 0). A BatchNorm after a clustered layer is folded into it
first (cluster/fold.py): the export would otherwise scale each output channel apart and undo the sharing. ONNX: initializers are rewritten in place, or with
`storage: indices` stored as uint8 indices + a codebook gathered back at run time.

No ONNX kernel reads a look-up table of weights: the gain is storage (the file deflates far better), the latency
is unchanged, and the report says so.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from optcli.onnxgraph import load_model
from optcli.passes.base import Context, PassConfig, PassSpec
from optcli.passes.cluster.details import ClusterDetails

# A layer already this sparse keeps its zeros as one of its shared values (pinned at 0 through training).
SPARSE = 0.05


class Config(PassConfig):
    type: Literal["cluster"] = "cluster"
    clusters: int = Field(default=16, ge=2, le=256, description="shared values per layer (k of the k-means)")
    bits: int | None = Field(default=None, ge=1, le=8, description="or: clusters = 2**bits")
    layers: dict[str, int] = Field(
        default_factory=dict,
        description='per-layer clusters by glob on layer names, e.g. {"classifier": 32}; 0 leaves a layer alone',
    )
    exclude: list[str] | None = Field(
        default=None,
        description="globs of layers left alone; default (null): the first conv and the last layer (classifier head)",
    )
    min_params: int = Field(default=0, ge=0, description="layers with fewer weights than this are left alone")
    fold_batchnorm: bool = Field(
        default=True,
        description="torch: fold the BatchNorm after a clustered layer into it first, so the export keeps the shared "
        "values (it would scale each output channel apart)",
    )
    storage: Literal["dense", "indices"] = Field(
        default="dense",
        description="ONNX: dense (float weights holding k values) | indices (uint8 indices + codebook, Cast + Gather)",
    )

    @field_validator("layers")
    @classmethod
    def _clusters_in_range(cls, value: dict[str, int]) -> dict[str, int]:
        for pattern, k in value.items():
            if k != 0 and not 2 <= k <= 256:
                raise ValueError(f"layers[{pattern!r}]: {k} clusters is outside 2..256 (0 leaves the layer alone)")
        return value

    @model_validator(mode="after")
    def _bits_or_clusters(self) -> Config:
        if self.bits is not None and "clusters" in self.model_fields_set and self.clusters != 2**self.bits:
            raise ValueError(f"give clusters or bits, not both (bits: {self.bits} means clusters: {2**self.bits})")
        return self

    @property
    def k(self) -> int:
        return max(2, 2**self.bits) if self.bits is not None else self.clusters

    # make_plan reads these names: the default amount, and each layer its own group.
    @property
    def sparsity(self) -> int:
        return self.k

    @property
    def scope(self) -> str:
        return "layer"


def check(config: Config, recipe, input_format: str) -> None:
    index = next(i for i, p in enumerate(recipe.passes) if p is config)
    later = [p.type for p in recipe.passes[index + 1 :]]
    if "prune" in later:
        raise ValueError("prune after cluster would break the shared values: prune first, then cluster")
    if config.storage == "indices":
        if input_format != "onnx":
            raise ValueError("storage: indices writes an ONNX graph; put the cluster pass after the export pass")
        if later:
            raise ValueError(
                f"storage: indices turns weights into Gather outputs, which a later {later[0]} cannot read as weights; "
                "make this cluster pass the last one, or use storage: dense"
            )
    if input_format == "torch":  # the recipe's own file reaches this pass: every torch pass before it keeps its kind
        from optcli.artifact import graph_file_kind

        kind = graph_file_kind(recipe.model.path)
        if kind is not None:
            raise ValueError(graph_refusal(recipe.model.path.name, kind).removeprefix("cluster: "))
    for p in recipe.passes[:index]:
        if p.type == "prune" and getattr(p, "schedule", None) is not None:
            between = [q.type for q in recipe.passes[recipe.passes.index(p) + 1 : index]]
            if "finetune" not in between:
                raise ValueError(
                    "a prune schedule ramps during a finetune: put that finetune between prune and cluster"
                )


def graph_refusal(name: str, kind: str) -> str:
    return f"cluster: {name} was loaded as {kind}, which keeps no Conv/Linear modules; give the state_dict with model.factory"


def preflight(config: Config, recipe, original) -> None:
    """Globs that match nothing fail at validate, for cluster passes that see the original's layers (after prune only)."""
    from optcli.layers import make_plan, onnx_layers, torch_layers

    index = next(i for i, p in enumerate(recipe.passes) if p is config)
    if any(p.type != "prune" for p in recipe.passes[:index]):
        return
    if original.format == "onnx":
        from optcli.onnxgraph import graph_view

        proto = graph_view(original.path).proto
        layers, what = onnx_layers(proto, with_weights=False), f"the ONNX graph {original.path.name}"
    else:
        import torch

        if isinstance(original.module, (torch.jit.ScriptModule, torch.fx.GraphModule)):
            return  # apply says why a graph has no modules to cluster
        layers, what = torch_layers(original.module, original.inputs), f"the {type(original.module).__name__} model"
    make_plan(layers, config, what, "cluster", "clusters")


def apply(model, config: Config, ctx: Context):
    if model.format == "onnx":
        return _cluster_onnx(model, config, ctx)
    return _cluster_torch(model, config, ctx)


# --------------------------------------------------------------------------- torch


def _cluster_torch(model, config: Config, ctx: Context):
    import torch
    from torch.nn.utils import prune

    from optcli.errors import BadInput
    from optcli.layers import make_plan, torch_layers
    from optcli.model import copy_module
    from optcli.passes.cluster.kmeans import cluster_values
    from optcli.passes.cluster.share import share

    if isinstance(model.module, (torch.jit.ScriptModule, torch.fx.GraphModule)):
        raise BadInput(graph_refusal(model.path.name if model.path else "the model", model.kind or "a graph"))
    module = copy_module(model.module)  # the original stays untouched: it is the reference / distillation teacher
    plan = make_plan(
        torch_layers(module, model.inputs), config, f"the {type(module).__name__} model", "cluster", "clusters"
    )
    if config.fold_batchnorm:
        _fold_batchnorms(module, model.inputs, [members[0].name for members, _ in plan.groups], ctx)
    per_layer = {}
    for members, k in plan.groups:
        layer = members[0]
        sub = layer.handle
        if prune.is_pruned(sub) and hasattr(sub, "weight_mask"):
            prune.remove(sub, "weight")  # fold the mask: the zeros it made become the pinned zero centroid
        weight = sub.weight.detach()
        values = weight.cpu().double().numpy().ravel()
        centroids, index, keep_zero = cluster_values(values, int(k), SPARSE)
        share(sub, centroids, index.reshape(weight.shape), keep_zero)
        per_layer[layer.name] = {"clusters": int(len(centroids)), "weights": layer.numel, "zero_pinned": keep_zero}
    _record(ctx, plan, per_layer)
    return model.with_(module=module)


def _fold_batchnorms(module, inputs, clustered: list[str], ctx: Context) -> None:
    from optcli.passes.cluster.fold import find_pairs, fold

    found = find_pairs(module, inputs)
    folded = {layer: norm for layer, norm in found.pairs.items() if layer in clustered}
    for layer, norm in folded.items():
        fold(module, layer, norm)
    ctx.details["folded_batchnorm"] = folded
    if found.reason:
        ctx.warn(
            f"BatchNorm not folded before clustering: {found.reason}; an export folds it per output channel, so the "
            "file holds up to clusters x channels values per conv"
        )


# --------------------------------------------------------------------------- ONNX


def _cluster_onnx(model, config: Config, ctx: Context):
    import numpy as np
    import onnx
    from onnx import numpy_helper

    from optcli.artifact import save_onnx
    from optcli.errors import PassFailed
    from optcli.layers import make_plan, onnx_layers
    from optcli.passes.cluster.kmeans import cluster_values
    from optcli.passes.cluster.share import store_as_indices

    proto = load_model(model.path)  # clustered in place below: its own copy
    inits = {t.name: t for t in proto.graph.initializer}
    plan = make_plan(
        onnx_layers(proto, with_weights=True), config, f"the ONNX graph {model.path.name}", "cluster", "clusters"
    )
    per_layer = {}
    for members, k in plan.groups:
        layer = members[0]
        init = inits[layer.handle.onnx_name]
        arr = numpy_helper.to_array(init)
        values = arr.astype(np.float64).ravel()
        centroids, index, keep_zero = cluster_values(values, int(k), SPARSE)
        if config.storage == "indices":
            store_as_indices(proto, init.name, centroids, index.reshape(arr.shape))
        else:
            init.CopyFrom(numpy_helper.from_array(centroids[index].reshape(arr.shape).astype(arr.dtype), init.name))
        per_layer[layer.name] = {"clusters": int(len(centroids)), "weights": layer.numel, "zero_pinned": keep_zero}
    try:
        onnx.checker.check_model(proto)
    except Exception as e:
        raise PassFailed(
            ctx.step_name, f"clustered graph fails the ONNX checker: {str(e).splitlines()[0][:300]}"
        ) from None
    target = save_onnx(proto, ctx.step_dir / "model.onnx")
    _record(ctx, plan, per_layer)
    ctx.details["storage"] = config.storage
    if config.storage == "indices":
        from optcli.passes.cluster.share import session_seconds

        ctx.details["session_create_ms"] = {
            "dense_input": round(session_seconds(model.path) * 1000, 2),
            "indices": round(session_seconds(target) * 1000, 2),
        }
        ctx.warn(
            "storage: indices: ONNX Runtime gathers the weights back to float when it builds the session (folded "
            "constants), so memory and latency are those of the dense model; the file is smaller, loading slower"
        )
    return model.with_(path=target)


# --------------------------------------------------------------------------- report


def _record(ctx: Context, plan, per_layer: dict) -> None:
    ctx.details.update(
        {
            "clustered_layers": per_layer,
            "clustered_weights": sum(v["weights"] for v in per_layer.values()),
            "excluded_layers": plan.excluded,
        }
    )
    ctx.warn(
        "weight sharing changes no kernel: latency is unchanged; the gain is the deflate-compressed size "
        "(compressed_bytes)"
    )


PASS = PassSpec(
    type="cluster",
    config=Config,
    consumes=frozenset({"torch", "onnx"}),
    apply=apply,
    check=check,
    preflight=preflight,
    rerun_on_resume=True,  # seconds of work; the written artifact cannot carry the centroids a finetune trains
    summary="weight sharing: per-layer k-means into `clusters` shared values (torch modules, ONNX initializers); smaller compressed files, same latency",
    details=ClusterDetails,
)
