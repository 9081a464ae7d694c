"""The run of an LLM recipe (one with a `decoder` pass): the folder exported fp32 as the reference generation is
measured against, each pass's decoder folder written, measured (sliding-window perplexity, time to first token,
decode tokens/s, greedy agreement, peak resident memory) and recorded, the decode speed-up of the final decoder
over the fp32 one timed side by side, the gates checked.

Apart from runner.py's loop because nothing of it fits a decoder: the original is never loaded in this process (a
model larger than memory is refused from its weight files' headers first), and a step is a folder
onnxruntime-genai runs, timed token by token rather than batch by batch.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from optcli.errors import BadInput, OptcliError, PassFailed, first_line
from optcli.llm import FORMAT
from optcli.llm.config import LlmReport

if TYPE_CHECKING:  # the run spine imports this module: its types only, never at run time
    from optcli.model import Model
    from optcli.recipe import Recipe
    from optcli.runner import RunOptions
    from optcli.steps import OutputFolder

REFERENCE = "original"  # the fp32 export of the folder: what every step's perplexity and speed are compared with
DEFAULT_GATES = {"max_perplexity_increase": 0.05}


def is_llm_recipe(recipe) -> bool:
    from optcli.passes import get_pass

    # The pass that makes a decoder folder says so; a pass that also takes one (quantize) does not make the recipe an LLM's.
    return any(get_pass(c.type).produces == FORMAT for c in recipe.passes)


def settings(recipe) -> LlmReport:
    return getattr(recipe.report, "llm", None) or LlmReport()


@dataclass
class Prepared:
    """What preflight read: the eval text's tokens and the generation prompts taken from it."""

    arch: str
    tokens: np.ndarray
    prompts: list[list[int]]
    text: Path


def preflight_llm(recipe) -> Prepared:
    """Every bad input of an LLM recipe refused before any work (exit 2): an architecture no export supports, a
    folder without a tokenizer, a model larger than memory, a text shorter than one window."""
    from optcli.hf import is_folder
    from optcli.hf.folder import raw_config
    from optcli.llm.export import check_exportable
    from optcli.llm.generate import prompts_from_tokens
    from optcli.llm.memory import check_fits
    from optcli.llm.perplexity import check_long_enough, text_tokens

    folder = Path(recipe.model.path)
    if not is_folder(folder):
        raise BadInput(
            f"model.path {folder}: a decoder pass exports a Hugging Face causal-LM folder (config.json, weights, "
            "tokenizer); give that folder"
        )
    arch = check_exportable(folder)
    check_fits(folder)
    source = recipe.data.eval
    if source is None or source.text is None:
        raise BadInput("data.eval: an LLM recipe measures perplexity and generation on a text file; set data.eval.text")
    llm = settings(recipe)
    config = raw_config(folder)
    limit = next((v for k in ("max_position_embeddings", "n_positions") if isinstance(v := config.get(k), int)), None)
    if limit is not None and llm.context > limit:
        raise BadInput(f"report.llm.context {llm.context} is longer than the model takes ({limit}); set it to {limit}")
    if limit is not None and llm.prompt_tokens + llm.new_tokens > limit:
        raise BadInput(
            f"report.llm: prompt_tokens + new_tokens ({llm.prompt_tokens + llm.new_tokens}) is longer than the model "
            f"takes ({limit}); lower them"
        )
    tokens = text_tokens(Path(source.tokenizer or folder), Path(source.text))
    check_long_enough(len(tokens), llm.context, f"data.eval.text {source.text}")
    prompts = prompts_from_tokens(tokens, llm.prompts, llm.prompt_tokens)
    if not prompts:
        raise BadInput(
            f"data.eval.text {source.text}: {len(tokens)} tokens, fewer than report.llm.prompt_tokens "
            f"({llm.prompt_tokens}); give more text or lower it"
        )
    return Prepared(arch, tokens, prompts, Path(source.text))


@dataclass
class _Run:
    recipe: Recipe
    options: RunOptions
    folder: OutputFolder
    prepared: Prepared
    llm: LlmReport
    reused: dict = field(default_factory=dict)
    reference_tokens: list | None = None
    reference: Model | None = None  # the fp32 decoder, once its step ran


def run_llm(recipe, options):
    """The decoder run: report.json|md|html written into options.out; returns the typed Report."""
    from optcli.errors import writing
    from optcli.report import write_reports
    from optcli.report.model import report_of
    from optcli.steps import OutputFolder

    prepared = preflight_llm(recipe)
    inputs = [Path(recipe.model.path), prepared.text]
    inputs += [options.recipe_path] if options.recipe_path is not None else []
    folder = OutputFolder(options.out, options.settings.overwrite, options.settings.resume, inputs)
    try:
        report = report_of(_run(_Run(recipe, options, folder, prepared, settings(recipe))))
        folder.record("report.json", "report.md", "report.html")
        with writing(f"{options.out}/report.{{json,md,html}}"):
            write_reports(report, options.out)
        return report
    finally:
        folder.close()


def _run(run: _Run) -> dict:
    from optcli import __version__
    from optcli.environment import environment
    from optcli.model import Model
    from optcli.passes.decoder import Config as DecoderConfig
    from optcli.report.model import SCHEMA_VERSION
    from optcli.report.summary import step_comparisons, summary
    from optcli.steps import input_key, sha256_file, step_key, write_final

    t0 = time.perf_counter()
    recipe, llm = run.recipe, run.llm
    source = Path(recipe.model.path)
    original = Model(format="torch", inputs=[], path=source, kind=f"hf {run.prepared.arch}", task="causal-lm")
    inputs_key = input_key(recipe) + llm.model_dump_json()
    reference, first = _step(run, REFERENCE, DecoderConfig(precision="fp32"), step_key(inputs_key, llm), original)
    run.reference = reference
    steps, models, warnings = [first], [reference], []
    model, previous = original, ""
    for index, config in enumerate(recipe.passes, start=1):
        name = f"{index}-{config.type}"
        model, step = _step(run, name, config, step_key(inputs_key + previous, config), model)
        steps.append(step)
        models.append(model)
        previous = sha256_file(model.path)
    warnings += [w for s in steps for w in s["details"].pop("warnings", [])]
    output = write_final(models[-1], run.folder)
    generation = _generation_block(run, models, steps)
    gates = _gates(recipe, steps, generation)
    report = {
        "schema_version": SCHEMA_VERSION,
        "optcli_version": __version__,
        "recipe": recipe.model_dump(mode="json"),
        "environment": environment(llm.threads or recipe.report.latency.threads, recipe.report.target),
        "input": {"path": str(source), "format": "hf", "kind": original.kind, "sha256": sha256_file(source)},
        "output": output,
        "evaluation": f"perplexity on {run.prepared.text} ({len(run.prepared.tokens)} tokens), sliding windows of "
        f"{llm.context} tokens, stride {llm.stride}",
        "steps": steps,
        "speed": None,
        "generation": generation,
        "gates": gates,
        "passed": all(g["passed"] for g in gates),
        "warnings": warnings,
        "seconds": round(time.perf_counter() - t0, 3),
        "reused_steps": run.reused,
    }
    report["summary"] = summary(report)
    for step, versus in zip(steps, step_comparisons(report), strict=True):
        step.update(versus)
    return report


def _step(run: _Run, name: str, config, key: str, model):
    """Run (or, with --resume, reuse) one step; measure its decoder folder. Returns (model, report row)."""
    from optcli.passes import get_pass
    from optcli.passes.base import Context, check_details
    from optcli.steps import finished_step, sha256_file, write_record

    options, folder = run.options, run.folder
    done = folder.root / "steps" / name / "step.json"
    record = finished_step(done, key) if options.settings.resume else None
    if record is not None:
        options.log(f"{name}: unchanged since the last run, reusing it (--resume)")
        run.reused[name] = "resume"
        if name == REFERENCE:
            run.reference_tokens = record["tokens"]
        path = done.parent / record["artifact"]
        return model.with_(format=FORMAT, module=None, path=path), record["step"]
    options.log(f"{name}: running")
    tmp = folder.step_tmp(name)
    ctx = Context(
        recipe=run.recipe,
        step_name=name,
        step_dir=tmp,
        # A pass after the export (a quantizer, a search) gets the fp32 decoder as its reference and the eval
        # text's tokens and prompts as its data (Prepared); recipe.report.llm says the perplexity window.
        reference=run.reference or model,
        data=run.prepared,
        seed=run.recipe.seed,
        log=options.log,
        settings=options.settings,
        resume_dir=folder.root / "steps" / name,
        **({"progress": options.progress} if options.progress is not None else {}),
    )
    started = time.perf_counter()
    try:
        new = get_pass(config.type).apply(model, config, ctx)
    except KeyboardInterrupt:
        raise
    except OptcliError:
        raise
    except Exception as e:
        raise PassFailed(name, f"{type(e).__name__}: {first_line(e, 400)}") from e
    seconds = time.perf_counter() - started
    check_details(get_pass(config.type), name, ctx.details)  # the report contract, as for every other step
    assert new.path is not None, f"{name} returned a decoder with no folder"  # every LLM pass writes one
    options.log(f"{name}: measuring perplexity and generation")
    try:
        measured, tokens = _measure(run, new.path, tmp, check=name == REFERENCE)
    except OptcliError:
        raise
    except Exception as e:
        raise PassFailed(name, f"measuring the decoder it wrote: {type(e).__name__}: {first_line(e, 400)}") from e
    if name == REFERENCE:
        run.reference_tokens = tokens
    else:
        from optcli.llm.generate import greedy_agreement

        assert run.reference_tokens is not None, "the reference step runs first"

        measured["generation"]["greedy_agreement"] = round(greedy_agreement(run.reference_tokens, tokens), 4)
    artifact = new.path.relative_to(tmp)
    step: dict[str, Any] = {
        "name": name,
        "type": None if name == REFERENCE else config.type,
        "format": FORMAT,
        "path": str(Path("steps") / name / artifact),
        "seconds": round(seconds, 3),
        "size_bytes": decoder_bytes(new.path),
        "compressed_bytes": None,
        "parameters": None,
        "nonzero_parameters": None,
        "sparsity": None,
        "latency": {},
        "accuracy": {"metric": "perplexity", "value": measured.pop("perplexity")},
        "fidelity": None,
        "details": {**ctx.details, **measured, "warnings": [f"{name}: {w}" for w in ctx.warnings]},
    }
    if name == REFERENCE:
        step["details"]["loaded_as"] = model.kind
    record = {"key": key, "artifact": str(artifact), "sha256": sha256_file(new.path), "step": step, "tokens": tokens}
    write_record(tmp, record)
    final = folder.finish_step(tmp, name)
    return new.with_(path=final / artifact), step


def _measure(run: _Run, path: Path, work: Path, check: bool) -> tuple[dict, list]:
    from optcli.llm.generate import measure_in_child
    from optcli.llm.perplexity import perplexity

    llm, prepared = run.llm, run.prepared
    out: dict = {}
    if check and llm.check_logits:
        from optcli.llm.check import check_logits

        out["logits_check"] = check_logits(Path(run.recipe.model.path), path, prepared.prompts[0][:16])
        if not out["logits_check"]["passed"]:
            raise PassFailed(
                REFERENCE,
                f"the fp32 decoder's logits differ from transformers' by {out['logits_check']['relative_error']:.2g} "
                f"of their range (tolerance {out['logits_check']['tolerance']}): the export is wrong",
            )
    out["perplexity"] = round(perplexity(path, prepared.tokens, llm.context, llm.stride, threads=llm.threads), 6)
    gen = measure_in_child(path, prepared.prompts, llm.new_tokens, llm.threads, work)
    tokens = gen.pop("tokens")
    out["generation"] = gen
    return out, tokens


def decoder_bytes(folder: Path) -> int:
    """Bytes of the decoder itself: its ONNX file and external data (not the tokenizer and configs beside it)."""
    from optcli.llm.decoder import genai_config

    name = genai_config(folder)["model"]["decoder"]["filename"]
    return sum(p.stat().st_size for p in Path(folder).iterdir() if p.is_file() and p.name.startswith(name))


def _generation_block(run: _Run, models: list, steps: list[dict]) -> dict:
    """report.json "generation": the settings, the final decoder's decode speed-up over fp32 timed side by side."""
    from optcli.llm.generate import side_by_side

    llm = run.llm
    block = {
        "baseline": steps[0]["name"],
        "final": steps[-1]["name"],
        "prompt_tokens": llm.prompt_tokens,
        "new_tokens": llm.new_tokens,
        "prompts": len(run.prepared.prompts),
        "context": llm.context,
        "stride": llm.stride,
        "decode_speedup": None,
        "ttft_speedup": None,
        "verdict": "",
    }
    if len(models) > 1:
        run.options.log(f"timing {steps[-1]['name']}'s generation against {steps[0]['name']}'s side by side")
        ratios = side_by_side(
            models[0].path, models[-1].path, run.prepared.prompts[0], llm.new_tokens, llm.rounds, 2, llm.threads
        )
        block["decode_speedup"] = speedup(ratios["decode"])
        block["ttft_speedup"] = speedup(ratios["ttft"])
    block["verdict"] = verdict(steps, block)
    return block


def speedup(r) -> dict:
    """An abtest.Ratio of times (new/base) as a speed-up (base/new) with its 95% interval."""
    return {
        "value": round(1 / r.value, 4),
        "interval": [round(1 / r.high, 4), round(1 / r.low, 4)] if r.low > 0 else [0.0, math.inf],
        "rounds": r.rounds,
        "runs": r.runs,
        "confidence": 0.95,
    }


def verdict(steps: list[dict], block: dict) -> str:
    """What was won and what it cost, in one sentence."""
    first, last = steps[0], steps[-1]
    if first is last:
        return ""
    parts = []
    if first.get("size_bytes") and last.get("size_bytes"):
        parts.append(f"{first['size_bytes'] / last['size_bytes']:.2f}× smaller")
    speed = block.get("decode_speedup")
    if speed:
        low, high = speed["interval"]
        parts.append(f"decodes {speed['value']:.2f}× as fast (95% interval {low:.2f}–{high:.2f}×)")
    first_token = block.get("ttft_speedup")
    if first_token:
        parts.append(f"first token {first_token['value']:.2f}× as fast")
    p0, p1 = first["accuracy"]["value"], last["accuracy"]["value"]
    cost = f"perplexity {p0:.4g} → {p1:.4g} ({(p1 - p0) / p0:+.1%})"
    agree = last["details"].get("generation", {}).get("greedy_agreement")
    if agree is not None:
        cost += f", {agree:.0%} of the first greedy tokens unchanged"
    return f"{last['name']} against the fp32 decoder: {', '.join(parts)}; {cost}"


def _gates(recipe, steps: list[dict], generation: dict) -> list[dict]:
    from optcli.abtest import passed, verdict_at_least
    from optcli.gates import check_gates

    gates = recipe.gates
    if "gates" not in recipe.model_fields_set:
        gates = gates.model_copy(update=DEFAULT_GATES)
    results = check_gates(gates, steps, False, 0, None, gates.inconclusive, recipe.passes)
    limit = getattr(gates, "min_decode_speedup", None)
    if limit is not None:
        speed = generation.get("decode_speedup")
        gate = {"name": "min_decode_speedup", "limit": limit}
        if not speed:
            results.append({**gate, "value": None, "passed": False, "note": "no step after the fp32 decoder"})
        else:
            low, high = speed["interval"]
            said = verdict_at_least(low, high, limit)
            results.append(
                {
                    **gate,
                    "value": speed["value"],
                    "interval": speed["interval"],
                    "verdict": said,
                    "passed": passed(said, gates.inconclusive),
                    "note": f"decode tokens/s over the fp32 decoder, interleaved A/B ({speed['rounds']} rounds), 95% interval",
                }
            )
    return results
