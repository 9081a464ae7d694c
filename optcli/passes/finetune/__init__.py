"""Fine-tune a torch model on data.train, with optional knowledge distillation from a teacher.

The pass prepares the modules (student, teacher, new head, frozen parameters), checks that data,
student and teacher fit together before any step is taken, and hands the rest to
launch.run_training, which trains here or in workers with loop.train, the plain training loop.

The family, lowest layer first (each imports only those above it in this list):
    config.py   the pass's typed settings (pydantic, no torch): what a worker rebuilds its job from
    loop.py     the training loop in plain PyTorch: build, resume, one epoch, the loop; AMP; checkpoints
    launch.py   one process or torch's elastic launcher (workers, failures, rank 0's checkpoint)
    __init__.py this pass: check (at recipe load), apply (torch imported here, lazily)
"""

from __future__ import annotations

from pathlib import Path

from optcli.errors import BadInput, first_line
from optcli.hf import is_folder
from optcli.passes.base import Context, PassSpec
from optcli.passes.finetune.config import Config, ModelRef, check_settings
from optcli.passes.finetune.details import FinetuneDetails

__all__ = ["PASS", "Config", "apply", "check"]


def _ref(value) -> ModelRef | None:
    if value is None or value == "reference":
        return None
    return value if isinstance(value, ModelRef) else ModelRef(path=value)


def check(config: Config, recipe, input_format: str) -> None:
    check_settings(config.distributed, config.device, config.amp)
    if input_format == "torch" and _ref(config.student) is None:
        from optcli.artifact import graph_file_kind

        if graph_file_kind(recipe.model.path) == "torchscript":  # what apply would refuse after the first measurement
            raise ValueError(scripted_refusal("the model"))
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
        if ref.path.is_dir():
            if not is_folder(ref.path):
                raise ValueError(
                    f"{role}.path: {ref.path} is a folder without config.json; give a model file or a Hugging Face folder"
                )
        elif not ref.path.is_file():
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

    if ref.path is None:
        assert ref.factory is not None, "ModelRef validates that it names a path or a factory"
        module = build_from_factory(ref.factory, ref.factory_kwargs, f"{role}.factory")
    else:
        # The recipe's own model: section with this file in it, so the inputs it declares carry over.
        spec = ctx.recipe.model.model_copy(
            update={
                "path": ref.path,
                "factory": ref.factory,
                "factory_kwargs": ref.factory_kwargs,
                "trust_pickle": ref.trust_pickle,
                "output_names": None,
            }
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

    if isinstance(module, torch.jit.ScriptModule):
        raise BadInput(scripted_refusal(where))
    return module


def scripted_refusal(where: str) -> str:
    return (
        f"{where} is TorchScript, which optcli does not re-save after training; give a state_dict + factory or a .pt2"
    )


def apply(model, config: Config, ctx: Context):
    import torch

    from optcli.model import copy_module
    from optcli.passes.finetune.job import TrainJob, freeze, replace_head
    from optcli.passes.finetune.launch import run_training

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

    _check_fit(student, teacher, train_data, eval_data, names)

    checkpoints = Path(f"{ctx.resume_dir}.ckpt") if ctx.resume_dir is not None else None
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


def _check_fit(student, teacher, train_data, eval_data, names: list[str]) -> None:
    """Everything that must fit, checked on one batch before the first step: outputs, labels, classes."""
    import torch

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


def _logits(module, inputs, role: str):
    from optcli.passes.finetune.job import eval_logits

    try:
        return eval_logits(module, inputs)
    except Exception as e:
        raise BadInput(
            f"{role}: does not run on data.train's inputs ({type(e).__name__}: {first_line(e, 200)})"
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
    details=FinetuneDetails,
)
