"""A worker: asks the study for a trial, runs it as a complete optcli run in OUT/<trial folder>, tells the
result, until the budget (trials, time) is spent. Any number of workers, on any machines sharing OUT and the
storage, run the same loop; --jobs N starts N of them here as processes.

Budget: the trials counted are those finished or running, less failed ones that were re-queued (their retry
counts instead) and less the ones refused as over budget. A worker that asks for a trial past the budget (two
workers asked at once) tells it PRUNED with over_budget set, so a study never runs more than --trials.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from optcli.verbs.study.space import Param, suggest, trial_folder, values_to_overrides


@dataclass
class StudyJob:
    """Everything a worker needs (picklable: a spawned process rebuilds the study from it)."""

    recipe: Path
    out: Path
    storage: str | None
    study: str
    sampler: str
    params: list[Param]
    labels: dict[str, str]
    objectives: list[str]
    minimize: str
    overrides: list[str]
    trials: int
    deadline: float | None  # time.time() after which no new trial starts
    seed: int | None
    interval: int = 10
    grace: int = 60
    quiet: bool = False
    trust_pickle: bool = False
    worker: int = 0
    threads: int | None = None  # a --jobs process's share of the cores (None: the process's default)
    log: Callable[[str], None] | None = field(default=None, repr=False)
    progress: object = field(default=None, repr=False)


class TrialFailed(Exception):
    pass


def make_sampler(job: StudyJob):
    import optuna

    from optcli.verbs.study.space import grid_space

    if job.sampler == "grid":
        # Every worker, on every machine, must shuffle the grid alike: trial N takes grid point N of that order.
        return optuna.samplers.GridSampler(grid_space(job.params), seed=job.seed or 0)
    # Each process a seed of its own: a worker joining from another shell is worker 0 too, and two samplers
    # seeded alike ask the same first (random) points. Parallel studies are not reproducible anyway.
    seed = None if job.seed is None else zlib.crc32(f"{job.seed}:{socket.gethostname()}:{os.getpid()}".encode())
    if job.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if job.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True, constant_liar=True)


def load(job: StudyJob):
    import optuna

    from optcli.verbs.study.storage import open_storage

    storage = open_storage(job.storage, job.out, job.interval, job.grace)
    return optuna.load_study(study_name=job.study, storage=storage, sampler=make_sampler(job))


def counted(trials) -> list:
    """The trials that spend the budget (see the module's note)."""
    from optuna.trial import TrialState

    retried = {t.system_attrs.get("failed_trial") for t in trials} | {
        n for t in trials for n in t.system_attrs.get("retry_history") or []
    }
    return [
        t
        for t in trials
        if not t.user_attrs.get("over_budget") and not (t.state == TrialState.FAIL and t.number in retried)
    ]


def _log(job: StudyJob) -> Callable[[str], None]:
    if job.log is not None:
        return job.log
    if job.quiet:
        return lambda m: None
    from optcli.report.terminal import LineFeedback

    feedback = LineFeedback()
    return feedback.log


def work(job: StudyJob) -> int:
    """Run trials until the budget is spent; return how many this worker finished.

    One study.optimize(n_trials=1) per trial, so Optuna's own machinery runs around each: the waiting (retried)
    trials popped first, a database's heartbeat thread and stale-trial check, the grid sampler's stop."""
    from optuna.trial import TrialState

    from optcli.verbs.study.storage import fail_stale_trials

    log = _log(job)
    study = load(job)
    done = 0
    while True:
        if job.deadline is not None and time.time() >= job.deadline:
            log(f"worker {os.getpid()}: time budget spent")
            break
        for number in fail_stale_trials(study, job.grace):
            log(f"trial {number}: its worker is gone; marked failed and queued again")
        trials = study.get_trials(deepcopy=False)
        waiting = any(t.state == TrialState.WAITING for t in trials)
        if len(counted(trials)) >= job.trials and not waiting:
            break
        if job.sampler == "grid" and not waiting and study.sampler.is_exhausted(study):
            break
        current: list = []
        try:
            study.optimize(
                lambda trial, c=current: objective(job, study, trial, log, c), n_trials=1, catch=(TrialFailed,)
            )
        except KeyboardInterrupt:
            # This worker stops; its trial (failed by Optuna) goes back to the queue for another worker or the
            # next run of the same command.
            from optuna.storages import RetryHeartbeatStaleTrialCallback

            if current:
                frozen = study._storage.get_trial(current[0])
                if frozen.state == TrialState.FAIL:
                    RetryHeartbeatStaleTrialCallback(max_retry=None)(study, frozen)
            raise
        if current and study._storage.get_trial(current[0]).user_attrs.get("over_budget"):
            break
        done += 1
    return done


def objective(job: StudyJob, study, trial, log, current: list) -> list[float]:
    """One trial: its values, its run in OUT/<folder>, its objective values (TrialFailed when it has none)."""
    import optuna

    from optcli.verbs.study.front import row_values
    from optcli.verbs.study.outdir import record
    from optcli.verbs.study.storage import Heartbeat, owner, uses_optuna_heartbeat
    from optcli.verbs.sweeper import Variant, VariantJob, run_variant, variant_row

    storage = study._storage
    current.append(trial._trial_id)
    mine = storage.get_trial(trial._trial_id)
    before = [t for t in counted(study.get_trials(deepcopy=False)) if t.number < trial.number]
    if len(before) >= job.trials and mine.system_attrs.get("failed_trial") is None:
        storage.set_trial_user_attr(trial._trial_id, "over_budget", True)  # another worker asked at the same time
        raise optuna.TrialPruned()
    for key, value in {**owner(), "error": None, "exit_code": None, "row": None}.items():
        storage.set_trial_user_attr(trial._trial_id, key, value)
    values = suggest(trial, job.params)
    # A folder of its own, always: an earlier study's killed run may have left a locked one of this name
    # (--overwrite keeps a folder whose lock names a run it cannot prove gone).
    base = name = trial_folder(trial.number, values, job.labels)
    n = 2
    while (job.out / name).exists() or (job.out / name).is_symlink():
        name, n = f"{base}-{n}", n + 1
    storage.set_trial_user_attr(trial._trial_id, "folder", name)
    storage.set_trial_user_attr(trial._trial_id, "values", values)
    record(job.out, name)
    log(f"trial {trial.number}: {name}")
    variant = VariantJob(
        job.recipe,
        [*job.overrides, *values_to_overrides(values)],
        job.out / name,
        job.out / "cache",
        False,
        job.trust_pickle,
        job.quiet,
        name,
    )
    try:
        beat = (
            contextlib.nullcontext()
            if uses_optuna_heartbeat(storage)
            else Heartbeat(study, trial._trial_id, job.interval)
        )
        with beat:
            caller_log = job.log
            if caller_log is not None:  # in this process: the caller's feedback
                result = run_variant(variant, log=lambda m: caller_log(f"{name}: {m}"), progress=job.progress)
            else:
                result = run_variant(variant)
    except KeyboardInterrupt:
        storage.set_trial_user_attr(trial._trial_id, "error", "interrupted")
        raise
    if "error" in result:
        storage.set_trial_user_attr(trial._trial_id, "error", result["error"])
        storage.set_trial_user_attr(trial._trial_id, "exit_code", result["exit_code"])
        log(f"trial {trial.number}: failed: {result['error']}")
        raise TrialFailed(result["error"])
    row = variant_row(Variant(name, values, []), result["report"], job.minimize)
    storage.set_trial_user_attr(trial._trial_id, "row", row)
    objective_values = row_values(row, job.objectives)
    if objective_values is None:
        missing = [o for o in job.objectives if row_values(row, [o]) is None]
        storage.set_trial_user_attr(trial._trial_id, "error", f"not measured: {', '.join(missing)}")
        storage.set_trial_user_attr(trial._trial_id, "exit_code", 2)
        raise TrialFailed("not measured")
    log(f"trial {trial.number}: done")
    return objective_values


def worker_process(job: StudyJob) -> None:
    """A --jobs process: Ctrl-C is the parent's to decide; its SIGTERM stops the trial here (re-queued)."""
    from optcli.verbs.sweeper import worker_init

    worker_init(job.threads)
    try:
        work(job)
    except KeyboardInterrupt:
        raise SystemExit(130) from None


def run_local(job: StudyJob, jobs: int) -> None:
    """jobs workers: this process alone, or spawned processes (torch and ONNX Runtime hold process-wide state)."""
    import dataclasses
    import multiprocessing

    if jobs <= 1:
        work(job)
        return
    from optcli.verbs.sweeper import threads_per_worker

    ctx = multiprocessing.get_context("spawn")
    threads = threads_per_worker(jobs)
    procs = [
        ctx.Process(
            target=worker_process,
            args=(dataclasses.replace(job, worker=i, threads=threads, log=None, progress=None),),
        )
        for i in range(jobs)
    ]
    try:
        for p in procs:
            p.start()
        for p in procs:
            p.join()
    except BaseException:
        for p in procs:
            if p.is_alive():
                p.terminate()  # SIGTERM: the worker re-queues its trial and leaves
        for p in procs:
            p.join()
        raise
