"""The fine-tune / distillation loop: plain PyTorch, read it top to bottom from `train` at the end.

    result = train(job, env)        # TrainJob in, TrainResult out

train() is the loop over epochs; build() makes the loader, modules and optimizer, train_epoch() is one pass over
the data, evaluate() the eval metric. Beside it: job.py (TrainJob, Env, TrainResult and the student's head and
frozen layers), distillation.py (the teacher's losses and feature matching), checkpoint.py (the epoch checkpoints
and resume() from the last one of the same job).

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
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from optcli.passes.base import training_hooks
from optcli.passes.finetune.checkpoint import State, checkpoint_state, fingerprint, resume, save_checkpoint
from optcli.passes.finetune.distillation import Distiller, distillation_loss, feature_widths, probe_features, task_loss
from optcli.passes.finetune.job import (
    Env,
    TrainJob,
    TrainResult,
    first_output,
    frozen_modules,
    set_eval_mode,
    set_train_mode,
    to_tensors,
)
from optcli.progress import EpochProgress, Feedback

# A tensor whose share of exact zeros is at least this came from pruning; dense training never lands on 0.0 this often.
SPARSE_ZEROS = 0.05


def _eval_metric_name(job: TrainJob) -> str | None:
    """What early stopping watches: data.eval's metric, else the distillation loss on data.eval (no labels)."""
    if job.eval is None:
        return None
    if job.eval.labels is not None:
        return job.eval.metric
    return "eval_loss" if job.teacher is not None else None


def _lower_is_better(metric: str | None) -> bool:
    return metric in ("mse", "eval_loss")


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


def feedback_for(progress: object) -> Feedback | None:
    """The run's Feedback in-process; a bool in a worker process, which makes its own (only rank 0 shows one, so
    the other workers never import the Rich terminal)."""
    if isinstance(progress, Feedback) or not progress:
        return cast("Feedback | None", progress or None)
    from optcli.report.terminal import feedback

    return feedback(quiet=False)


def train(
    job: TrainJob, env: Env = Env(), progress: object = True, log: Callable[[str], None] = lambda m: None
) -> TrainResult:
    cfg = job.config
    with deterministic():
        run = build(job, env)
        ckpt_dir = Path(job.checkpoint_dir) if job.checkpoint_dir else None
        key = fingerprint(job) if ckpt_dir else ""
        state = resume(run, ckpt_dir, key, log)
        bar = EpochProgress(feedback_for(progress) if env.is_main else None, run.epochs)
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
                    save_checkpoint(ckpt_dir, epoch + 1, checkpoint_state(run, state, key))
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
    assert cfg.seed is not None, "the finetune pass resolves the seed (its own or the recipe's) before the job"
    device = torch.device(env.device)
    names = job.input_names

    # data: a TensorDataset of inputs (+ labels), sharded across ranks by the sampler
    train_arrays = [torch.from_numpy(np.ascontiguousarray(job.train.arrays[n])) for n in names]
    labels = torch.from_numpy(np.ascontiguousarray(job.train.labels)) if job.train.labels is not None else None
    dataset = torch.utils.data.TensorDataset(*train_arrays, *([labels] if labels is not None else []))
    sampler: torch.utils.data.DistributedSampler = torch.utils.data.DistributedSampler(
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
        set_eval_mode(teacher)
    student = job.student.to(device)
    features = list(cfg.distill.features) if cfg.distill is not None else []
    s_widths: dict = {}
    t_widths: dict = {}
    if features:
        assert teacher is not None, "distillation features are read from the teacher the recipe names"
        example = to_tensors({n: job.train.arrays[n][:2] for n in names}, names, device)
        s_widths, t_widths = feature_widths(student, teacher, features, example)
    net = Distiller(student, features, t_widths, s_widths).to(device)
    model: nn.Module = net
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
        frozen=frozen_modules(student),
        masks=_sparse_masks(student),
        schedule=training_hooks(student),
        optimizer=make_optimizer([p for p in net.parameters() if p.requires_grad], cfg),
        scaler=grad_scaler(cfg.amp, env.device),
        metric_name=_eval_metric_name(job),
    )


def train_epoch(run: Run, state: State, epoch: int, bar: EpochProgress, task, started: float) -> tuple[float, int]:
    """One pass over this rank's shard of data.train (or up to max_steps); returns this rank's (loss sum, samples)."""
    cfg, env = run.job.config, run.env
    assert cfg.seed is not None, "resolved before the job (see build)"
    run.sampler.set_epoch(epoch)  # DDP: every rank permutes with (seed, epoch) and takes its own slice
    torch.manual_seed(cfg.seed + epoch)  # dropout etc. depend only on (seed, epoch): resumable bit for bit
    set_train_mode(run.net, run.frozen)
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
    assert distill is not None, "a teacher comes with the recipe's distill settings"
    features = run.net.features
    with torch.no_grad():
        t_caught = (
            probe_features(run.teacher, [t_name for _, t_name, _ in features], inputs, "teacher")
            if features
            else {"__output__": first_output(run.teacher(*inputs))}
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
    set_eval_mode(net)
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
                assert run.teacher is not None and distill is not None, "eval_loss is the metric only with a teacher"
                soft = distillation_loss(
                    logits, first_output(run.teacher(*inputs)), None, distill.temperature, distill.alpha
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


def finish(run: Run, state: State, stopped_early: bool) -> TrainResult:
    """The trained student on CPU in eval mode (the best epoch's weights when keep_best), with the run's figures."""
    cfg, history, best = run.job.config, state.history, state.best
    if cfg.keep_best and best is not None and best["epoch"] != (history[-1]["epoch"] if history else None):
        run.net.load_state_dict(best["model"])
    best_epoch = best["epoch"] if (best is not None and cfg.keep_best) else (history[-1]["epoch"] if history else None)
    set_eval_mode(run.student)
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
