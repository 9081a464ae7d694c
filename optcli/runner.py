"""Apply a recipe's passes in order; write, measure and record each step; check the gates.

The output folder, its lock and the --resume cache are steps.py; measuring a step is measure.Evaluator;
the gates are gates.py. This module is the loop that ties them together.
"""

from __future__ import annotations

import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from optcli import __version__, library_warnings
from optcli.abtest import compare_runners
from optcli.artifact import load_model, save_torch
from optcli.data import DataCatalog, check_labels_fit, text_length
from optcli.environment import check_target, environment, providers_for
from optcli.errors import DISK_FULL, BadInput, DiskFull, OptcliError, PassFailed, first_line, writing
from optcli.gates import check_gates, near_gate_warnings
from optcli.measure import Evaluator, load_written, runner_for
from optcli.model import Model, check_feedable, check_memory
from optcli.onnx_check import Unloadable
from optcli.passes import get_pass
from optcli.passes.base import Context, check_details
from optcli.report import write_reports
from optcli.report.model import SCHEMA_VERSION, Report

if TYPE_CHECKING:  # the recipe module imports every pass; the run reads it only through the loaded object
    from optcli.recipe import Recipe
from optcli.report.summary import baseline_index, step_comparisons, summary
from optcli.settings import RunSettings
from optcli.steps import (
    OutputFolder,
    StepCache,
    finished_step,
    input_key,
    inside,
    reload_step,
    sha256_file,
    step_key,
    write_final,
    write_record,
)

LOW_DISK = 16 << 20  # bytes free below which a failing pass is reported as a full disk


@dataclass
class RunOptions:
    out: Path
    settings: RunSettings = field(default_factory=RunSettings)
    log: Callable[[str], None] = lambda msg: None
    step_cache: StepCache | None = None  # finished steps shared with other runs (a sweep's variants)
    progress: Any = None  # a report.terminal.Feedback (bars on a terminal, lines in CI); None: silent
    recipe_path: Path | None = None  # an input like the model: an output folder holding it is refused


def preflight(recipe: Recipe, trust_pickle: bool = False) -> tuple[Model, DataCatalog] | tuple[None, None]:
    """Open the model and every data source before any work: bad files and mismatched keys fail here (exit 2)."""
    from optcli.llm.run import is_llm_recipe, preflight_llm

    if is_llm_recipe(recipe):  # a decoder LLM is never loaded here: it may not fit (optcli.llm.run)
        preflight_llm(recipe)
        return None, None
    check_target(recipe.report.target)  # a provider that is not installed: exit 2 naming the package
    original = load_model(recipe.model, trust_pickle=trust_pickle, sequence_length=text_length(recipe.data))
    check_feedable(original.inputs, recipe.model.path)
    check_memory(original.inputs, max(recipe.report.latency.batch_sizes), "report.latency.batch_sizes")
    if recipe.data.eval is None:
        check_memory(original.inputs, recipe.report.fidelity_samples, "report.fidelity_samples")
    data = DataCatalog(recipe.data, original.inputs, original)
    for name in ("calibration", "eval", "train"):
        data.get(name)
    evaluation = data.get("eval")
    if evaluation is not None and evaluation.labels is not None and original.format == "onnx" and original.path:
        output = first_output_shape(original.path)
        if output is not None:  # a torch model's outputs are checked on its first evaluation
            check_labels_fit(evaluation.labels, output, evaluation.metric, f"{evaluation.where}: labels")
    for config in recipe.passes:
        spec = get_pass(config.type)
        if spec.preflight is not None:
            spec.preflight(config, recipe, original)
    return original, data


def first_output_shape(path: Path) -> tuple | None:
    """The first output's shape without the batch axis as the ONNX file records it (None for a free size)."""
    import onnx

    outputs = onnx.load(str(path), load_external_data=False).graph.output
    if not outputs or not outputs[0].type.HasField("tensor_type") or not outputs[0].type.tensor_type.HasField("shape"):
        return None
    dims = outputs[0].type.tensor_type.shape.dim
    return tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in dims[1:])


def run_recipe(recipe: Recipe, options: RunOptions) -> dict:
    """run_report's report.json as a dict (a sweep's variants hand it across processes)."""
    return run_report(recipe, options).data


def run_report(recipe: Recipe, options: RunOptions) -> Report:
    """Apply the recipe's passes into options.out and write report.json|md|html there; return the Report."""
    from optcli.llm.run import is_llm_recipe, run_llm

    if is_llm_recipe(recipe):
        return run_llm(recipe, options)
    original, data = preflight(recipe, options.settings.trust_pickle)
    assert original is not None and data is not None, "preflight returns (None, None) only for an LLM recipe"
    sources = [s for s in (recipe.data.calibration, recipe.data.eval, recipe.data.train) if s is not None]
    inputs = [recipe.model.path] + [p for s in sources for p in (s.path, s.text) if p is not None]
    inputs += [options.recipe_path] if options.recipe_path is not None else []
    folder = OutputFolder(options.out, options.settings.overwrite, options.settings.resume, inputs)
    try:
        report = _run(recipe, options, folder, original, data)
        # Written while the folder is still locked, so a concurrent --overwrite run cannot interleave with them.
        folder.record("report.json", "report.md", "report.html")
        with writing(f"{options.out}/report.{{json,md,html}}"):
            write_reports(report, options.out)
        return report
    finally:
        if options.step_cache is not None:
            options.step_cache.release()  # a step that failed never stored: the next run computes it
        folder.close()


@dataclass
class _Run:
    """What every step of one run shares."""

    recipe: Recipe
    options: RunOptions
    folder: OutputFolder
    original: Model
    data: DataCatalog
    evaluator: Evaluator
    reused: dict = field(default_factory=dict)  # step name -> "resume" | "step cache"


def _run(recipe: Recipe, options: RunOptions, folder: OutputFolder, original: Model, data: DataCatalog) -> Report:
    t0 = time.perf_counter()
    evaluator = Evaluator(recipe, original, data, options.log, progress=options.progress)
    run = _Run(recipe, options, folder, original, data, evaluator)
    first = _measure_original(recipe, original, evaluator, options.log)
    steps, warnings = [first], [f"original: {n}" for n in (*original.notes, *first.pop("latency_notes"))]
    model = original
    models = [original]
    inputs_key = input_key(recipe)
    input_sha = ""  # of the artifact the step reads; the original model's is in inputs_key
    for index, config in enumerate(recipe.passes, start=1):
        # A step is reused only for the same input artifact (bytes), config, model, data and seed.
        machine = get_pass(config.type).machine_key
        key = step_key(inputs_key + input_sha + (machine(config, recipe) if machine else ""), config)
        model, step, record = _step(run, f"{index}-{config.type}", config, key, model)
        _unpruned_latency_note(step, steps[-1])
        steps.append(step)
        models.append(model)
        warnings.extend(record.get("warnings", []))
        input_sha = record["sha256"]
    output = write_final(model, folder)
    named = recipe.gates.model_fields_set
    # gates: {} turns the defaults off; gates: {inconclusive: fail} alone names no gate, so they stay.
    defaults = "gates" not in recipe.model_fields_set or (bool(named) and named <= {"inconclusive"})
    base = baseline_index({"steps": steps})
    ab = _speed_ab(run, models, steps, base)
    gates = check_gates(
        recipe.gates,
        steps,
        defaults,
        base,
        ab,
        recipe.gates.inconclusive,
        recipe.passes,
        recheck=lambda: _speed_ab(run, models, steps, base),
    )
    report = {
        "schema_version": SCHEMA_VERSION,
        "optcli_version": __version__,
        "recipe": recipe.model_dump(mode="json"),
        "environment": environment(recipe.report.latency.threads, recipe.report.target),
        "input": {
            "path": str(recipe.model.path),
            "format": original.format,
            "kind": original.kind,
            "sha256": sha256_file(recipe.model.path),
        },
        "output": output,
        "evaluation": evaluator.description(),
        "steps": steps,
        "speed": speed_block(ab, steps[base]["name"], steps[-1]["name"]),
        "gates": gates,
        "passed": all(g["passed"] for g in gates),
        "warnings": warnings + near_gate_warnings(gates),
        "seconds": round(time.perf_counter() - t0, 3),
        "reused_steps": run.reused,
    }
    report["summary"] = summary(report)
    for step, versus in zip(steps, step_comparisons(report), strict=True):
        step.update(versus)
    return Report.from_dict(report, options.out)


def _speed_ab(run: _Run, models: list[Model], steps: list[dict], base: int) -> dict | None:
    """The final artifact's time over the baseline's per batch size, interleaved in this process (abtest), when a
    speed gate needs it: two p50s taken minutes apart compare the machine's load as much as the models."""
    recipe = run.recipe
    # Always when a pass follows the baseline: the verdict sentence says its speed with confidence too.
    if base >= len(steps) - 1:
        return None
    spec = recipe.report.latency
    providers = providers_for(recipe.report.target)
    run.options.log(f"timing {steps[-1]['name']} against {steps[base]['name']} side by side")
    # Each timed as its latency row was: the original as loaded, a step's artifact as written to disk.
    runners = []
    for m in (models[base], models[-1]):
        if m is run.original or m.format == "onnx":
            runners.append(runner_for(m, spec.threads, providers))
        else:
            assert m.path is not None, "a step's torch model is the artifact it wrote"
            runners.append(load_written(m.path, m.inputs, spec.threads, providers, run.original.task))
    return compare_runners(runners[0], runners[1], spec.batch_sizes, spec.warmup, spec.runs)


def speed_block(ab: dict | None, base: str, final: str) -> dict | None:
    """report.json "speed": the final artifact's time over the baseline's, timed side by side, per batch size."""
    if not ab:
        return None
    return {
        "baseline": base,
        "final": final,
        "confidence": 0.95,
        **{
            k: {"time_ratio": round(r.value, 4), "interval": r.interval, "rounds": r.rounds, "runs": r.runs}
            for k, r in ab.items()
        },
    }


def _measure_original(recipe: Recipe, original: Model, evaluator: Evaluator, log) -> dict:
    t0 = time.perf_counter()
    log(f"measuring the original model ({original.kind}, {recipe.model.path.name})")
    direct = original.format == "torch" or original.path
    try:
        runner = (
            runner_for(original, recipe.report.latency.threads, providers_for(recipe.report.target)) if direct else None
        )
    except Unloadable as e:  # the user's graph, not our bug: say so in their terms
        raise BadInput(f"ONNX Runtime cannot load this model: {e}") from None
    row = evaluator.measure(recipe.model.path, original, runner=runner)
    return {
        "name": "original",
        "type": None,
        "format": original.format,
        "path": str(recipe.model.path),
        "seconds": round(time.perf_counter() - t0, 3),
        **row,
        "details": {"loaded_as": original.kind},
    }


def _step(run: _Run, name: str, config, key: str, model: Model) -> tuple[Model, dict, dict]:
    """Run (or, with --resume, reuse) one step. Returns the model it wrote, its report row and its step record."""
    options, folder = run.options, run.folder
    spec = get_pass(config.type)
    done = folder.root / "steps" / name / "step.json"
    record = finished_step(done, key) if options.settings.resume and not spec.rerun_on_resume else None
    if record is not None:
        options.log(f"{name}: unchanged since the last run, reusing it (--resume)")
        run.reused[name] = "resume"
        return reload_step(done.parent, record, model), record["step"], record
    cache = None if spec.rerun_on_resume else options.step_cache
    if cache is not None and (record := cache.claim(name, key, done.parent)) is not None:
        options.log(f"{name}: computed by another run from the same input and config, reusing it (step cache)")
        run.reused[name] = "step cache"
        return reload_step(done.parent, record, model), record["step"], record
    options.log(f"{name}: running")
    tmp = folder.step_tmp(name)
    ctx = Context(
        recipe=run.recipe,
        step_name=name,
        step_dir=tmp,
        reference=run.original,
        data=run.data,
        seed=run.recipe.seed,
        log=options.log,
        settings=options.settings,
        resume_dir=folder.root / "steps" / name,
        **({"progress": options.progress} if options.progress is not None else {}),
    )
    started = time.perf_counter()
    try:
        with library_warnings.captured() as said:
            model = spec.apply(model, config, ctx)
        words, originals = library_warnings.in_words(said, already=ctx.warnings)
        ctx.warnings.extend(f"{name}: {message}" for message in words)
        if originals:
            ctx.details["library_messages"] = originals
        if model.format == "torch" and not (model.path is not None and model.path.is_dir() and inside(model.path, tmp)):
            model = model.with_(path=save_torch(model.module, model.inputs, tmp))  # a pass that wrote a folder keeps it
        # every pass returns a model on disk (ONNX passes write a file; a torch module was just saved above)
        assert model.path is not None, f"{name} returned a model with no file"
    except KeyboardInterrupt:
        raise
    except OptcliError as e:
        raise _in_user_terms(e, name, model, run) from e
    except Exception as e:
        raise _in_user_terms(_failure(name, e, tmp, folder.root), name, model, run) from e
    seconds = time.perf_counter() - started
    check_details(spec, name, ctx.details)
    options.log(f"{name}: measuring {model.path.name}")
    try:
        row = run.evaluator.measure(model.path, model)
    except Unloadable as e:  # ONNX Runtime refuses what the pass wrote: about this step, not a temp path
        failed = PassFailed(name, f"ONNX Runtime cannot run the model this step wrote: {e}")
        raise _in_user_terms(failed, name, model, run) from e
    ctx.warnings.extend(f"{name}: {n}" for n in row.pop("latency_notes"))
    step = {
        "name": name,
        "type": config.type,
        "format": model.format,
        "path": str(Path("steps") / name / model.path.name),
        "seconds": round(seconds, 3),
        **row,
        "details": ctx.details,
    }
    record = {
        "key": key,
        "artifact": model.path.name,
        "sha256": sha256_file(model.path),
        "step": step,
        "warnings": ctx.warnings,
    }
    write_record(tmp, record)
    final_dir = folder.finish_step(tmp, name)
    if cache is not None:
        cache.store(name, key, final_dir)
    return model.with_(path=final_dir / model.path.name), step, record


def _in_user_terms(error: OptcliError, name: str, model: Model, run: _Run) -> OptcliError:
    """A pass's error about the user's model and step, never about optcli's own intermediate or temp files.

    Paths under the output folder's step dirs and under the system temp dir are replaced by what they are to the
    user ("the model 1-export wrote", "a temp file of 2-quantize"); a message that no longer names the user's model
    says which model and step it is about.
    """
    if isinstance(error, DiskFull):
        return error  # names the file the disk filled on: the folder to clean up
    source = Path(run.recipe.model.path)
    root = run.folder.root
    sources = (run.recipe.data.calibration, run.recipe.data.eval, run.recipe.data.train)
    data = tuple(Path(p) for s in sources if s is not None for p in (s.path, s.text) if p is not None)
    text = scrub_paths(str(error), name, root / "steps", model.path, keep=(source, root, *data))
    if text == str(error) and not (isinstance(error, PassFailed) and str(source) not in text):
        return error
    if str(source) not in text:
        head = f"pass {name} failed"
        about = f"pass {name} failed on {source}"
        text = text.replace(head, about, 1) if text.startswith(head) else f"{name} on {source}: {text}"
    changed = type(error).__new__(type(error))
    changed.__dict__.update(error.__dict__)
    changed.args = (text,)
    return changed


_PATH_END = r"[^\s,;:()'\"]*"


def scrub_paths(text: str, name: str, steps: Path, current: Path | None, keep: tuple[Path, ...] = ()) -> str:
    """`text` with every path under `steps` (the output folder's step dirs) or the temp dir said in user terms;
    paths in `keep` (the user's model, the output folder) and under them stay as they are."""
    import tempfile

    def forms(p) -> set[str]:
        return {str(p), str(Path(p).resolve())}

    step_roots = forms(steps)
    kept = {f for p in keep for f in forms(p)}

    def label(path: str) -> str:
        for root in step_roots:
            rest = path[len(root) :].lstrip("/")
            if path.startswith(root) and rest:
                step = rest.split("/")[0]
                # .2-quantize.tmp-PID: this step's own work in progress; else a finished step's artifact
                return f"a temp file of {name}" if step.startswith(".") else f"the model {step} wrote"
        if any(path == k or path.startswith(k.rstrip("/") + "/") for k in kept):
            return path
        return f"a temp file of {name}"

    roots = step_roots | forms(tempfile.gettempdir())
    pattern = "|".join(re.escape(r) for r in sorted(roots, key=len, reverse=True))
    text = re.sub(rf"(?:{pattern})(?=/|[\s,;:()'\"]|$)(?:/{_PATH_END})?", lambda m: label(m[0]), text)
    if current is not None:
        here = Path(current).resolve()
        if any(here.is_relative_to(Path(r)) for r in step_roots if Path(r).is_absolute()):
            said = label(str(here))
            text = re.sub(rf"(?<![\w/.-]){re.escape(here.name)}(?![\w.-])", said, text)
    return text


def _failure(name: str, e: Exception, tmp: Path, root: Path) -> OptcliError:
    """What a pass's unexpected exception means to the user: a full disk, or the pass failing (exit 3)."""
    message = f"{type(e).__name__}: {first_line(e, 400)}"
    if isinstance(e, Unloadable):
        message = f"ONNX Runtime cannot load the model this step wrote: {first_line(e, 400)}"
    if isinstance(e, OSError) and e.errno in DISK_FULL:
        return DiskFull(
            f"pass {name}: disk full while writing {e.filename or tmp}: free some space and rerun with --resume"
        )
    free = shutil.disk_usage(root).free
    if free < LOW_DISK:
        # Native writers (ONNX Runtime's) can leave a truncated file without raising ENOSPC; the next read fails oddly.
        return DiskFull(
            f"pass {name} failed with the disk holding {root} nearly full ({free // 1024} kB free): "
            f"free some space and rerun with --resume ({message})"
        )
    return PassFailed(name, message)


def _unpruned_latency_note(step: dict, before: dict) -> None:
    # Say plainly when sparsity bought no speed: dense kernels do not skip zeros.
    if step["sparsity"] - before["sparsity"] > 0.1 and step["parameters"] >= before["parameters"] * 0.98:
        step["details"]["latency_note"] = (
            "unstructured sparsity does not make dense kernels faster; it shrinks the compressed size. "
            "Use structured: channels to remove whole channels for speed."
        )
