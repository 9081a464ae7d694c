"""Apply a recipe's passes in order; write, measure and record each step; check the gates.

out/
  steps/<n>-<type>/    each step's artifact + step.json (kept for --resume)
  model.onnx|.pt2      the final artifact
  report.json|md|html
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from optcli import __version__, library_warnings
from optcli.artifact import Model, artifact_files, check_memory, example_inputs, load_model, save_torch
from optcli.data import DataCatalog, Dataset
from optcli.errors import DISK_FULL, BadInput, DiskFull, OptcliError, PassFailed, writing
from optcli.measure import (
    fidelity,
    higher_is_better,
    latency,
    load_written,
    metric_value,
    parameter_counts,
    predict,
    runner_for,
    size_on_disk,
)
from optcli.passes import get_pass
from optcli.passes.base import Context
from optcli.report import write_reports

LOCK = ".optcli.lock"
LOW_DISK = 16 << 20  # bytes free below which a failing pass is reported as a full disk


@dataclass
class RunOptions:
    out: Path
    overwrite: bool = False
    resume: bool = False
    quiet: bool = False
    trust_pickle: bool = False
    log: Callable[[str], None] = lambda msg: None
    extra: dict = field(default_factory=dict)  # per-pass runtime options (distributed flags ...)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    for f in artifact_files(path) if path.suffix == ".onnx" else [path]:
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 22):
                h.update(chunk)
    return h.hexdigest()


def _atomic_copy(src: Path, dst: Path) -> None:
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    try:
        with writing(dst):
            shutil.copyfile(src, tmp)
            os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)


def _inside(path: Path, folder: Path) -> bool:
    path, folder = path.resolve(), folder.resolve()
    return path == folder or folder in path.parents


class OutputFolder:
    """The run's output folder: refuses to clobber, locks against a concurrent run, cleans up temp files."""

    def __init__(self, root: Path, overwrite: bool, resume: bool, inputs: list[Path] = ()):
        self.root = root
        self.lock = root / LOCK
        if root.exists() and not root.is_dir():
            raise BadInput(f"output {root} is a file; give a folder")
        for path in inputs:  # --overwrite would delete it, the final copy could land on it
            if _inside(path, root):
                raise BadInput(f"output folder {root} holds the input {path}; choose an output folder of its own")
        if self.lock.exists():
            self._in_use()
        if root.exists() and any(p.name != LOCK for p in root.iterdir()) and not (overwrite or resume):
            raise BadInput(
                f"output folder {root} is not empty; pass --overwrite to replace it or --resume to continue it"
            )
        with writing(self.lock):
            root.mkdir(parents=True, exist_ok=True)
            try:
                fd = os.open(self.lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                self._in_use()
            os.write(fd, str(os.getpid()).encode())
            os.close(fd)
        if overwrite and not resume:
            for p in root.iterdir():
                if p.name != LOCK:
                    shutil.rmtree(p) if p.is_dir() else p.unlink()
        (root / "steps").mkdir(exist_ok=True)

    def _in_use(self):
        try:
            pid = self.lock.read_text().strip()
        except OSError:
            pid = ""
        raise BadInput(
            f"output folder {self.root} is in use by another optcli run (pid {pid or '?'}); wait for it, "
            f"or delete {self.lock} if that run is gone"
        ) from None

    def step_tmp(self, name: str) -> Path:
        tmp = self.root / "steps" / f".{name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        with writing(tmp):
            tmp.mkdir(parents=True)
        return tmp

    def finish_step(self, tmp: Path, name: str) -> Path:
        final = self.root / "steps" / name
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        return final

    def close(self) -> None:
        for tmp in (self.root / "steps").glob(".*.tmp-*"):
            shutil.rmtree(tmp, ignore_errors=True)
        self.lock.unlink(missing_ok=True)


class Evaluator:
    """Measures artifacts the same way every step: same inputs, same threads, same reference outputs."""

    def __init__(self, recipe, original: Model, data: DataCatalog, log):
        self.recipe = recipe
        self.spec = recipe.report.latency
        self.eval: Dataset | None = data.eval
        self.log = log
        if self.eval is not None:
            self.inputs_note = f"data.eval ({len(self.eval)} samples)"
            self.labels = self.eval.labels
            self.metric = self.eval.metric
        else:
            self.inputs_note = f"{recipe.report.fidelity_samples} generated inputs"
            self.labels, self.metric = None, None
        self.generated = (
            example_inputs(original.inputs, batch=recipe.report.fidelity_samples, seed=recipe.seed)
            if self.eval is None
            else None
        )
        self.reference_outputs: list[np.ndarray] | None = None

    def description(self) -> str:
        if self.labels is not None:
            return f"{self.metric} on {self.inputs_note}; fidelity vs the original on the same inputs"
        return f"fidelity only (no labelled eval data): original vs optimized on {self.inputs_note}"

    def _batches(self, inputs):
        fixed = [s.shape[0] for s in inputs if not s.batch_dynamic and s.shape]
        if self.eval is not None:
            return (feeds for feeds, _ in self.eval.batches(batch_size=fixed[0] if fixed else None))
        size = fixed[0] if fixed else 32
        n = len(next(iter(self.generated.values())))
        return ({k: v[i : i + size] for k, v in self.generated.items()} for i in range(0, n, size))

    def measure(self, path: Path, model: Model, runner=None) -> dict:
        runner = runner or load_written(path, model.inputs, self.spec.threads)
        outputs = predict(runner, self._batches(model.inputs))
        if self.reference_outputs is None:
            self.reference_outputs = outputs
        row = {**size_on_disk(path), **parameter_counts(path, model.module)}
        lat, notes = latency(runner, self.spec.batch_sizes, self.spec.warmup, self.spec.runs)
        row["latency"] = lat
        row["latency_notes"] = notes
        row["engine"] = runner.engine
        row["accuracy"] = (
            {"metric": self.metric, "value": metric_value(self.metric, outputs, self.labels)}
            if self.labels is not None
            else None
        )
        row["fidelity"] = fidelity(self.reference_outputs, outputs)
        return row


def _step_key(previous: str, config) -> str:
    return hashlib.sha256((previous + json.dumps(config.model_dump(mode="json"), sort_keys=True)).encode()).hexdigest()


def _finished_step(done: Path, key: str) -> dict | None:
    """The record of a finished step with this key whose artifact is intact on disk, else None (run it again)."""
    try:
        record = json.loads(done.read_text())
        if record.get("key") != key:
            return None
        artifact = done.parent / record["artifact"]
        return record if sha256_file(artifact) == record["sha256"] else None
    except Exception:  # half-written, edited (a broken ONNX raises DecodeError) or from an older optcli: not trusted
        return None


def _input_key(recipe) -> str:
    """What every step depends on besides its own config: the model file, the data files, the seed."""
    parts = [
        sha256_file(recipe.model.path),
        json.dumps(recipe.model.model_dump(mode="json"), sort_keys=True),
        json.dumps(recipe.data.model_dump(mode="json"), sort_keys=True),
        str(recipe.seed),
    ]
    for name in ("calibration", "eval", "train"):
        source = getattr(recipe.data, name)
        if source is not None and source.path is not None:
            parts.append(sha256_file(source.path))
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def _reload(step_dir: Path, record: dict, model: Model) -> Model:
    path = step_dir / record["artifact"]
    if path.suffix == ".onnx":
        return model.with_(format="onnx", module=None, path=path)
    import torch

    return model.with_(format="torch", module=torch.export.load(str(path)).module(), path=path)


def preflight(recipe, trust_pickle: bool = False) -> tuple[Model, DataCatalog]:
    """Open the model and every data source before any work: bad files and mismatched keys fail here (exit 2)."""
    original = load_model(recipe.model, trust_pickle=trust_pickle)
    check_memory(original.inputs, max(recipe.report.latency.batch_sizes), "report.latency.batch_sizes")
    if recipe.data.eval is None:
        check_memory(original.inputs, recipe.report.fidelity_samples, "report.fidelity_samples")
    data = DataCatalog(recipe.data, original.inputs)
    for name in ("calibration", "eval", "train"):
        data.get(name)
    for config in recipe.passes:
        spec = get_pass(config.type)
        if spec.preflight is not None:
            spec.preflight(config, recipe, original)
    return original, data


def run_recipe(recipe, options: RunOptions) -> dict:
    original, data = preflight(recipe, options.trust_pickle)
    inputs = [recipe.model.path] + [
        s.path for s in (recipe.data.calibration, recipe.data.eval, recipe.data.train) if s is not None and s.path
    ]
    folder = OutputFolder(options.out, options.overwrite, options.resume, inputs)
    try:
        report = _run(recipe, options, folder, original, data)
        # Written while the folder is still locked, so a concurrent --overwrite run cannot interleave with them.
        with writing(f"{options.out}/report.{{json,md,html}}"):
            write_reports(report, options.out)
        return report
    finally:
        folder.close()


def _run(recipe, options: RunOptions, folder: OutputFolder, original: Model, data: DataCatalog) -> dict:
    log = options.log
    t0 = time.perf_counter()
    evaluator = Evaluator(recipe, original, data, log)
    log(f"measuring the original model ({original.kind}, {recipe.model.path.name})")
    row = evaluator.measure(
        recipe.model.path,
        original,
        runner=runner_for(original, recipe.report.latency.threads)
        if original.format == "torch" or original.path
        else None,
    )
    steps = [
        {
            "name": "original",
            "type": None,
            "format": original.format,
            "path": str(recipe.model.path),
            "seconds": round(time.perf_counter() - t0, 3),
            **row,
            "details": {"loaded_as": original.kind},
        }
    ]
    warnings: list[str] = [f"original: {n}" for n in row.pop("latency_notes")]
    model = original
    inputs_key = _input_key(recipe)
    input_sha = ""  # of the artifact the step reads; the original model's is in inputs_key
    for index, config in enumerate(recipe.passes, start=1):
        name = f"{index}-{config.type}"
        spec = get_pass(config.type)
        # A step is reused only for the same input artifact (bytes), config, model, data and seed.
        key = _step_key(inputs_key + input_sha, config)
        done = folder.root / "steps" / name / "step.json"
        record = _finished_step(done, key) if options.resume and not spec.rerun_on_resume else None
        if record is not None:
            log(f"{name}: unchanged since the last run, reusing it (--resume)")
            model = _reload(done.parent, record, model)
            steps.append(record["step"])
            warnings.extend(record.get("warnings", []))
            input_sha = record["sha256"]
            continue
        log(f"{name}: running")
        tmp = folder.step_tmp(name)
        ctx = Context(
            recipe=recipe,
            step_name=name,
            step_dir=tmp,
            reference=original,
            data=data,
            seed=recipe.seed,
            quiet=options.quiet,
            log=log,
            options=dict(options.extra, resume_dir=str(folder.root / "steps" / name)),
        )
        started = time.perf_counter()
        try:
            with library_warnings.captured() as said:
                model = spec.apply(model, config, ctx)
            ctx.warnings.extend(f"{name}: {message}" for message in said)
            if model.format == "torch":
                model = model.with_(path=save_torch(model.module, model.inputs, tmp))
        except (OptcliError, KeyboardInterrupt):
            raise
        except Exception as e:
            message = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:400] if str(e).strip() else ''}"
            if isinstance(e, OSError) and e.errno in DISK_FULL:
                raise DiskFull(
                    f"pass {name}: disk full while writing {e.filename or tmp}: free some space and rerun with --resume"
                ) from e
            free = shutil.disk_usage(folder.root).free
            if free < LOW_DISK:
                # Native writers (ONNX Runtime's) can leave a truncated file without raising ENOSPC; the next read fails oddly.
                raise DiskFull(
                    f"pass {name} failed with the disk holding {folder.root} nearly full ({free // 1024} kB free): "
                    f"free some space and rerun with --resume ({message})"
                ) from e
            raise PassFailed(name, message) from e
        seconds = time.perf_counter() - started
        log(f"{name}: measuring {model.path.name}")
        row = evaluator.measure(model.path, model)
        warnings.extend(ctx.warnings + [f"{name}: {n}" for n in row.pop("latency_notes")])
        step = {
            "name": name,
            "type": config.type,
            "format": model.format,
            "path": str(Path("steps") / name / model.path.name),
            "seconds": round(seconds, 3),
            **row,
            "details": ctx.details,
        }
        _unpruned_latency_note(step, steps[-1])
        steps.append(step)
        # step.json goes in before the rename, so a finished step folder always has it, whole.
        record = {
            "key": key,
            "artifact": model.path.name,
            "sha256": sha256_file(model.path),
            "step": step,
            "warnings": ctx.warnings,
        }
        input_sha = record["sha256"]
        with writing(tmp / "step.json"):
            (tmp / "step.json").write_text(json.dumps(record, indent=2, default=str))
        final_dir = folder.finish_step(tmp, name)
        model = model.with_(path=final_dir / model.path.name)
    output = _write_final(model, folder.root)
    gates = check_gates(recipe.gates, steps)
    return {
        "optcli_version": __version__,
        "recipe": recipe.model_dump(mode="json"),
        "environment": environment(recipe.report.latency.threads),
        "input": {
            "path": str(recipe.model.path),
            "format": original.format,
            "kind": original.kind,
            "sha256": sha256_file(recipe.model.path),
        },
        "output": output,
        "evaluation": evaluator.description(),
        "steps": steps,
        "gates": gates,
        "passed": all(g["passed"] for g in gates),
        "warnings": warnings + _near_gate_warnings(gates),
        "seconds": round(time.perf_counter() - t0, 3),
    }


def _unpruned_latency_note(step: dict, before: dict) -> None:
    # Say plainly when sparsity bought no speed: dense kernels do not skip zeros.
    if step["sparsity"] - before["sparsity"] > 0.1 and step["parameters"] >= before["parameters"] * 0.98:
        step["details"]["latency_note"] = (
            "unstructured sparsity does not make dense kernels faster; it shrinks the compressed size. "
            "Use structured: channels to remove whole channels for speed."
        )


def _write_final(model: Model, root: Path) -> dict:
    src = model.path
    files = artifact_files(src)
    for f in files[1:] + files[:1]:  # external data first: the model file never points at data not yet there
        _atomic_copy(f, root / f.name)
    final = root / src.name
    return {"path": str(final), "format": model.format, "sha256": sha256_file(final)}


def check_gates(gates, steps: list[dict]) -> list[dict]:
    first, last = steps[0], steps[-1]
    results = []
    if gates.max_accuracy_drop is not None:
        if first["accuracy"] is None or last["accuracy"] is None:
            results.append(
                {
                    "name": "max_accuracy_drop",
                    "limit": gates.max_accuracy_drop,
                    "value": None,
                    "passed": False,
                    "note": "no labelled eval data (data.eval with labels)",
                }
            )
        else:
            sign = 1 if higher_is_better(first["accuracy"]["metric"]) else -1
            drop = sign * (first["accuracy"]["value"] - last["accuracy"]["value"])
            results.append(
                {
                    "name": "max_accuracy_drop",
                    "limit": gates.max_accuracy_drop,
                    "value": round(drop, 6),
                    "passed": drop <= gates.max_accuracy_drop + 1e-12,
                }
            )
    if gates.min_fidelity_cosine is not None:
        cos = (last.get("fidelity") or {}).get("cosine_mean")
        results.append(
            {
                "name": "min_fidelity_cosine",
                "limit": gates.min_fidelity_cosine,
                "value": cos,
                "passed": cos is not None and cos >= gates.min_fidelity_cosine,
            }
        )
    if gates.max_size_bytes is not None:
        results.append(
            {
                "name": "max_size_bytes",
                "limit": gates.max_size_bytes,
                "value": last["size_bytes"],
                "passed": last["size_bytes"] <= gates.max_size_bytes,
            }
        )
    if gates.min_speedup is not None:
        speedups = [
            first["latency"][b]["p50_ms"] / last["latency"][b]["p50_ms"]
            for b in first["latency"]
            if b in last["latency"]
        ]
        value = round(min(speedups), 4) if speedups else None
        results.append(
            {
                "name": "min_speedup",
                "limit": gates.min_speedup,
                "value": value,
                "passed": value is not None and value >= gates.min_speedup,
                "note": "slowest batch size, p50",
            }
        )
    # A pass can hold its own promise to the user (a quantize target): it lists gates in details["gates"].
    for step in steps[1:]:
        for gate in (step.get("details") or {}).get("gates") or []:
            results.append({**gate, "name": f"{step['name']}: {gate['name']}"})
    return results


def _near_gate_warnings(gates: list[dict]) -> list[str]:
    """Gates that passed with little headroom. For scores bounded by 1 (cosine), headroom is measured against 1 - limit."""
    out = []
    for g in gates:
        value, limit = g["value"], g["limit"]
        if not (g["passed"] and isinstance(value, (int, float)) and isinstance(limit, (int, float)) and limit):
            continue
        scale = 1 - limit if "cosine" in g["name"] and 0 < limit < 1 else abs(limit)
        if abs(value - limit) <= 0.05 * scale:
            out.append(f"gate {g['name']} passed within 5% of its limit ({value} vs {limit})")
    return out


def environment(threads: int) -> dict:
    import onnxruntime
    import torch

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "cpu": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "cpu_count": os.cpu_count(),
        "threads": threads,
        "platform": sys.platform,
    }
