"""The fine-tune / distillation loop: plain PyTorch, read it top to bottom from `train` at the end.

    result = train(job, env)        # TrainJob in, TrainResult out

train() is the loop over epochs; build() makes the loader, modules and optimizer, resume() reads the
last checkpoint of the same job, train_epoch() is one pass over the data, evaluate() the eval metric.

Contract (also what launch.py builds on):

- `TrainJob` holds everything one worker needs: the typed finetune config (its JSON dump is
  the serializable description), the student module, an optional teacher module, the train /
  eval `optcli.data.Dataset`s, the model's input names and a checkpoint folder. `job.save(folder)`
  writes it as config.json + modules.pt + train.npz/eval.npz and `TrainJob.load(folder)` rebuilds
  it in another process, so a launcher can hand a job to workers started by torch.distributed.run.
- `Env` says where this process sits: rank, world_size, local_rank, device. The default is one
  CPU process. With world_size > 1 the caller has already called
  torch.distributed.init_process_group; the loop then (lines marked `# DDP:`)
    * shards training batches per rank with torch.utils.data.DistributedSampler (set_epoch each
      epoch, so every rank shuffles the same way and sees a disjoint slice),
    * wraps the student in DistributedDataParallel (gradients all-reduced every step),
    * evaluates its own slice of data.eval and all-reduces (metric * count, count), so every rank
      gets the same metric and takes the same early-stopping decision,
    * writes checkpoints and shows progress on rank 0 only (`env.is_main`).
- Determinism: one seed drives the whole run. Shuffles come from the sampler seeded with
  (seed, epoch) and the global RNG (dropout) is reseeded at each epoch start, so an epoch
  depends only on the state at its start: the same seed gives bit-identical weights on CPU, and
  a run resumed from the epoch-k checkpoint ends with the same weights as an uninterrupted run.
- Checkpoints: after each epoch rank 0 writes checkpoint_dir/epoch-<k>.pt (weights, optimizer,
  step, history, best-so-far) atomically and drops the previous one. A job whose folder already
  holds a checkpoint with the same fingerprint (config + starting weights + data) continues from it.
- Pruning: masks of torch.nn.utils.prune live in forward pre-hooks, so pruned weights stay zero
  by construction. Weights that arrive already sparse without hooks (a pruned model re-read from
  disk) keep their zeros too: they are re-zeroed after each optimizer step. A gradual prune
  schedule (passes.base.training_hooks: any hooks a torch pass attached) gets `.step()` after every optimizer step and `.finish()`
  after the last; epochs before it is done are not candidates for "best epoch" (their masks are not final).
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from optcli.errors import BadInput
from optcli.passes.base import training_hooks
from optcli.passes.finetune.config import Config
from optcli.report.terminal import EpochProgress
from optcli.report.write import atomic_path
from optcli.textdata import IGNORE_INDEX

# A tensor whose share of exact zeros is at least this came from pruning; dense training never lands on 0.0 this often.
SPARSE_ZEROS = 0.05


@dataclass(frozen=True)
class Env:
    """Where this process sits in a (possibly distributed) run. Default: a single CPU process."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: str = "cpu"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


@dataclass
class TrainJob:
    config: Config  # config.model_dump(mode="json") is its serializable form
    student: nn.Module
    train: Any  # optcli.data.Dataset
    input_names: list[str]
    eval: Any = None  # optcli.data.Dataset | None
    teacher: nn.Module | None = None
    checkpoint_dir: str | None = None

    def save(self, folder: Path) -> None:
        """Write the job for a worker process: config.json, modules.pt, train.npz, eval.npz."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        meta = {
            "config": self.config.model_dump(mode="json"),
            "input_names": self.input_names,
            "checkpoint_dir": self.checkpoint_dir,
            "datasets": {},
        }
        for name, data in (("train", self.train), ("eval", self.eval)):
            if data is None:
                continue
            arrays = {f"input/{k}": v for k, v in data.arrays.items()}
            if data.labels is not None:
                arrays["labels"] = data.labels
            np.savez(folder / f"{name}.npz", **arrays)
            meta["datasets"][name] = {
                "batch_size": data.batch_size,
                "metric": data.metric,
                "shuffle": data.shuffle,
                "seed": data.seed,
            }
        # Whole modules, not state_dicts: a pruned student carries mask hooks and may be a shrunk copy of no known class.
        torch.save({"student": self.student, "teacher": self.teacher}, folder / "modules.pt")
        (folder / "config.json").write_text(json.dumps(meta, indent=2))

    @classmethod
    def load(cls, folder: Path) -> TrainJob:
        from optcli.data import Dataset

        folder = Path(folder)
        meta = json.loads((folder / "config.json").read_text())
        datasets = {}
        for name, info in meta["datasets"].items():
            with np.load(folder / f"{name}.npz", allow_pickle=False) as z:
                arrays = {k.removeprefix("input/"): z[k] for k in z.files if k.startswith("input/")}
                labels = z["labels"] if "labels" in z.files else None
            datasets[name] = Dataset(
                name, arrays, labels, info["batch_size"], info["metric"], info["shuffle"], info["seed"]
            )
        # The file was written by save() in the parent process of this same run, so unpickling it is trusted.
        modules = torch.load(folder / "modules.pt", map_location="cpu", weights_only=False)
        return cls(
            config=Config.model_validate(meta["config"]),
            student=modules["student"],
            teacher=modules["teacher"],
            train=datasets["train"],
            eval=datasets.get("eval"),
            input_names=meta["input_names"],
            checkpoint_dir=meta["checkpoint_dir"],
        )


@dataclass
class TrainResult:
    student: nn.Module  # trained, unwrapped, on CPU, in eval mode (best epoch's weights when keep_best)
    epochs: list[dict]  # {"epoch", "loss", "metric", "seconds", "samples_per_s", "lr"}
    best_epoch: int | None
    metric: str | None  # what "metric" measures: data.eval's metric, or "eval_loss" when eval has no labels
    seconds: float
    samples_per_s: float
    steps: int
    stopped_early: bool = False
    resumed_from_epoch: int | None = None
    kept_zero_tensors: int = 0
    notes: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- model pieces


def replace_head(module: nn.Module, name: str, num_classes: int) -> nn.Module:
    """Swap the classifier `name` (an nn.Linear) for a fresh one with num_classes outputs."""
    if type(module).__name__ == "GraphModule":
        raise BadInput(
            "head.replace: the model is a torch.export graph, whose layers cannot be swapped; give it as a state_dict + model.factory"
        )
    old = dict(module.named_modules()).get(name)
    if old is None:
        linears = [n for n, m in module.named_modules() if isinstance(m, nn.Linear)]
        raise BadInput(
            f"head.replace: the model has no module {name!r} (its Linear layers: {', '.join(linears[-5:]) or 'none'})"
        )
    if not isinstance(old, nn.Linear):
        raise BadInput(f"head.replace: {name!r} is a {type(old).__name__}; give the name of the final nn.Linear")
    parent_name, _, attr = name.rpartition(".")
    parent = module.get_submodule(parent_name) if parent_name else module
    setattr(parent, attr, nn.Linear(old.in_features, num_classes, bias=old.bias is not None))
    return module


def freeze(module: nn.Module, patterns: list[str]) -> list[str]:
    """Stop gradients to parameters whose names match any glob; returns the frozen names."""
    frozen = []
    for pattern in patterns:
        hits = [n for n, _ in module.named_parameters() if fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            raise BadInput(
                f"freeze: {pattern!r} matches no parameter (names look like {next(iter(dict(module.named_parameters())), '?')})"
            )
        frozen += hits
    for name, p in module.named_parameters():
        if name in frozen:
            p.requires_grad_(False)
    return frozen


def _frozen_modules(module: nn.Module) -> list[nn.Module]:
    # A frozen module with BatchNorm must also keep its running statistics, so it stays in eval mode.
    return [
        m
        for m in module.modules()
        if list(m.parameters(recurse=False)) and not any(p.requires_grad for p in m.parameters(recurse=False))
    ]


def _set_train_mode(module: nn.Module, frozen: list[nn.Module]) -> None:
    if type(module).__name__ == "GraphModule":
        return  # torch.export graphs are fixed in inference mode (BatchNorm uses its running stats)
    module.train()
    for m in frozen:
        m.eval()


def _set_eval_mode(module: nn.Module) -> None:
    if type(module).__name__ != "GraphModule":
        module.eval()


def _first_output(out):
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, dict):
        return next(iter(out.values()))
    if hasattr(out, "logits"):
        return out.logits
    return _first_output(out[0])


def eval_logits(module: nn.Module, inputs: tuple) -> torch.Tensor:
    """The module's first output for one batch, in eval mode and without gradients (the pass's fit checks)."""
    _set_eval_mode(module)
    with torch.no_grad():
        return _first_output(module(*inputs))


def to_tensors(feeds: dict, names: list[str], device: torch.device) -> tuple:
    """Arrays keyed by input name -> the model's positional input tensors on device."""
    return tuple(torch.from_numpy(np.ascontiguousarray(feeds[n])).to(device) for n in names)


class Distiller(nn.Module):
    """The student plus what distillation trains with it: projections from student to teacher feature widths.

    forward(*inputs) -> (logits, [student feature projected to the teacher's width, ...]). Features are
    caught by forward hooks on the named submodules; one wrapper module keeps DDP and checkpoints simple.
    """

    def __init__(
        self, student: nn.Module, features: list, teacher_widths: dict[str, int], student_widths: dict[str, int]
    ):
        super().__init__()
        self.student = student
        self.features = [(f.student, f.teacher, f.weight) for f in features]
        self.projections = nn.ModuleDict()
        for s_name, t_name, _ in self.features:
            s_w, t_w = student_widths[s_name], teacher_widths[t_name]
            if s_w != t_w:  # learned 1x1 projection (a Linear over the width axis) when widths differ
                self.projections[_key(s_name)] = nn.Linear(s_w, t_w, bias=False)
        self._caught: dict[str, torch.Tensor] = {}
        modules = dict(student.named_modules())
        self._hooks = [
            modules[s_name].register_forward_hook(_catcher(self._caught, s_name)) for s_name, _, _ in self.features
        ]

    def release(self) -> None:
        """Take the feature hooks off the student, which lives on after training."""
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def forward(self, *inputs):
        self._caught.clear()
        logits = _first_output(self.student(*inputs))
        feats = []
        for s_name, _, _ in self.features:
            f = self._caught[s_name]
            if _key(s_name) in self.projections:
                f = _width_last(self.projections[_key(s_name)], f)
            feats.append(f)
        return logits, feats


def _key(name: str) -> str:
    return name.replace(".", "__") or "root"


def _catcher(store: dict, name: str):
    def hook(module, args, output):
        store[name] = _first_output(output)

    return hook


def _width_axis(t: torch.Tensor) -> int:
    # Conv maps are (N, C, H, W[, D]): width is C. Everything else (N, D) or (N, L, D): the last axis.
    return 1 if t.ndim >= 4 else t.ndim - 1


def _width_last(linear: nn.Linear, t: torch.Tensor) -> torch.Tensor:
    axis = _width_axis(t)
    return linear(t.movedim(axis, -1)).movedim(-1, axis)


def probe_features(module: nn.Module, names: list[str], inputs: tuple, role: str) -> dict[str, torch.Tensor]:
    """Run one batch and catch the named submodules' outputs (to size projections and check shapes)."""
    modules = dict(module.named_modules())
    missing = [n for n in names if n not in modules]
    if missing:
        some = [n for n in modules if n][:8]
        raise BadInput(
            f"distill.features: the {role} has no module {missing[0]!r} (module names look like: {', '.join(some)})"
        )
    caught: dict[str, torch.Tensor] = {}
    handles = [modules[n].register_forward_hook(_catcher(caught, n)) for n in names]
    try:
        with torch.no_grad():
            out = _first_output(module(*inputs))
    finally:
        for h in handles:
            h.remove()
    lost = [n for n in names if n not in caught]
    if lost:
        raise BadInput(
            f"distill.features: the {role}'s module {lost[0]!r} never ran as a module (a torch.export graph inlines its "
            "submodules); give that model as a state_dict + factory to match hidden features"
        )
    return {"__output__": out, **caught}


def feature_widths(student: nn.Module, teacher: nn.Module, features: list, example: tuple) -> tuple[dict, dict]:
    """Widths of the matched student and teacher features, from one batch; only the width may differ."""
    _set_eval_mode(student)  # probing must not move BatchNorm statistics
    s_caught = probe_features(student, [f.student for f in features], example, "student")
    t_caught = probe_features(teacher, [f.teacher for f in features], example, "teacher")
    s_widths, t_widths = {}, {}
    for f in features:
        s, t = s_caught[f.student], t_caught[f.teacher]
        a_s, a_t = _width_axis(s), _width_axis(t)
        if s.ndim != t.ndim or [d for i, d in enumerate(s.shape) if i != a_s] != [
            d for i, d in enumerate(t.shape) if i != a_t
        ]:
            raise BadInput(
                f"distill.features: student {f.student!r} gives {tuple(s.shape)}, teacher {f.teacher!r} gives {tuple(t.shape)}; "
                "only the width (channels / last axis) may differ"
            )
        s_widths[f.student], t_widths[f.teacher] = s.shape[a_s], t.shape[a_t]
    return s_widths, t_widths


# --------------------------------------------------------------------------- loss and metric


def distillation_loss(logits, teacher_logits, labels, temperature: float, alpha: float):
    """alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE(labels)  (Hinton et al., 2015).

    F.kl_div(log q_student, log p_teacher) is KL(p_teacher || q_student); T^2 keeps the soft term's
    gradients on the scale of the hard one. Without labels the loss is the soft term alone.
    """
    t = temperature
    soft = (
        F.kl_div(
            F.log_softmax(logits / t, -1), F.log_softmax(teacher_logits / t, -1), reduction="batchmean", log_target=True
        )
        * t
        * t
    )
    if labels is None:
        return soft
    return alpha * soft + (1 - alpha) * task_loss(logits, labels)


def task_loss(logits, labels):
    if labels.dtype.is_floating_point:  # regression targets
        return F.mse_loss(logits.reshape(labels.shape), labels)
    if logits.ndim == labels.ndim + 1 and logits.ndim > 2:  # per-token labels (token classification)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX)
    return F.cross_entropy(logits, labels)


def _eval_metric_name(job: TrainJob) -> str | None:
    """What early stopping watches: data.eval's metric, else the distillation loss on data.eval (no labels)."""
    if job.eval is None:
        return None
    if job.eval.labels is not None:
        return job.eval.metric
    return "eval_loss" if job.teacher is not None else None


def _lower_is_better(metric: str) -> bool:
    return metric in ("mse", "eval_loss")


# --------------------------------------------------------------------------- bookkeeping


def fingerprint(job: TrainJob) -> str:
    """Config + starting weights + data: a checkpoint is resumed only by the job that wrote it."""
    h = hashlib.sha256(json.dumps(job.config.model_dump(mode="json"), sort_keys=True).encode())
    for module in (job.student, job.teacher):
        if module is None:
            continue
        for name, t in sorted(module.state_dict().items()):
            h.update(name.encode())
            h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    for data in (job.train, job.eval):
        if data is not None:
            for k, v in sorted(data.arrays.items()):
                h.update(k.encode() + np.ascontiguousarray(v).tobytes())
            if data.labels is not None:
                h.update(np.ascontiguousarray(data.labels).tobytes())
    return h.hexdigest()


def latest_checkpoint(folder: Path | None) -> Path | None:
    if folder is None or not folder.is_dir():
        return None
    found = sorted(folder.glob("epoch-*.pt"), key=lambda p: int(p.stem.split("-")[1]))
    return found[-1] if found else None


def _save_checkpoint(folder: Path, epoch: int, state: dict) -> None:
    target = folder / f"epoch-{epoch}.pt"
    with atomic_path(target) as tmp:  # a crash mid-write never leaves a torn checkpoint behind
        torch.save(state, tmp)
    for old in folder.glob("epoch-*.pt"):
        if old != target:
            old.unlink()


def _sparse_masks(module: nn.Module) -> dict[str, torch.Tensor]:
    masks = {}
    for name, p in module.named_parameters():
        if p.ndim >= 2 and p.requires_grad and (p == 0).float().mean().item() >= SPARSE_ZEROS:
            masks[name] = p.detach() != 0
    return masks


def lr_at(step: int, total: int, cfg, steps_per_epoch: int) -> float:
    """Learning rate at an optimizer step: linear warm-up, then constant, cosine to 0, or step decay."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / (cfg.warmup_steps + 1)
    if cfg.schedule == "cosine":
        progress = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    if cfg.schedule == "step":
        return cfg.lr * cfg.gamma ** ((step // steps_per_epoch) // cfg.step_epochs)
    return cfg.lr


def make_optimizer(params, cfg) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


@contextlib.contextmanager
def deterministic():
    previous = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])


# --------------------------------------------------------------------------- mixed precision (AMP)


def amp_dtype(amp: str, device: str):
    if amp == "none" or not device.startswith("cuda"):
        return None
    return torch.bfloat16 if amp == "bf16" else torch.float16


@contextlib.contextmanager
def autocast(amp: str, device: str):
    """Mixed precision for the forward pass and loss on CUDA (torch.autocast); a no-op otherwise."""
    dtype = amp_dtype(amp, device)
    with torch.autocast("cuda", dtype=dtype) if dtype is not None else contextlib.nullcontext():
        yield


def grad_scaler(amp: str, device: str):
    """fp16 gradients underflow without loss scaling; bf16 has fp32's range and needs none."""
    return torch.amp.GradScaler("cuda", enabled=amp == "fp16" and device.startswith("cuda"))


# --------------------------------------------------------------------------- the loop: build, resume, one epoch, train


@dataclass
class Run:
    """What build() makes for one run: the data loader, the modules, the optimizer. Fixed once built."""

    job: TrainJob
    env: Env
    device: torch.device
    sampler: torch.utils.data.DistributedSampler
    loader: torch.utils.data.DataLoader
    batch_size: int
    steps_per_epoch: int
    epochs: int
    total_steps: int
    student: nn.Module
    teacher: nn.Module | None
    net: Distiller  # the student with its feature projections: what is optimized and checkpointed
    model: nn.Module  # net, or net inside DistributedDataParallel: what the training forward pass calls
    frozen: list[nn.Module]
    masks: dict[str, torch.Tensor]  # weights that arrived pruned without mask hooks: their zeros are kept
    schedule: Any  # passes.base.TrainingHooks (a gradual prune schedule ...: .step(), .finish(), .done), or None
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    metric_name: str | None


@dataclass
class State:
    """Where the run stands between epochs: what a checkpoint holds besides the weights."""

    step: int = 0
    epoch: int = 0  # epochs finished
    history: list[dict] = field(default_factory=list)
    best: dict | None = None  # {"score", "epoch", "model": state_dict} of the best candidate epoch so far
    bad_epochs: int = 0
    resumed_from: int | None = None


def train(
    job: TrainJob, env: Env = Env(), progress: object = True, log: Callable[[str], None] = lambda m: None
) -> TrainResult:
    cfg = job.config
    with deterministic():
        run = build(job, env)
        ckpt_dir = Path(job.checkpoint_dir) if job.checkpoint_dir else None
        key = fingerprint(job) if ckpt_dir else ""
        state = resume(run, ckpt_dir, key, log)
        bar = EpochProgress(progress if env.is_main else False, run.epochs)  # a Feedback, or a bool in workers
        stopped_early = False
        try:
            for epoch in range(state.epoch, run.epochs):
                if state.step >= run.total_steps:
                    break
                task = bar.epoch(epoch + 1, min(run.steps_per_epoch, run.total_steps - state.step))
                started = time.perf_counter()
                loss_sum, seen = train_epoch(run, state, epoch, bar, task, started)
                train_seconds = time.perf_counter() - started
                if run.schedule is not None and (epoch == run.epochs - 1 or state.step >= run.total_steps):
                    run.schedule.finish()  # the final sparsity is reached even if fewer steps ran than planned
                if env.world_size > 1:  # DDP: the epoch loss over all ranks' samples
                    pair = torch.tensor([loss_sum, float(seen)], dtype=torch.float64, device=run.device)
                    torch.distributed.all_reduce(pair)
                    loss_sum, seen = float(pair[0]), int(pair[1])
                metric = evaluate(run)
                row = {
                    "epoch": epoch + 1,
                    "loss": round(loss_sum / max(1, seen), 6),
                    "metric": None if metric is None else round(metric, 6),
                    "seconds": round(time.perf_counter() - started, 3),
                    "samples_per_s": round(seen / max(1e-9, train_seconds), 1),
                    "samples": seen,
                    "train_seconds": round(train_seconds, 4),
                    "lr": run.optimizer.param_groups[0]["lr"],
                }
                state.history.append(row)
                state.epoch = epoch + 1
                bar.update(task, metric=f"{run.metric_name} {metric:.4f}" if metric is not None else "")
                keep_best(run, state, row, metric)
                if ckpt_dir is not None and env.is_main:  # DDP: rank 0 writes, every rank can read it back
                    _save_checkpoint(ckpt_dir, epoch + 1, checkpoint_state(run, state, key))
                if ckpt_dir is not None and env.world_size > 1:  # DDP: nobody races ahead of a checkpoint being written
                    torch.distributed.barrier()
                if cfg.patience is not None and state.bad_epochs >= cfg.patience:
                    stopped_early = True
                    log(
                        f"early stop after epoch {epoch + 1}: no {run.metric_name or 'loss'} improvement for {cfg.patience} epochs"
                    )
                    break
        finally:
            bar.close()
            run.net.release()
        return finish(run, state, stopped_early)


def build(job: TrainJob, env: Env) -> Run:
    """The data loader (sharded per rank), the student wrapped for distillation (and DDP), the optimizer."""
    cfg = job.config
    device = torch.device(env.device)
    names = job.input_names

    # data: a TensorDataset of inputs (+ labels), sharded across ranks by the sampler
    train_arrays = [torch.from_numpy(np.ascontiguousarray(job.train.arrays[n])) for n in names]
    labels = torch.from_numpy(np.ascontiguousarray(job.train.labels)) if job.train.labels is not None else None
    dataset = torch.utils.data.TensorDataset(*train_arrays, *([labels] if labels is not None else []))
    sampler = torch.utils.data.DistributedSampler(
        dataset, num_replicas=env.world_size, rank=env.rank, shuffle=cfg.shuffle, seed=cfg.seed
    )  # DDP: shard per rank
    batch_size = cfg.batch_size or job.train.batch_size
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=sampler)
    steps_per_epoch = len(loader)
    epochs = math.ceil(cfg.max_steps / steps_per_epoch) if cfg.max_steps else cfg.epochs

    # models: the student (wrapped with its feature projections), the teacher frozen in eval mode
    torch.manual_seed(cfg.seed)
    teacher = job.teacher.to(device) if job.teacher is not None else None
    if teacher is not None:
        _set_eval_mode(teacher)
    student = job.student.to(device)
    features = list(cfg.distill.features) if cfg.distill is not None else []
    s_widths, t_widths = {}, {}
    if features:
        example = to_tensors({n: job.train.arrays[n][:2] for n in names}, names, device)
        s_widths, t_widths = feature_widths(student, teacher, features, example)
    net = Distiller(student, features, t_widths, s_widths).to(device)
    model = net
    if env.world_size > 1:  # DDP: gradients all-reduced across ranks on backward
        model = nn.parallel.DistributedDataParallel(net, device_ids=[env.local_rank] if device.type == "cuda" else None)

    return Run(
        job=job,
        env=env,
        device=device,
        sampler=sampler,
        loader=loader,
        batch_size=batch_size,
        steps_per_epoch=steps_per_epoch,
        epochs=epochs,
        total_steps=cfg.max_steps or epochs * steps_per_epoch,
        student=student,
        teacher=teacher,
        net=net,
        model=model,
        frozen=_frozen_modules(student),
        masks=_sparse_masks(student),
        schedule=training_hooks(student),
        optimizer=make_optimizer([p for p in net.parameters() if p.requires_grad], cfg),
        scaler=grad_scaler(cfg.amp, env.device),
        metric_name=_eval_metric_name(job),
    )


def resume(run: Run, ckpt_dir: Path | None, key: str, log) -> State:
    """The last finished epoch of this same job (same fingerprint), if its checkpoint is there; else a fresh start."""
    latest = latest_checkpoint(ckpt_dir)
    if latest is None:
        return State()
    saved = torch.load(latest, map_location=run.device, weights_only=True)
    if saved.get("fingerprint") != key:
        log(f"ignoring {latest}: written by a different config, model or data")
        return State()
    for _ in range(saved["step"] if run.schedule is not None else 0):
        run.schedule.step()  # bring a gradual prune schedule to where it was; the masks themselves come from the state
    run.net.load_state_dict(saved["model"])
    run.optimizer.load_state_dict(saved["optimizer"])
    if run.scaler.is_enabled() and saved.get("scaler"):
        run.scaler.load_state_dict(saved["scaler"])
    log(f"resuming from the checkpoint of epoch {saved['epoch']} ({latest})")
    return State(
        step=saved["step"],
        epoch=saved["epoch"],
        history=saved["history"],
        best=saved["best"],
        bad_epochs=saved["bad_epochs"],
        resumed_from=saved["epoch"],
    )


def train_epoch(run: Run, state: State, epoch: int, bar: EpochProgress, task, started: float) -> tuple[float, int]:
    """One pass over this rank's shard of data.train (or up to max_steps); returns this rank's (loss sum, samples)."""
    cfg, env = run.job.config, run.env
    run.sampler.set_epoch(epoch)  # DDP: every rank permutes with (seed, epoch) and takes its own slice
    torch.manual_seed(cfg.seed + epoch)  # dropout etc. depend only on (seed, epoch): resumable bit for bit
    _set_train_mode(run.net, run.frozen)
    seen, loss_sum = 0, 0.0
    for batch in run.loader:
        for group in run.optimizer.param_groups:
            group["lr"] = lr_at(state.step, run.total_steps, cfg, run.steps_per_epoch)
        with autocast(cfg.amp, env.device):  # AMP: forward and loss in bf16/fp16 on CUDA; a no-op on CPU
            loss = batch_loss(run, batch)
        run.optimizer.zero_grad(set_to_none=True)
        run.scaler.scale(loss).backward()  # AMP: fp16 loss scaling; identity unless amp: fp16 on CUDA
        if cfg.grad_clip:
            run.scaler.unscale_(run.optimizer)
            nn.utils.clip_grad_norm_(run.net.parameters(), cfg.grad_clip)
        run.scaler.step(run.optimizer)
        run.scaler.update()
        state.step += 1
        if run.masks:  # weights that arrived pruned (no mask hooks) stay zero
            with torch.no_grad():
                for name, p in run.student.named_parameters():
                    if name in run.masks:
                        p.mul_(run.masks[name])
        if run.schedule is not None:
            run.schedule.step()
        n = len(batch[0])
        seen += n
        loss_sum += float(loss.detach()) * n
        bar.update(
            task,
            advance=1,
            loss=loss_sum / seen,
            rate=seen * env.world_size / max(1e-9, time.perf_counter() - started),
        )
        if state.step >= run.total_steps:
            break
    return loss_sum, seen


def batch_loss(run: Run, batch: list[torch.Tensor]) -> torch.Tensor:
    """One forward pass: the task loss, or the distillation loss (+ feature terms) against the teacher."""
    names, device, distill = run.job.input_names, run.device, run.job.config.distill
    inputs = tuple(t.to(device) for t in batch[: len(names)])
    y = batch[len(names)].to(device) if len(batch) > len(names) else None
    logits, feats = run.model(*inputs)
    if run.teacher is None:
        return task_loss(logits, y)
    features = run.net.features
    with torch.no_grad():
        t_caught = (
            probe_features(run.teacher, [t_name for _, t_name, _ in features], inputs, "teacher")
            if features
            else {"__output__": _first_output(run.teacher(*inputs))}
        )
    loss = distillation_loss(logits, t_caught["__output__"], y, distill.temperature, distill.alpha)
    for (_, t_name, weight), s_feat in zip(features, feats, strict=False):
        loss = loss + weight * F.mse_loss(s_feat, t_caught[t_name])
    return loss


def evaluate(run: Run) -> float | None:
    """This rank's slice of data.eval, all-reduced into one figure (every rank gets the same one)."""
    if run.metric_name is None:
        return None
    job, env, net, batch_size = run.job, run.env, run.net, run.batch_size
    distill = job.config.distill
    _set_eval_mode(net)
    n = len(job.eval)
    lo, hi = n * env.rank // env.world_size, n * (env.rank + 1) // env.world_size  # DDP: contiguous slice per rank
    outs, losses = [], []
    with torch.no_grad():
        for start in range(lo, hi, batch_size):
            feeds = {k: v[start : min(hi, start + batch_size)] for k, v in job.eval.arrays.items()}
            inputs = to_tensors(feeds, job.input_names, run.device)
            logits, _ = net(*inputs)
            outs.append(logits.float().cpu().numpy())
            if run.metric_name == "eval_loss":
                soft = distillation_loss(
                    logits, _first_output(run.teacher(*inputs)), None, distill.temperature, distill.alpha
                )
                losses.append(float(soft) * len(logits))
    count = hi - lo
    if count == 0:
        value = 0.0
    elif run.metric_name == "eval_loss":
        value = sum(losses) / count
    else:
        from optcli.measure import metric_value

        value = metric_value(run.metric_name, [np.concatenate(outs)], job.eval.labels[lo:hi])
    if env.world_size > 1:  # DDP: count-weighted mean over ranks
        pair = torch.tensor([value * count, float(count)], dtype=torch.float64, device=run.device)
        torch.distributed.all_reduce(pair)
        value = float(pair[0] / pair[1])
    return value


def keep_best(run: Run, state: State, row: dict, metric: float | None) -> None:
    """Early-stopping bookkeeping on the eval metric (else the train loss): the best epoch's weights are kept.

    While a gradual prune schedule still ramps, an epoch is not a candidate: its masks are not the final ones yet.
    """
    score = metric if metric is not None else -row["loss"]
    if metric is not None and _lower_is_better(run.metric_name):
        score = -metric
    candidate = run.schedule is None or run.schedule.done
    if candidate and (state.best is None or score > state.best["score"] + run.job.config.min_delta):
        state.best = {
            "score": score,
            "epoch": row["epoch"],
            "model": {k: v.detach().clone() for k, v in run.net.state_dict().items()},
        }
        state.bad_epochs = 0
    elif candidate:
        state.bad_epochs += 1


def checkpoint_state(run: Run, state: State, key: str) -> dict:
    """What resume() reads back: the State, the weights, the optimizer and the loss scaler."""
    return {
        "fingerprint": key,
        "epoch": state.epoch,
        "step": state.step,
        "history": state.history,
        "bad_epochs": state.bad_epochs,
        "best": state.best,
        "model": run.net.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "scaler": run.scaler.state_dict(),
    }


def finish(run: Run, state: State, stopped_early: bool) -> TrainResult:
    """The trained student on CPU in eval mode (the best epoch's weights when keep_best), with the run's figures."""
    cfg, history, best = run.job.config, state.history, state.best
    if cfg.keep_best and best is not None and best["epoch"] != (history[-1]["epoch"] if history else None):
        run.net.load_state_dict(best["model"])
    best_epoch = best["epoch"] if (best is not None and cfg.keep_best) else (history[-1]["epoch"] if history else None)
    _set_eval_mode(run.student)
    samples, train_seconds = sum(r["samples"] for r in history), sum(r["train_seconds"] for r in history)
    return TrainResult(
        student=run.student.cpu(),
        epochs=history,
        best_epoch=best_epoch,
        metric=run.metric_name,
        seconds=round(sum(r["seconds"] for r in history), 3),
        samples_per_s=round(samples / max(1e-9, train_seconds), 1),
        steps=state.step,
        stopped_early=stopped_early,
        resumed_from_epoch=state.resumed_from,
        kept_zero_tensors=len(run.masks),
    )
