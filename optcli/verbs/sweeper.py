"""`optcli sweep`: every combination of a grid as its own run, sharing the steps they have in common.

OUT/
  .optcli.lock           the sweep holding the folder
  .optcli-output.json    what optcli wrote here: all that --overwrite deletes (owned.py)
  cache/                 finished steps shared between variants (keyed like --resume: input bytes + config)
  <variant>/             a complete run: model, report.json|md|html, steps/
  best -> <variant>      the variant chosen under the recipe's gates (absent when none passes)
  sweep.json|md|html     one row per variant, the Pareto front, the best variant

A variant is the recipe with the grid's values set as --set would set them; `passes.N: [true, false]` keeps or
drops pass N. Variants run in this process one after another, or in --jobs worker processes (spawned: torch and
ONNX Runtime hold process-wide state, and passes chdir), each step computed once across all of them.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeGuard

import yaml

from optcli.errors import BadInput, OptcliError, writing

MAX_VARIANTS = 256
MINIMIZE = ("size", "compressed", "latency")


# --------------------------------------------------------------------------- the grid


def parse_grid(items: list[str] | tuple[str, ...]) -> dict[str, list]:
    """--grid KEY=V1,V2,... (or KEY=[V1, V2] in YAML flow style) -> {KEY: [values]}; values read as YAML scalars."""
    grid: dict[str, list] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key or not text.strip():
            raise BadInput(f"--grid {item!r}: write key.path=value1,value2, e.g. --grid passes.1.mode=dynamic,static")
        try:
            loaded = yaml.safe_load(text)
            values = loaded if isinstance(loaded, list) else [yaml.safe_load(v) for v in text.split(",")]
        except yaml.YAMLError as e:
            raise BadInput(f"--grid {key}: {text!r} is not a list of plain YAML values ({e})") from None
        grid[key] = values
    return grid


def check_grid(grid: dict[str, list]) -> None:
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise BadInput(f"sweep grid {key}: give a list of one value or more")
    count = math.prod(len(v) for v in grid.values())
    if count > MAX_VARIANTS:
        raise BadInput(
            f"sweep grid makes {count} variants (more than {MAX_VARIANTS}); sweep fewer values or split the sweep"
        )


def key_label(key: str, raw: dict) -> str:
    parts = key.split(".")
    if len(parts) == 2 and parts[0] == "passes" and parts[1].isdigit():  # a whole pass on/off: name it by its type
        passes = raw.get("passes") or []
        index = int(parts[1])
        if index < len(passes) and isinstance(passes[index], dict):
            return str(passes[index].get("type", key))
    return parts[-1]


def _value_text(value: Any) -> str:
    if value is True:
        return "on"
    if value is False:
        return "off"
    if isinstance(value, dict):
        return "-".join(str(v) for v in value.values())[:40]
    return str(value)


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]+", "-", text).strip("-.") or "v"


@dataclass
class Variant:
    name: str
    values: dict[str, Any]  # grid key -> value
    overrides: list[str]  # --set items that make it from the recipe


def expand(grid: dict[str, list], raw: dict) -> list[Variant]:
    """Every combination, in grid order; folder names from the keys' last parts (whole keys where those clash)."""
    keys = list(grid)
    labels = [key_label(k, raw) for k in keys]
    if len(set(labels)) < len(labels):
        labels = [k for k in keys]
    variants, seen = [], set()
    for combo in itertools.product(*(grid[k] for k in keys)):
        name = _safe("_".join(f"{lab}-{_value_text(v)}" for lab, v in zip(labels, combo, strict=True)))
        base, n = name, 2
        while name in seen or name in ("cache", "best", "sweep.json", "sweep.md", "sweep.html"):
            name, n = f"{base}-{n}", n + 1
        seen.add(name)
        overrides = []
        for key, value in zip(keys, combo, strict=True):
            is_pass = re.fullmatch(r"passes\.\d+", key)
            if is_pass and value is True:
                continue  # the pass as written
            # JSON is YAML: the value reads back exactly; null drops a pass (recipe.load_recipe)
            overrides.append(f"{key}={json.dumps(None if is_pass and value is False else value)}")
        variants.append(Variant(name, dict(zip(keys, combo, strict=True)), overrides))
    return variants


# --------------------------------------------------------------------------- choosing


def pareto_front(points: list[tuple[float | None, float | None]], higher_is_better: bool = True) -> list[int]:
    """Indices of the points that no other point beats: x (size or latency) minimized, y (the metric) maximized
    (minimized where lower is better). A point beats another when it is no worse on both and better on one;
    equal points are all on the front; points missing either value are on no front."""
    sign = 1 if higher_is_better else -1
    ok = {i: (x, sign * y) for i, (x, y) in enumerate(points) if _finite(x) and _finite(y)}
    front = []
    for i, (xi, yi) in ok.items():
        beaten = any(xj <= xi and yj >= yi and (xj < xi or yj > yi) for j, (xj, yj) in ok.items() if j != i)
        if not beaten:
            front.append(i)
    return front


def choose_best(rows: list[dict]) -> int | None:
    """The variant passing every gate with the smallest x; ties go to the better metric, then to grid order."""
    passing = [i for i, r in enumerate(rows) if r.get("passed") and not r.get("error") and _finite(r.get("x"))]
    if not passing:
        return None

    def rank(i):
        r = rows[i]
        y = r.get("metric")
        y = y if _finite(y) else -math.inf if r.get("higher_is_better", True) else math.inf
        return (r["x"], -y if r.get("higher_is_better", True) else y, i)

    return min(passing, key=rank)


def _finite(x: object) -> TypeGuard[float]:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


# --------------------------------------------------------------------------- one variant's figures


def variant_row(variant: Variant, report: dict, minimize: str) -> dict:
    """The figures a sweep compares, read from a variant's report (final step; the metric, else fidelity)."""
    from optcli.config import higher_is_better

    last = report["steps"][-1]
    batches = sorted(last.get("latency") or {}, key=lambda b: int(b.split("_")[-1]))
    latency = last["latency"][batches[0]]["p50_ms"] if batches else None
    if last.get("accuracy"):
        metric_name, metric = last["accuracy"]["metric"], last["accuracy"]["value"]
    else:
        metric_name, metric = "fidelity cosine", (last.get("fidelity") or {}).get("cosine_mean")
    x = {"size": last.get("size_bytes"), "compressed": last.get("compressed_bytes"), "latency": latency}[minimize]
    reused = report.get("reused_steps") or {}
    return {
        "name": variant.name,
        "values": variant.values,
        "folder": variant.name,
        "size_bytes": last.get("size_bytes"),
        "compressed_bytes": last.get("compressed_bytes"),
        "latency_ms": latency,
        "latency_batch": batches[0] if batches else None,
        "metric_name": metric_name,
        "metric": metric,
        "higher_is_better": metric_name == "fidelity cosine" or higher_is_better(metric_name),
        "fidelity_cosine": (last.get("fidelity") or {}).get("cosine_mean"),
        "x": x,
        "gates": report.get("gates") or [],
        "passed": bool(report.get("passed")),
        "ran_steps": [s["name"] for s in report["steps"][1:] if s["name"] not in reused],
        "reused_steps": reused,
        "seconds": report.get("seconds"),
        "error": None,
    }


def failed_row(variant: Variant, message: str, code: int) -> dict:
    return {
        "name": variant.name,
        "values": variant.values,
        "folder": variant.name,
        "x": None,
        "metric": None,
        "gates": [],
        "passed": False,
        "error": message,
        "exit_code": code,
    }


# --------------------------------------------------------------------------- running


@dataclass
class SweepOptions:
    out: Path
    grid: list[str] = field(default_factory=list)  # --grid items, merged over the recipe's sweep.grid
    overrides: list[str] = field(default_factory=list)  # --set items applied to every variant
    jobs: int = 1
    overwrite: bool = False
    resume: bool = False
    quiet: bool = False
    trust_pickle: bool = False
    log: Callable[[str], None] = lambda msg: None
    progress: Any = None  # a report.terminal.Feedback for variants run in this process


@dataclass
class VariantJob:
    """Everything a worker process needs to run one variant (picklable: paths and strings)."""

    recipe: Path
    overrides: list[str]
    out: Path
    cache: Path
    resume: bool
    trust_pickle: bool
    quiet: bool
    name: str


def run_variant(job: VariantJob, log: Callable[[str], None] | None = None, progress=None) -> dict:
    """One variant's run; errors come back as values ({error, exit_code}): a worker's exception may not unpickle."""
    from optcli.recipe import load_recipe
    from optcli.runner import RunOptions, run_recipe
    from optcli.settings import RunSettings
    from optcli.steps import StepCache

    if log is None:  # a worker process: plain lines (bars from parallel processes would overwrite each other)
        from optcli.report.terminal import LineFeedback, feedback

        progress = feedback(quiet=True) if job.quiet else LineFeedback()
        log = (lambda m: None) if job.quiet else (lambda m: progress.log(f"{job.name}: {m}"))
    cache = StepCache(job.cache)
    try:
        recipe = load_recipe(job.recipe, overrides=job.overrides)
        options = RunOptions(
            out=job.out,
            settings=RunSettings(resume=job.resume, quiet=job.quiet, trust_pickle=job.trust_pickle),
            log=log,
            step_cache=cache,
            progress=progress,
            recipe_path=job.recipe,
        )
        return {"report": run_recipe(recipe, options)}
    except OptcliError as e:
        return {"error": str(e), "exit_code": e.exit_code}
    finally:
        cache.release()


def threads_per_worker(workers: int) -> int:
    """Local workers share the machine's cores: each gets its share, never fewer than one (N workers each using
    every core would only slow all of them down)."""
    return max(1, (os.cpu_count() or 1) // max(1, workers))


def worker_init(threads: int | None = None) -> None:
    # Ctrl-C reaches the whole process group: the parent alone decides, and stops workers with one SIGTERM each,
    # raised as KeyboardInterrupt once so the run's own cleanup (temp steps, lock) is not interrupted in turn.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if threads is not None:
        # Before torch is imported here (a spawned process): OpenMP reads it once; torch's own pool is set too.
        os.environ["OMP_NUM_THREADS"] = str(threads)
        import torch

        torch.set_num_threads(threads)

    def once(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, once)


def _run_parallel(jobs: list[VariantJob], workers: int, log) -> list[dict]:
    import concurrent.futures as cf
    import multiprocessing

    results: dict[int, dict] = {}
    pool = cf.ProcessPoolExecutor(
        max_workers=workers,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=worker_init,
        initargs=(threads_per_worker(workers),),
    )
    try:
        futures = {pool.submit(run_variant, job): i for i, job in enumerate(jobs)}
        for future in cf.as_completed(futures):
            i = futures[future]
            result = results[i] = future.result()
            log(f"{jobs[i].name}: {'failed' if 'error' in result else 'done'}")
    except BaseException:
        for child in multiprocessing.active_children():
            child.terminate()
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown(wait=True)
    return [results[i] for i in range(len(jobs))]  # in job order; as_completed gave every one or raised


class SweepFolder:
    """OUT for a sweep: refuses to clobber, locks against a concurrent sweep; the variants lock their own folders.
    --overwrite deletes only what optcli wrote (owned.py), in OUT and in each variant folder."""

    def __init__(self, root: Path, overwrite: bool, resume: bool):
        from optcli import owned

        self.root, self.lock = root, root / owned.LOCK
        self.created = not root.exists()
        if root.exists() and not root.is_dir():
            raise BadInput(f"output {root} is a file; give a folder")
        if self.lock.exists():
            raise BadInput(f"output folder {root} is in use by another optcli run; wait for it, or delete {self.lock}")
        if owned.check_reusable(root) and not (overwrite or resume):
            raise BadInput(
                f"output folder {root} holds an earlier optcli output; pass --overwrite to replace it or --resume "
                "to continue the sweep"
            )
        with writing(self.lock):
            root.mkdir(parents=True, exist_ok=True)
            try:
                fd = os.open(self.lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                raise BadInput(f"output folder {root} is in use by another optcli run") from None
            os.write(fd, str(os.getpid()).encode())
            os.close(fd)
        try:  # the lock is ours from here: a signal or error before the sweep's own try must still release it
            with writing(root / owned.MARKER):
                if overwrite and not resume:
                    owned.remove_owned(root)
                owned.begin(root, "sweep")
        except BaseException:
            self.close()
            raise

    def record(self, *names: str) -> None:
        """List top-level names as optcli's before writing them (what a later --overwrite may delete)."""
        from optcli import owned

        with writing(self.root / owned.MARKER):
            owned.record(self.root, *names)

    def close(self) -> None:
        from optcli import owned

        try:
            owned.drop_leftovers(self.root)  # a sweep that finished nothing leaves nothing that blocks the same command
        finally:
            self.lock.unlink(missing_ok=True)
        if self.created:
            owned.rmdir_if_empty(self.root)


def load_sweep(path: Path, options: SweepOptions):
    """The base recipe, the merged grid, its variants (each validated), before any work."""
    from optcli.recipe import load_recipe

    base = load_recipe(path, overrides=options.overrides)
    spec = base.sweep
    grid = {**(spec.grid if spec else {}), **parse_grid(options.grid)}
    if not grid:
        raise BadInput(
            f"{path}: nothing to sweep: pass --grid KEY=V1,V2 (e.g. --grid passes.1.mode=dynamic,static) "
            "or add a sweep: grid: block to the recipe"
        )
    check_grid(grid)
    variants = expand(grid, yaml.safe_load(path.read_text(encoding="utf-8")))  # load_recipe read it safely
    recipes = []
    for v in variants:
        try:
            recipes.append(load_recipe(path, overrides=[*options.overrides, *v.overrides]))
        except BadInput as e:
            raise BadInput(f"sweep variant {v.name}: {e}") from None
    return base, grid, (spec.minimize if spec else "size"), variants, recipes


def sweep_recipe(path: Path, options: SweepOptions) -> dict:
    from optcli import __version__
    from optcli.passes import get_pass
    from optcli.report.sweep import write_sweep_reports
    from optcli.runner import preflight
    from optcli.steps import inside

    t0 = time.perf_counter()
    path = Path(path)
    base, grid, minimize, variants, recipes = load_sweep(path, options)
    original, _ = preflight(recipes[0], options.trust_pickle)
    for v, recipe in zip(variants, recipes, strict=True):
        for config in recipe.passes:
            spec = get_pass(config.type)
            # None for a decoder LLM, which preflight never loads: as in runner.preflight, no pass preflight then
            if spec.preflight is not None and original is not None:
                try:
                    spec.preflight(config, recipe, original)
                except BadInput as e:
                    raise BadInput(f"sweep variant {v.name}: {e}") from None
    out = Path(options.out)
    sources = (base.data.calibration, base.data.eval, base.data.train)
    given_paths = [path, base.model.path, *(p for s in sources if s is not None for p in (s.path, s.text) if p)]
    for given in given_paths:
        if inside(given, out):  # a variant's artifact or report could land on it
            raise BadInput(f"output folder {out} holds the input {given}; choose an output folder of its own")
    folder = SweepFolder(out, options.overwrite, options.resume)
    try:
        folder.record("cache", *(v.name for v in variants))
        jobs = [
            VariantJob(
                path,
                [*options.overrides, *v.overrides],
                out / v.name,
                out / "cache",
                options.resume,
                options.trust_pickle,
                options.quiet,
                v.name,
            )
            for v in variants
        ]
        options.log(
            f"{len(variants)} variants of {path.name} ({' x '.join(f'{k}: {len(vs)}' for k, vs in grid.items())})"
        )
        if options.jobs > 1 and len(jobs) > 1:
            results = _run_parallel(jobs, min(options.jobs, len(jobs)), options.log)
        else:
            results = []
            for i, job in enumerate(jobs, start=1):
                options.log(f"variant {i}/{len(jobs)}: {job.name}")
                log = lambda m, n=job.name: options.log(f"{n}: {m}")  # noqa: E731
                results.append(run_variant(job, log=log, progress=options.progress))
        rows = [
            variant_row(v, r["report"], minimize) if "report" in r else failed_row(v, r["error"], r["exit_code"])
            for v, r in zip(variants, results, strict=True)
        ]
        sweep = summarize(rows, minimize)
        sweep = {
            "optcli_version": __version__,
            "recipe": str(path),
            "grid": grid,
            "minimize": minimize,
            "original": original_figures(results, minimize),
            **sweep,
            "busy": sweep_busy(results),
            "seconds": round(time.perf_counter() - t0, 3),
        }
        folder.record("best", "sweep.json", "sweep.md", "sweep.html")
        point_best(out, sweep["best"])
        with writing(f"{out}/sweep.{{json,md,html}}"):
            write_sweep_reports(sweep, out)
        return sweep
    finally:
        folder.close()


def summarize(rows: list[dict], minimize: str) -> dict:
    higher = next((r["higher_is_better"] for r in rows if "higher_is_better" in r), True)
    front = set(pareto_front([(r.get("x"), r.get("metric")) for r in rows], higher))
    best = choose_best(rows)
    for i, r in enumerate(rows):
        r["pareto"] = i in front
        r["best"] = i == best
    errors = [r for r in rows if r.get("error")]
    return {
        "metric": next((r["metric_name"] for r in rows if r.get("metric_name")), None),
        "higher_is_better": higher,
        "variants": rows,
        "pareto": [r["name"] for r in rows if r["pareto"]],
        "best": rows[best]["name"] if best is not None else None,
        "passed": best is not None,
        "errors": [{"variant": r["name"], "error": r["error"], "exit_code": r["exit_code"]} for r in errors],
    }


def sweep_busy(results: list[dict]) -> str:
    """The runs' own "timings not trustworthy" caveat (report.summary.busy_note), once for the sweep: the latency
    axis and its Pareto front were measured on a busy machine."""
    from optcli.report.summary import busy_note

    for r in results:
        note = busy_note(r["report"]) if "report" in r else ""
        if note:
            return note
    return ""


def original_figures(results: list[dict], minimize: str) -> dict | None:
    for r in results:
        if "report" in r:
            step = r["report"]["steps"][0]
            fake = Variant("original", {}, [])
            row = variant_row(fake, {"steps": [step]}, minimize)
            return {k: row[k] for k in ("size_bytes", "compressed_bytes", "latency_ms", "metric", "x")}
    return None


def point_best(out: Path, best: str | None) -> None:
    """OUT/best -> the best variant's folder (a relative link, replaced atomically); removed when none passes."""
    link = out / "best"
    if best is None:
        if link.is_symlink() or link.exists():
            link.unlink()
        return
    tmp = out / f".best.tmp-{os.getpid()}"
    tmp.unlink(missing_ok=True)
    with writing(link):
        os.symlink(best, tmp, target_is_directory=True)
        os.replace(tmp, link)


def exit_code(sweep: dict) -> int:
    """3 (or 2) when a variant could not finish, else 0 when a variant passes every gate, else 1."""
    codes = [e["exit_code"] for e in sweep["errors"]]
    if codes:
        return 3 if 3 in codes else max(codes)
    return 0 if sweep["passed"] else 1
