"""The finetune family's settings: the typed config of the pass and its parts (pydantic, no torch).

The lowest layer of optcli.passes.finetune: it imports nothing of the family, so the recipe loader,
the pass, the training loop and a spawned worker (which rebuilds its job from Config's JSON dump)
all read the same classes without pulling in each other.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal, Union

from pydantic import Field, model_validator

from optcli.config import ImportRef, RecipePath, StrictModel
from optcli.passes.base import PassConfig

DeviceSetting = Annotated[str, Field(pattern=r"^(auto|cpu|cuda(:\d+)?)$")]
AmpSetting = Literal["none", "bf16", "fp16"]
ScaleLr = Literal["none", "linear"]


class DistributedConfig(StrictModel):
    """How many workers retrain, and where: torchrun's own options, passed through."""

    nproc_per_node: int | Literal["auto"] = Field(
        default=1, description="workers on this machine; auto = one per visible GPU (1 on a CPU-only machine)"
    )
    nnodes: int = Field(default=1, ge=1, le=100_000, description="machines; run the same command on each")
    node_rank: int = Field(
        default=0, ge=0, description="this machine's index (static rendezvous; c10d assigns ranks itself)"
    )
    rdzv_endpoint: str | None = Field(
        default=None,
        description="host:port of the rendezvous on node 0; required when nnodes > 1 (one machine: a free local port)",
    )
    rdzv_backend: Literal["c10d", "static"] = Field(default="c10d", description="torch.distributed rendezvous backend")
    rdzv_id: str = Field(
        default="optcli", min_length=1, description="job id shared by all nodes of one run (multi-node)"
    )
    rdzv_timeout: int = Field(
        default=900, ge=1, le=86_400, description="seconds to wait for every node to join the rendezvous"
    )
    max_restarts: int = Field(
        default=0,
        ge=0,
        le=1000,
        description="restart all workers this often after a failure; they resume from the last epoch checkpoint",
    )
    backend: Literal["auto", "nccl", "gloo"] = Field(
        default="auto", description="process-group backend; auto = nccl on CUDA, gloo on CPU"
    )

    @model_validator(mode="after")
    def _consistent(self) -> DistributedConfig:
        if isinstance(self.nproc_per_node, int) and not 1 <= self.nproc_per_node <= 1024:
            raise ValueError(f"nproc_per_node must be 1..1024 or auto (got {self.nproc_per_node})")
        if self.nnodes > 1 and not self.rdzv_endpoint:
            raise ValueError(
                "nnodes > 1 needs rdzv_endpoint: host:port of node 0, reachable from every node (e.g. 10.0.0.1:29400)"
            )
        if self.rdzv_endpoint and not re.fullmatch(r"[\w.\-\[\]:]+:\d{1,5}", self.rdzv_endpoint):
            raise ValueError(f"rdzv_endpoint {self.rdzv_endpoint!r} is not host:port")
        if self.node_rank >= self.nnodes:
            raise ValueError(f"node_rank {self.node_rank} must be below nnodes {self.nnodes}")
        return self


class ModelRef(StrictModel):
    """Another model: a file (state_dict + factory, .pt2, pickled module) or just a factory (its own weights: fresh, or pretrained if it loads them)."""

    path: RecipePath | None = Field(default=None, description="model file; relative to the recipe")
    factory: ImportRef | None = Field(default=None, description="module:callable that builds the nn.Module")
    factory_kwargs: dict = Field(default_factory=dict)
    trust_pickle: bool = Field(default=False, description="allow torch.load to unpickle a whole module from path")

    @model_validator(mode="after")
    def _something(self) -> ModelRef:
        if self.path is None and self.factory is None:
            raise ValueError("give a path (model file) and/or a factory (module:callable)")
        return self


class Feature(StrictModel):
    student: str = Field(description="student module whose output is matched, e.g. layer3")
    teacher: str = Field(description="teacher module it is matched to")
    weight: float = Field(default=0.1, ge=0, description="weight of this MSE term in the loss")


class Distill(StrictModel):
    teacher: Union[Literal["reference"], ModelRef, RecipePath] = Field(  # noqa: UP007
        default="reference",
        description="reference (the model as loaded, before any pass), a model file, or {path, factory}",
    )
    temperature: float = Field(default=4.0, gt=0, le=1000, description="softmax temperature T of the soft targets")
    alpha: float = Field(
        default=0.7, ge=0, le=1, description="weight of the soft (teacher) term; 1 - alpha goes to the labels"
    )
    features: list[Feature] = Field(
        default_factory=list, description="hidden-state matching (MSE, learned projection when widths differ)"
    )


class Head(StrictModel):
    replace: str = Field(description="name of the classifier nn.Linear to swap, e.g. classifier or fc")
    num_classes: int = Field(ge=1, le=10_000_000, description="outputs of the new head")


class Config(PassConfig):
    type: Literal["finetune"] = "finetune"
    epochs: int = Field(default=3, ge=1, le=100_000, description="passes over data.train")
    max_steps: int | None = Field(
        default=None, ge=1, description="stop after this many optimizer steps (overrides epochs)"
    )
    batch_size: int | None = Field(default=None, ge=1, le=65536, description="default: data.train.batch_size")
    optimizer: Literal["sgd", "adam", "adamw"] = Field(default="adamw", description="torch.optim optimizer")
    lr: float = Field(default=1e-3, gt=0, le=10, description="peak learning rate (after warm-up)")
    momentum: float = Field(default=0.9, ge=0, lt=1, description="sgd only")
    weight_decay: float = Field(default=0.0, ge=0, description="L2 penalty (decoupled for adamw)")
    schedule: Literal["constant", "cosine", "step"] = Field(
        default="cosine", description="learning-rate schedule after warm-up"
    )
    warmup_steps: int = Field(default=0, ge=0, description="linear warm-up steps")
    step_epochs: int = Field(
        default=1, ge=1, description="schedule: step multiplies lr by gamma every this many epochs"
    )
    gamma: float = Field(default=0.1, gt=0, le=1, description="schedule: step decay factor")
    grad_clip: float | None = Field(default=None, gt=0, description="clip the gradient norm to this")
    seed: int | None = Field(default=None, description="default: the recipe's seed; same seed -> same weights on CPU")
    shuffle: bool = Field(default=True, description="reshuffle data.train every epoch")
    patience: int | None = Field(
        default=None, ge=1, description="early stop after this many epochs without eval improvement"
    )
    min_delta: float = Field(default=0.0, ge=0, description="smallest eval improvement that counts")
    keep_best: bool = Field(default=True, description="end with the best epoch's weights (by the eval metric)")
    distill: Distill | None = Field(
        default=None, description="learn from a teacher's soft outputs (knowledge distillation)"
    )
    student: Union[ModelRef, RecipePath, None] = Field(  # noqa: UP007
        default=None, description="train this model instead of the incoming one, e.g. {factory: mypkg:small_net}"
    )
    head: Head | None = Field(default=None, description="swap the classifier for a new task and train it")
    freeze: list[str] = Field(default_factory=list, description="parameter-name globs kept fixed, e.g. ['stem.*']")
    device: DeviceSetting = Field(
        default="auto",
        description="auto (cuda when torch sees a GPU) | cpu | cuda | cuda:N; worker k of a node takes GPU k",
    )
    amp: AmpSetting = Field(
        default="none", description="mixed precision on CUDA: bf16 | fp16 (with loss scaling) | none"
    )
    distributed: DistributedConfig = Field(
        default_factory=DistributedConfig,
        description="workers and nodes, torchrun's options: {nproc_per_node: 2}; optcli run --nproc-per-node etc. override",
    )
    scale_lr: ScaleLr = Field(
        default="none", description="linear: lr x world size, since the global batch is batch_size x world size"
    )


def check_settings(config: DistributedConfig, device: str, amp: str) -> None:
    """Load-time checks (recipe -> exit 2 with its line): combinations that can never run."""
    if config.backend == "nccl" and device == "cpu":
        raise ValueError(
            "distributed.backend nccl needs device cuda (or auto on a GPU machine); gloo is the CPU backend"
        )
    if amp != "none" and device == "cpu":
        raise ValueError(f"amp {amp} is for CUDA devices; on CPU use amp: none")
    if device.startswith("cuda:") and config.nproc_per_node not in (1, "auto"):
        raise ValueError(
            f"device {device} names one GPU but nproc_per_node is {config.nproc_per_node}; use device: cuda (worker k takes GPU k)"
        )
