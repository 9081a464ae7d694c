"""report.json as a typed contract: every key a run writes and a reader (compare, the API, the renderers, CI
jobs) may rely on, declared once.

pydantic only, and no import of the rest of optcli: the runner builds a Report, the writers dump it, `compare`
and the API read files back through it, `optcli schema --report` publishes its JSON Schema. A value that was
not measured is null; a key a run did not write stays absent in the dump (model_dump(exclude_unset=True)), so
report.json keeps the shape it had before the contract. Every model allows extra keys: a newer optcli (or a
pass's open-ended details) may add keys an older reader ignores; renaming or removing a key is what
SCHEMA_VERSION counts.

Each pass type's `details` model is declared beside the pass (optcli/passes/<family>/details.py) on top of
StepDetails, and registered with the pass (PassSpec.details); the runner validates a step's details with it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, PrivateAttr, model_serializer, model_validator

# Bump on a rename or a removal (not on an added key), and add the step from the old version to MIGRATIONS.
SCHEMA_VERSION = 1
# {version: the function that turns a report.json of that version into the next version's}: where a change was a
# rename, `compare` still reads the older files. A version with no way up is refused with one line.
MIGRATIONS: dict[int, Callable[[dict], dict]] = {}
# A report.json written before the field existed has version 1's shape.
UNVERSIONED = 1

Number = int | float  # kept as written: an int stays an int (a renderer prints 1,234), a float a float


class Open(BaseModel):
    """A part of the report: declared keys typed, other keys kept (extra="allow"), in the order they were written
    (report.json and every table listing a mapping, the environment, read as the run wrote them)."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)
    _order: tuple[str, ...] = PrivateAttr(default=())

    @model_validator(mode="wrap")
    @classmethod
    def _keep_order(cls, data: Any, handler: Any) -> Any:
        made = handler(data)
        if isinstance(data, dict) and isinstance(made, Open):
            made._order = tuple(data)
        return made

    @model_serializer(mode="wrap")
    def _in_order(self, handler: Any) -> Any:
        out = handler(self)
        if not isinstance(out, dict) or not self._order:
            return out
        return {**{k: out[k] for k in self._order if k in out}, **out}

    def to_dict(self) -> dict:
        """The JSON-ready dict, with the keys that were written (none added as null)."""
        return self.model_dump(mode="python", exclude_unset=True)


class Latency(Open):
    """One batch size's timing of an artifact (report.latency.batch_sizes)."""

    p50_ms: Number | None = None
    p90_ms: Number | None = None
    p99_ms: Number | None = None
    throughput_per_s: Number | None = None
    runs: int | None = None
    load_average: Number | None = None


class Accuracy(Open):
    """The eval metric on data.eval (null without labelled eval data)."""

    metric: str | None = None
    value: Number | None = None


class OutputFidelity(Open):
    """One output's drift from the original, judged in its own terms (kind: classes, sequence, value, ...)."""

    name: str | None = None
    kind: str | None = None
    cosine_mean: Number | None = None
    max_abs_error: Number | None = None
    mean_abs_error: Number | None = None
    top1_agreement: Number | None = None
    position_agreement: Number | None = None
    agreement: Number | None = None
    neighbour_top1_agreement: Number | None = None
    max_relative_error: Number | None = None
    spread: Number | None = None
    note: str | None = None


class Fidelity(Open):
    """The artifact's outputs against the original's on the same inputs (the first output's figures on top)."""

    cosine_mean: Number | None = None
    max_abs_error: Number | None = None
    top1_agreement: Number | None = None
    neighbour_top1_agreement: Number | None = None
    outputs: list[OutputFidelity] | None = None


class Comparison(Open):
    """A step over a reference step: size and p50_batch_<n> time ratios (< 1 is better), an accuracy-like share's
    change in points, or the relative change in % of a metric on another scale (perplexity, mse)."""

    step: str | None = None
    size: Number | None = None
    accuracy_pt: Number | None = None
    metric_change_pct: Number | None = None

    def p50(self, batch: int) -> Any:
        """The p50 time ratio at this batch size (a p50_batch_<n> key)."""
        return (self.model_extra or {}).get(f"p50_batch_{batch}")


class StepDetails(Open):
    """What a step says beyond its figures. The keys here are written by the runner and the gates for any pass;
    each pass type adds its own in the model it registers (optcli/passes/<family>/details.py)."""

    latency_note: str | None = None  # the runner: sparsity that bought no speed
    library_messages: list[Any] | None = None  # the runner: what a library said while the pass ran
    gates: list[dict[str, Any]] | None = None  # a pass's own promises (a quantize target), checked as gates
    loaded_as: str | None = None  # the original: how the model file was loaded


class Step(Open):
    """One artifact of the chain: "original", then "<n>-<pass type>", each measured as written to disk."""

    name: str | None = None
    type: str | None = None
    format: str | None = None
    path: str | None = None
    seconds: Number | None = None
    size_bytes: int | None = None
    compressed_bytes: int | None = None
    files: list[str] | None = None  # the artifact's files (an ONNX graph's external data beside it)
    parameters: int | None = None
    nonzero_parameters: int | None = None
    sparsity: Number | None = None
    latency: dict[str, Latency] = {}
    engine: str | None = None  # what ran the latency loops ("onnxruntime 1.x", "torch 2.x")
    accuracy: Accuracy | None = None
    fidelity: Fidelity | None = None
    details: dict[str, Any] = {}  # validated by the runner with the pass type's details model
    vs_previous: Comparison | None = None
    vs_baseline: Comparison | None = None

    def latency_at(self, batch: int) -> Latency | None:
        return self.latency.get(f"batch_{batch}")

    def p50(self, batch: int) -> Any:
        entry = self.latency_at(batch)
        return entry.p50_ms if entry is not None else None

    @property
    def accuracy_value(self) -> Any:
        return self.accuracy.value if self.accuracy is not None else None

    @property
    def cosine(self) -> Any:
        return self.fidelity.cosine_mean if self.fidelity is not None else None


class Gate(Open):
    """A promise checked on the steps: the recipe's gates, the defaults, or a pass's own ("<step>: <name>")."""

    name: str | None = None
    limit: Any = None
    value: Any = None
    interval: list[Number | None] | None = None
    verdict: str | None = None  # holds | fails | inconclusive, for a timing gate
    passed: bool | None = None
    note: str | None = None


class Environment(Open):
    """Where the run measured: versions, CPU, threads, the execution target."""

    python: str | None = None
    torch: str | None = None
    onnxruntime: str | None = None
    cpu: str | None = None
    cpu_count: int | None = None
    threads: int | None = None  # ONNX Runtime's intra-op threads for latency (report.latency.threads)
    torch_threads: int | None = None  # torch's, for training and export: a --jobs worker's share of the cores


class Artifact(Open):
    """A model file: the input the recipe names, or the final artifact in the output folder."""

    path: str | None = None
    format: str | None = None
    kind: str | None = None
    sha256: str | None = None


class SpeedRatio(Open):
    """The final artifact's time over the baseline's at one batch size, timed side by side, with its interval."""

    time_ratio: Number | None = None
    interval: list[Number | None] | None = None
    rounds: int | None = None
    runs: int | None = None


class Speed(Open):
    """The interleaved A/B of the final artifact against the baseline; one batch_<n> key per batch size."""

    baseline: str | None = None
    final: str | None = None
    confidence: Number | None = None
    __pydantic_extra__: dict[str, SpeedRatio]


class Speedup(Open):
    """A speed-up (base time / new time) timed side by side, with its interval."""

    value: Number | None = None
    interval: list[Number | None] | None = None
    rounds: int | None = None
    runs: int | None = None
    confidence: Number | None = None


class Generation(Open):
    """A decoder LLM's generation, measured as LLM users do: batch 1, greedy, with the KV cache (optcli.llm.run)."""

    baseline: str | None = None
    final: str | None = None
    prompt_tokens: int | None = None
    new_tokens: int | None = None
    prompts: int | None = None
    context: int | None = None  # perplexity: sliding windows of this many tokens
    stride: int | None = None
    decode_speedup: Speedup | None = None  # decode tokens/s of final over baseline
    ttft_speedup: Speedup | None = None  # time to first token, baseline over final
    verdict: str | None = None


class Summary(Open):
    """The verdict sentence, the baseline step, and the caveats (empty strings when none)."""

    verdict: str | None = None
    baseline: str | None = None
    slower: str | None = None
    busy: str | None = None


class Paths:
    """Where a run's files are (the API's report.paths): the output folder is not in report.json itself."""

    def __init__(self, out: Path, model: Path):
        self.out, self.model = out, model
        self.report_json, self.report_md, self.report_html = (out / f"report.{x}" for x in ("json", "md", "html"))

    def __repr__(self) -> str:
        return f"Paths(out={self.out!r}, model={self.model!r})"


class Report(Open):
    """report.json. `passed` is False when a gate failed (exit code 1)."""

    schema_version: int | None = None
    optcli_version: str | None = None
    recipe: dict[str, Any] | None = None  # the recipe as resolved (defaults filled in)
    environment: Environment | None = None
    input: Artifact | None = None
    output: Artifact | None = None
    evaluation: str | None = None  # what accuracy and fidelity were measured on, in words
    steps: list[Step] = []
    speed: Speed | None = None
    generation: Generation | None = None  # decoder LLMs only
    gates: list[Gate] = []
    passed: bool | None = None
    warnings: list[str] = []
    seconds: Number | None = None
    reused_steps: dict[str, str] = {}  # step name -> "resume" | "step cache"
    summary: Summary | None = None

    _out: Path | None = PrivateAttr(default=None)

    # ------------------------------------------------------------------ the Python API's view of it

    @property
    def exit_code(self) -> int:
        return 0 if self.passed else 1

    @property
    def data(self) -> dict:
        """report.json as a JSON-safe dict (what `optcli run --json` prints)."""
        return clean(self.to_dict())

    @property
    def paths(self) -> Paths:
        out = self._out if self._out is not None else Path(".")
        model = Path(self.output.path) if self.output is not None and self.output.path else out
        return Paths(out, model)

    @classmethod
    def from_dict(cls, data: dict, out: Path | None = None) -> Report:
        report = cls.model_validate(data)
        report._out = Path(out) if out is not None else None
        return report


def clean(obj: Any) -> Any:
    """A JSON-safe copy of obj: NaN/inf -> None, tuples -> lists, numpy values -> Python."""
    if isinstance(obj, BaseModel):
        return clean(obj.model_dump(mode="python", exclude_unset=True))
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, dict):
        return {k: clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [clean(v) for v in obj]
    if hasattr(obj, "tolist") and callable(obj.tolist):  # numpy scalars and arrays
        return clean(obj.tolist())
    return obj  # json.dumps(default=str) handles the rest (Path, datetime, ...)


def report_of(report: Report | dict) -> Report:
    """A Report from either form (renderers take both: a run's Report, or a dict read from a file or a test)."""
    return report if isinstance(report, Report) else Report.model_validate(report or {})


def report_json_schema(details: Mapping[str, type[StepDetails]] | None = None) -> dict:
    """report.json's JSON Schema (draft 2020-12): the envelope, steps, gates; with `details` ({pass type: its
    details model}, from the pass registry), each step's details by its type as well."""
    from pydantic.json_schema import models_json_schema

    details = dict(details or {})
    models: list[type[BaseModel]] = [Report, *dict.fromkeys(details.values())]
    refs, schema = models_json_schema([(m, "validation") for m in models], ref_template="#/$defs/{model}")
    defs = schema.get("$defs", {})
    top = defs.pop(refs[(Report, "validation")]["$ref"].rsplit("/", 1)[-1])
    step = defs["Step"]
    step["allOf"] = [
        {
            "if": {"properties": {"type": {"const": kind}}, "required": ["type"]},
            "then": {"properties": {"details": refs[(model, "validation")]}},
        }
        for kind, model in details.items()
    ]
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        **top,
        "title": "optcli report.json",
        "description": f"schema_version {SCHEMA_VERSION}. {top.get('description', '')} A key not declared here may "
        "appear (a newer optcli, a pass's open-ended details): readers ignore it.",
        "$defs": defs,
    }
