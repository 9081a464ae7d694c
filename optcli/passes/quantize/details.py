"""What a quantize or prepare step writes under "details" in report.json (registered as PassSpec.details).

pydantic only: the runner validates each step's details with these models, `optcli schema --report` publishes
them, and the report's quantize views (optcli/report/passviews.py) read the keys declared here. Open models
(extra="allow"): the search records more than any view reads.
"""

from __future__ import annotations

from typing import Any

from optcli.report.model import Number, Open, StepDetails


class GraphChanges(StepDetails):
    """A graph rewrite's record (prepare, and what a quantize kept in float): one sentence per change."""

    changes: list[str] | None = None
    not_applied: list[str] | None = None
    preprocess: dict[str, Any] | None = None  # {rung: the ORT pre-processing that held, tried: the ones before}
    checked_on: str | None = None
    input_unloadable: str | None = None
    per_tensor_reason: str | None = None
    opset: dict[str, Any] | int | None = None  # {from, to}


class Int8Settings(Open):
    """The int8 types and reduce_range the step ran with, who chose each (recipe or this CPU) and why."""

    activation_type: str | None = None
    weight_type: str | None = None
    reduce_range: bool | None = None
    chosen_by: dict[str, str] | None = None
    reason: str | None = None
    cpu: Any = None


class Candidate(Open):
    """One model the search built and measured."""

    name: str | None = None
    label: str | None = None
    latency_ms: Number | None = None
    size_bytes: int | None = None
    metric: Number | None = None
    chosen: bool | None = None
    config: dict[str, Any] | None = None


class Int8Profile(Open):
    """ONNX Runtime's profile of the chosen int8 model against fp32, per compute-op type."""

    int8_total_ms: Number | None = None
    fp32_total_ms: Number | None = None
    fused: dict[str, Any] | None = None
    op_types: list[dict[str, Any]] | None = None


class Search(Open):
    """The accuracy-aware search (int8 candidates, or weight-only mixes): what it tried and what it kept."""

    metric: str | None = None
    target: Number | None = None
    chosen: str | None = None
    candidates: list[Candidate] | None = None
    sensitivity: dict[str, Number | None] | None = None
    fallback_nodes: list[dict[str, Any]] | None = None
    quantized_as: str | None = None
    kept_in: str | None = None
    notes: list[str] | None = None
    profile: Int8Profile | None = None
    # Contenders too close in p50 to rank, timed side by side: name, latency_ms, time_ratio (over fp32), interval.
    race: list[dict[str, Any]] | None = None


class AwqGroup(Open):
    """One group of MatMuls sharing an input: the scale AWQ chose and the output error it left on the sample."""

    matmuls: list[str] | None = None
    fold: str | None = None  # where 1/s went: "gamma of <norm weight>" | "columns of <up_proj weight>"
    alpha: Number | None = None  # null: plain round-to-nearest scored best, the weights were left unscaled
    error_rtn: Number | None = None  # mean squared output error with round-to-nearest
    error_awq: Number | None = None  # .. with the chosen scale
    clip: dict[str, dict[str, Any]] | None = None  # MatMul -> mean_ratio, blocks_clipped, block errors
    seconds: Number | None = None


class Awq(Open):
    """algorithm: awq (passes/quantize/awq.py): per group the chosen scale and clip, and the groups left alone."""

    windows: int | None = None
    rows: int | None = None  # rows of each MatMul input sampled for the losses
    groups: list[AwqGroup] | None = None
    skipped: dict[str, str] | None = None  # MatMuls -> why their input could not be scaled exactly
    seconds: Number | None = None


class WeightOnly(Open):
    """Weight-only int4/int8 (MatMulNBits): the ops written and, for a mix, which MatMuls stayed at the backup."""

    quantized_ops: dict[str, int] | None = None
    mixed: dict[str, Any] | None = None
    skipped: str | None = None
    awq: Awq | None = None


class QuantizeDetails(GraphChanges):
    int8: Int8Settings | None = None
    calibration_samples: int | None = None
    calibration_samples_requested: int | None = None
    quantized_ops: dict[str, int] | None = None
    excluded_nodes: list[str] | None = None
    kept_fp32: dict[str, str] | None = None
    per_channel_off: str | None = None
    skipped: str | None = None
    search: Search | None = None
    weight_only: WeightOnly | None = None


class PrepareDetails(GraphChanges):
    pass
