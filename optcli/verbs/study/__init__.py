"""`optcli sweep` as an Optuna study: a search space, a sampler, a budget, and storage that any number of workers
(here or on other machines sharing OUT) open to run trials, each a complete optcli run.

    from optcli.verbs.study import StudyOptions, run_study, study_status
    sweep = run_study("recipe.yaml", StudyOptions(out=Path("out"), space=Path("space.yaml"), trials=40, jobs=2))

space.py reads the space, front.py compares trials, storage.py opens the study's storage and finds dead workers,
worker.py runs trials, outdir.py keeps OUT, summary.py turns the study into sweep.json|md|html.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from optcli.errors import BadInput, writing

SAMPLERS = ("grid", "random", "tpe", "nsga2")


@dataclass
class StudyOptions:
    out: Path
    space: Path | None = None  # YAML: recipe key -> range or choices
    grid: list[str] = field(default_factory=list)  # --grid items (choices), merged over the recipe's sweep.grid
    overrides: list[str] = field(default_factory=list)  # --set items for every trial
    sampler: str | None = None  # default: grid when every key has a list of values, else tpe
    trials: int | None = None  # the study's budget (all workers together); default: the grid's size, or 20
    time_budget: float | None = None  # seconds: this worker starts no trial after that
    storage: str | None = None  # journal file (default OUT/study.journal) or a database URL
    study: str | None = None  # default: the output folder's name
    objectives: list[str] | None = None  # default: metric, latency, size
    jobs: int = 1
    worker: bool = False  # join the study in OUT; never --overwrite
    overwrite: bool = False
    seed: int | None = None  # default: the recipe's seed
    heartbeat: int = 10
    grace: int = 60
    quiet: bool = False
    trust_pickle: bool = False
    log: Callable[[str], None] = lambda msg: None
    progress: Any = None


def _plan(path: Path, options: StudyOptions):
    """Everything checked before any work: the recipe, the space, each key at its edge values, the sampler."""
    import yaml

    from optcli.config import higher_is_better
    from optcli.recipe import load_recipe
    from optcli.verbs.study.front import DEFAULT_OBJECTIVES, check_objectives
    from optcli.verbs.study.space import grid_size, load_space, values_to_overrides
    from optcli.verbs.sweeper import key_label, parse_grid

    base = load_recipe(path, overrides=options.overrides)
    spec = base.sweep
    grid = {**(spec.grid if spec else {}), **parse_grid(options.grid)}
    params = load_space(options.space, grid)
    if not params:
        raise BadInput(
            f"{path}: nothing to sweep: pass --space FILE (ranges and choices) or --grid KEY=V1,V2, "
            "or add a sweep: grid: block to the recipe"
        )
    sampler = options.sampler or ("grid" if all(p.kind == "choice" or p.step for p in params) else "tpe")
    if sampler not in SAMPLERS:
        raise BadInput(f"--sampler {sampler}: choose one of {', '.join(SAMPLERS)}")
    size = grid_size(params) if sampler == "grid" else None
    trials = options.trials or size or 20
    if trials < 1:
        raise BadInput("--trials must be 1 or more")
    for p in params:  # every key takes its edge values: a typo or an out-of-range value fails now, not in trial 9
        for value in p.edge_values():
            try:
                load_recipe(path, overrides=[*options.overrides, *values_to_overrides({p.key: value})])
            except BadInput as e:
                raise BadInput(f"sweep space {p.key}={value}: {e}") from None
    raw = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    labels = {p.key: key_label(p.key, raw) for p in params}
    if len(set(labels.values())) < len(labels):
        labels = {k: k for k in labels}
    metric = base.data.eval.metric if base.data.eval is not None else None
    higher = True if metric is None else higher_is_better(metric)
    objectives = check_objectives(options.objectives or DEFAULT_OBJECTIVES)
    return base, params, sampler, trials, labels, objectives, higher, (spec.minimize if spec else "size")


def _fingerprint(path: Path, options: StudyOptions, params, objectives, sampler) -> str:
    """What makes two commands the same study: the recipe's bytes, --set, the space, objectives, sampler."""
    data = {
        "recipe": hashlib.sha256(Path(path).read_bytes()).hexdigest(),
        "overrides": options.overrides,
        "space": [p.__dict__ for p in params],
        "objectives": objectives,
        "sampler": sampler,
    }
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def run_study(path: str | Path, options: StudyOptions) -> dict:
    """Create or join the study, run trials here (options.jobs workers) until the budget is spent, write
    sweep.json|md|html and OUT/best from the study's state; return the sweep dict."""
    import optuna

    from optcli.runner import preflight
    from optcli.steps import inside
    from optcli.verbs.study import outdir
    from optcli.verbs.study.front import directions
    from optcli.verbs.study.storage import journal_path, open_storage, shown_url
    from optcli.verbs.study.worker import StudyJob, run_local

    t0 = time.perf_counter()
    path = Path(path)
    if options.worker and options.overwrite:
        raise BadInput("--worker joins a study and never deletes its work: drop --overwrite")
    if options.jobs < 1:
        raise BadInput("--jobs must be 1 or more")
    base, params, sampler, trials, labels, objectives, higher, minimize = _plan(path, options)
    preflight(base, options.trust_pickle)
    out = Path(options.out).absolute()
    sources = (base.data.calibration, base.data.eval, base.data.train)
    for given in [path, base.model.path, *(p for s in sources if s is not None for p in (s.path, s.text) if p)]:
        if inside(given, out):
            raise BadInput(f"output folder {out} holds the input {given}; choose an output folder of its own")
    name = options.study or out.name
    journal = journal_path(options.storage, out)
    storage_text = (
        str(journal.relative_to(out)) if journal is not None and inside(journal, out) else str(journal or "")
    ) or shown_url(options.storage or "")
    meta = {
        "study": name,
        "storage": storage_text,
        "recipe": str(path),
        "space": {p.key: _spec(p) for p in params},
        "sampler": sampler,
        "trials": trials,
        "objectives": objectives,
        "higher_is_better": higher,
        "minimize": minimize,
        "fingerprint": _fingerprint(path, options, params, objectives, sampler),
    }
    # A database is reached before OUT is touched (a wrong URL leaves nothing behind); a journal file lives in
    # OUT, so it is opened once OUT is ours.
    storage = None if journal is not None else open_storage(options.storage, out, options.heartbeat, options.grace)
    joined = outdir.prepare(out, options.overwrite, options.worker, meta)
    storage = storage or open_storage(options.storage, out, options.heartbeat, options.grace)
    if options.overwrite and not joined and journal is None:
        try:
            optuna.delete_study(study_name=name, storage=storage)  # --overwrite starts the study afresh
        except KeyError:
            pass
    study = optuna.create_study(
        study_name=name, storage=storage, directions=directions(objectives, higher), load_if_exists=True
    )
    known = study.user_attrs.get("optcli")
    if known is None:
        study.set_user_attr("optcli", meta)
    elif known.get("fingerprint") != meta["fingerprint"]:
        raise BadInput(
            f"study {name} in {storage_text} was started with another recipe, --set, space, objectives or sampler; "
            "run the same command, pass --study NAME for a new study, or --overwrite"
        )
    options.log(
        f"study {name} ({sampler}, {trials} trials, objectives: {', '.join(objectives)}) in {storage_text}"
        + (" (joined)" if joined else "")
    )
    job = StudyJob(
        recipe=path,
        out=out,
        storage=options.storage,
        study=name,
        sampler=sampler,
        params=params,
        labels=labels,
        objectives=objectives,
        minimize=minimize,
        overrides=options.overrides,
        trials=trials,
        deadline=time.time() + options.time_budget if options.time_budget else None,
        seed=options.seed if options.seed is not None else base.seed,
        interval=options.heartbeat,
        grace=options.grace,
        quiet=options.quiet,
        trust_pickle=options.trust_pickle,
        log=options.log if options.jobs <= 1 else None,
        progress=options.progress if options.jobs <= 1 else None,
    )
    run_local(job, options.jobs)
    options.log("writing the study's summary")
    sweep = write_summary(study, meta, out)
    sweep["seconds"] = round(time.perf_counter() - t0, 3)
    return sweep


def _spec(p) -> Any:
    if p.kind == "choice":
        return list(p.choices)
    spec = {"low": p.low, "high": p.high}
    if p.kind == "int":
        spec = {k: int(v) for k, v in spec.items()}
    return {**spec, **({"log": True} if p.log else {}), **({"step": p.step} if p.step else {})}


def write_summary(study, meta: dict, out: Path) -> dict:
    """sweep.json|md|html and OUT/best from the study now (under the folder's flock: workers finish at once)."""
    from optcli.report.sweep import write_sweep_reports
    from optcli.verbs.study import outdir
    from optcli.verbs.study.summary import summarize_study
    from optcli.verbs.sweeper import point_best

    sweep = summarize_study(study, meta, out)
    with outdir.locked(out):
        point_best(out, sweep["best"])
        with writing(f"{out}/sweep.{{json,md,html}}"):
            write_sweep_reports(sweep, out)
    return sweep


def study_status(out: str | Path, storage: str | None = None) -> dict:
    """The study's progress from its storage (any machine that reaches it): trials done / running / failed,
    the current front, the best so far. Reads; writes nothing."""
    import optuna

    from optcli.verbs.study import outdir
    from optcli.verbs.study.storage import journal_path, open_storage
    from optcli.verbs.study.summary import summarize_study

    out = Path(out)
    meta = outdir.read_study_file(out)
    if meta is None:
        raise BadInput(f"{out} holds no study (no {outdir.STUDY_FILE}); give the -o folder of an optcli sweep")
    if storage is None and "://" in meta["storage"] and "***" in meta["storage"]:
        raise BadInput(f"{out}: the study's database URL needs its password: pass --storage URL")
    url = storage or meta["storage"]
    journal = journal_path(url, out)
    if journal is not None and not journal.is_file():
        raise BadInput(f"{out}: the study's journal {journal} is missing; give --storage where the study lives")
    try:
        study = optuna.load_study(study_name=meta["study"], storage=open_storage(url, out, 10, 60))
    except KeyError:
        raise BadInput(f"study {meta['study']} is not in {meta['storage']} (deleted?)") from None
    return summarize_study(study, meta, out, with_importances=False)
