"""Fine-tune a torch model on data.train, with optional knowledge distillation from a teacher.

The pass prepares the modules (student, teacher, new head, frozen parameters), checks that data,
student and teacher fit together before any step is taken, and hands the rest to
optcli.training.train, the plain training loop.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Union

from pydantic import Field, model_validator

from optcli.config import ImportRef, RecipePath, StrictModel
from optcli.distributed import AmpSetting, DeviceSetting, DistributedConfig, ScaleLr
from optcli.passes.base import Context, PassConfig, PassSpec


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


def _ref(value) -> ModelRef | None:
    if value is None or value == "reference":
        return None
    return value if isinstance(value, ModelRef) else ModelRef(path=value)


def check(config: Config, recipe, input_format: str) -> None:
    from optcli.distributed import check_settings

    check_settings(config.distributed, config.device, config.amp)
    train = recipe.data.train
    if train is None:
        raise ValueError(
            "finetune needs training data: add data.train (path: train.npz, batch_size: 64), arrays keyed by input name"
        )
    for role, ref in (
        ("distill.teacher", _ref(config.distill.teacher if config.distill else None)),
        ("student", _ref(config.student)),
    ):
        if ref is None or ref.path is None:
            continue
        if ref.path.suffix.lower() == ".onnx":
            raise ValueError(
                f"{role}: {ref.path.name} is ONNX, which torch cannot run backward or hook into; give the torch checkpoint (.pt + factory, or .pt2)"
            )
        if not ref.path.is_file():
            raise ValueError(f"{role}.path: {ref.path} not found")
    if config.max_steps is None and config.patience is not None and config.patience >= config.epochs:
        raise ValueError(
            f"patience {config.patience} >= epochs {config.epochs} can never stop early; lower it or drop it"
        )
    names = [t.name for t in recipe.model.inputs or []]
    keys = _npz_keys(train.path) if train.path is not None else None
    if names and keys is not None:
        missing = [n for n in names if n not in keys]
        if missing:
            raise ValueError(
                f"data.train ({train.path.name}) has no array for model input(s) {', '.join(missing)} "
                f"(keys: {', '.join(keys)}); key the arrays by input name"
            )


def _npz_keys(path: Path) -> list[str] | None:
    # Only the zip directory is read here; the arrays load when the pass runs.
    if path.suffix.lower() != ".npz" or not path.is_file():
        return None
    import numpy as np

    try:
        with np.load(path, allow_pickle=False) as z:
            return list(z.files)
    except Exception:
        return None  # unreadable files are reported with their cause when the data loads


def _load_other(ref: ModelRef, model, role: str, ctx: Context):
    """A teacher or student named by the recipe, as an nn.Module taking the model's inputs."""
    from optcli.artifact import build_from_factory, load_model
    from optcli.config import ModelSpec
    from optcli.errors import BadInput

    if ref.path is None:
        module = build_from_factory(ref.factory, ref.factory_kwargs, f"{role}.factory")
    else:
        spec = ModelSpec(
            path=ref.path,
            factory=ref.factory,
            factory_kwargs=ref.factory_kwargs,
            trust_pickle=ref.trust_pickle,
            inputs=ctx.recipe.model.inputs,
        )
        try:
            module = load_model(spec).module
        except BadInput as e:
            raise BadInput(f"{role}: {e}".replace("model.factory", f"{role}.factory")) from None
    import torch

    if not isinstance(module, torch.nn.Module):
        raise BadInput(f"{role}: built a {type(module).__name__}, not a torch.nn.Module")
    return module


def _trainable(module, where: str):
    import torch

    from optcli.errors import BadInput

    if isinstance(module, torch.jit.ScriptModule):
        raise BadInput(
            f"{where} is TorchScript, which optcli does not re-save after training; give a state_dict + factory or a .pt2"
        )
    return module


def apply(model, config: Config, ctx: Context):
    import torch

    from optcli.distributed import run_training
    from optcli.errors import BadInput
    from optcli.model import copy_module
    from optcli.training import TrainJob, freeze, replace_head

    seed = ctx.seed if config.seed is None else config.seed
    config = config.model_copy(update={"seed": seed})
    train_data, eval_data = ctx.data.train, ctx.data.eval  # data that does not fit the inputs is refused here (exit 2)
    names = [s.name for s in model.inputs]

    torch.manual_seed(seed)  # fresh students and heads start from the same weights every run
    student_ref = _ref(config.student)
    if student_ref is not None:
        student = _trainable(_load_other(student_ref, model, "student", ctx), "student")
    else:
        student = copy_module(_trainable(model.module, "the model"))  # never train the reference in place
    if config.head is not None:
        replace_head(student, config.head.replace, config.head.num_classes)
    frozen = freeze(student, config.freeze) if config.freeze else []

    teacher = None
    if config.distill is not None:
        teacher_ref = _ref(config.distill.teacher)
        teacher = (
            ctx.reference.module if teacher_ref is None else _load_other(teacher_ref, model, "distill.teacher", ctx)
        )
        if teacher is None:
            raise BadInput(
                "distill.teacher: reference is an ONNX graph; give a torch teacher (path: teacher.pt, factory: ...)"
            )

    # Everything that must fit, checked on one batch before the first step.
    feeds, labels = next(train_data.batches(batch_size=2))
    inputs = tuple(torch.from_numpy(feeds[n]) for n in names)
    s_out = _logits(student, inputs, "student")
    if teacher is not None:
        t_out = _logits(teacher, inputs, "teacher")
        if t_out.shape != s_out.shape:
            raise BadInput(
                f"distill.teacher: outputs {tuple(t_out.shape)} but the student outputs {tuple(s_out.shape)} for the same batch; "
                "a teacher must predict the same classes (set head.num_classes to match, or pick another teacher)"
            )
    if train_data.labels is None and teacher is None:
        raise BadInput(
            f"data.train has no labels (keys: {', '.join(train_data.arrays)}); set data.train.labels or add distill: to learn from a teacher"
        )
    all_labels = [
        d.labels
        for d in (train_data, eval_data)
        if d is not None and d.labels is not None and d.labels.dtype.kind in "iu"
    ]
    if all_labels and s_out.ndim == 2 and max(int(lab.max()) for lab in all_labels) >= s_out.shape[1]:
        top = max(int(lab.max()) for lab in all_labels)
        raise BadInput(
            f"data: labels go up to {top} but the model has {s_out.shape[1]} outputs; set head: {{replace: <classifier>, num_classes: {top + 1}}}"
        )

    checkpoints = Path(ctx.options["resume_dir"] + ".ckpt") if ctx.options.get("resume_dir") else None
    job = TrainJob(
        config=config,
        student=student,
        train=train_data,
        eval=eval_data,
        teacher=teacher,
        input_names=names,
        checkpoint_dir=str(checkpoints) if checkpoints else None,
    )
    result, world = run_training(job, config, ctx)  # one process here, or workers through torch's elastic launcher

    ctx.details["training"] = {
        "epochs": result.epochs,
        "best_epoch": result.best_epoch,
        "metric": result.metric,
        "seconds": result.seconds,
        "samples_per_s": result.samples_per_s,
        "steps": result.steps,
        "stopped_early": result.stopped_early,
        "resumed_from_epoch": result.resumed_from_epoch,
        "train_samples": len(train_data),
        "seed": seed,
        "loss": _loss_name(config, train_data.labels is not None),
        "torch_threads": torch.get_num_threads(),
        **world,
    }
    if frozen:
        ctx.details["training"]["frozen_parameters"] = len(frozen)
    if result.kept_zero_tensors:
        ctx.details["training"]["kept_zero_tensors"] = result.kept_zero_tensors
    if checkpoints is not None:
        import shutil

        shutil.rmtree(checkpoints, ignore_errors=True)  # the step's artifact now holds the result
    return model.with_(module=result.student)


def _logits(module, inputs, role: str):
    import torch

    from optcli.errors import BadInput
    from optcli.training import _first_output, _set_eval_mode

    _set_eval_mode(module)
    try:
        with torch.no_grad():
            return _first_output(module(*inputs))
    except Exception as e:
        raise BadInput(
            f"{role}: does not run on data.train's inputs ({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})"
        ) from None


def _loss_name(config: Config, has_labels: bool) -> str:
    if config.distill is None:
        return "cross_entropy"
    parts = [f"{config.distill.alpha if has_labels else 1:g}*T^2*KL(teacher||student)"]
    if has_labels and config.distill.alpha < 1:
        parts.append(f"{1 - config.distill.alpha:g}*CE")
    if config.distill.features:
        parts.append("features MSE")
    return " + ".join(parts)


PASS = PassSpec(
    type="finetune",
    config=Config,
    consumes=frozenset({"torch"}),
    apply=apply,
    check=check,
    summary="fine-tune on data.train, optionally distilling from a teacher; recovers accuracy after pruning, or trains a new head",
)
