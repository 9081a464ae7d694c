"""The quantize pass's typed config: the YAML keys, their defaults and checks (the family's lowest layer)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, PrivateAttr, model_validator

from optcli.config import StrictModel
from optcli.passes.base import PassConfig


class Calibration(StrictModel):
    method: Literal["minmax", "entropy", "percentile"] = "minmax"
    samples: int = Field(default=128, ge=1, le=1_000_000, description="calibration samples read from data.calibration")
    percentile: float = Field(default=99.999, gt=0, le=100, description="for method: percentile")


class Target(StrictModel):
    """What the user can afford to lose; measured on data.eval against the original model."""

    metric: str = Field(
        default="cosine",
        description="cosine | top1_agreement | value_error (fidelity vs the original, no labels needed: the worst "
        "output's cosine, its argmax agreement, or a value output's max error over its range) | accuracy | top5 | mse "
        "| perplexity (a decoder's, on data.eval.text; max_increase is the allowed relative rise) "
        "| module:callable(outputs, labels)",
    )
    max_drop: float | None = Field(
        default=None, ge=0, description="largest allowed drop vs the original (absolute; a rise for mse)"
    )
    min_value: float | None = Field(default=None, description="or: the lowest acceptable value of the metric")
    max_increase: float | None = Field(
        default=None,
        ge=0,
        description="or, for perplexity and mse: the largest allowed rise as a fraction of the original's "
        "(0.02 = 2 %, the unit of gates.max_perplexity_increase)",
    )

    @model_validator(mode="after")
    def _one_bound(self) -> Target:
        if sum(b is not None for b in (self.max_drop, self.min_value, self.max_increase)) != 1:
            raise ValueError(
                "give exactly one of max_drop (e.g. 0.01), min_value (e.g. 0.995) or, for perplexity, "
                "max_increase (e.g. 0.02)"
            )
        known = ("cosine", "top1_agreement", "value_error", "accuracy", "top5", "mse", "perplexity")
        if self.metric not in known and ":" not in self.metric:
            raise ValueError(f"metric {self.metric!r} is not {', '.join(known)} or module:callable")
        if self.metric in ("mse", "value_error", "perplexity") and self.min_value is not None:
            raise ValueError(
                f"{self.metric} is lower-is-better: bound it with max_increase (relative) or max_drop (absolute rise)"
            )
        if self.max_increase is not None and self.metric not in ("mse", "perplexity"):
            raise ValueError(
                f"max_increase is a relative rise, for perplexity or mse; bound {self.metric} with max_drop or min_value"
            )
        if self.metric == "top1_agreement" and self.min_value is not None and not 0 <= self.min_value <= 1:
            raise ValueError(f"an agreement lies in [0, 1]; min_value {self.min_value} can never be met")
        if self.metric == "cosine" and self.min_value is not None and not -1 <= self.min_value <= 1:
            raise ValueError(f"a cosine lies in [-1, 1]; min_value {self.min_value} can never be met")
        return self


class Search(StrictModel):
    """The configurations tried when a target is given (each list is one axis of the grid)."""

    modes: list[Literal["dynamic", "static"]] = Field(
        default=["dynamic", "static"], min_length=1, description="static needs data.calibration"
    )
    per_channel: list[bool] = Field(default=[True, False], min_length=1)
    smoothquant: list[Annotated[float, Field(gt=0, le=1)] | None] = Field(
        default=[None, 0.5, 0.8], min_length=1, description="SmoothQuant alphas to try (null: no smoothing)"
    )
    calibration: list[Literal["minmax", "entropy", "percentile"]] = Field(
        default=["minmax"], min_length=1, description="calibration methods for static candidates"
    )
    fallback: bool = Field(
        default=True, description="fall back the most sensitive nodes to fp32 when a faster candidate misses the target"
    )
    max_fallback_fraction: float = Field(
        default=0.5, gt=0, le=1, description="most nodes (fraction of the quantizable ones) left in fp32"
    )
    sensitivity_samples: int = Field(
        default=64, ge=1, le=1_000_000, description="data.eval samples used to rank node sensitivity"
    )
    eval_samples: int | None = Field(
        default=None, ge=1, le=10_000_000, description="data.eval samples used to score candidates (default: all)"
    )
    latency_runs: int = Field(
        default=10, ge=1, le=10_000, description="timed runs per candidate (p50; batch and threads from report.latency)"
    )
    max_trials: int = Field(
        default=24, ge=1, le=10_000, description="int8 models written and measured, fallback included"
    )
    time_budget_s: float = Field(
        default=1800, gt=0, description="the search stops starting trials after this many seconds"
    )


# The search keys a weight-only search reads (the others steer the int8 candidates).
WEIGHT_SEARCH_KEYS = ("sensitivity_samples", "eval_samples", "time_budget_s")


class Config(PassConfig):
    type: Literal["quantize"] = "quantize"
    mode: Literal["dynamic", "static"] = Field(
        default="dynamic",
        description="dynamic: weights int8, activations at run time; static: QDQ with calibrated activations",
    )
    per_channel: bool = False
    # null: chosen for this CPU by passes/quantize/isa.py, recorded with its reason in the step's details.int8.
    reduce_range: bool | None = Field(
        default=None,
        description="7-bit weights; unset: chosen for this CPU, true on x86 without VNNI (ONNX Runtime's U8S8 kernels "
        "saturate there)",
    )
    weight_type: Literal["int8", "uint8"] | None = Field(default=None, description="unset: int8 (U8S8)")
    activation_type: Literal["int8", "uint8"] | None = Field(
        default=None, description="static mode only; unset: uint8 (U8S8, what the CPU session fuses into QLinearConv)"
    )
    symmetric_activation: bool = False
    calibration: Calibration = Calibration()
    smoothquant: float | None = Field(
        default=None,
        gt=0,
        le=1,
        description="SmoothQuant alpha: move activation outliers into the next MatMul's weights before int8 (null: off)",
    )
    exclude: list[str] = Field(default_factory=list, description="node names or op types left in float")
    op_types: list[str] | None = Field(
        default=None, description="only quantize these op types (default: all ONNX Runtime supports)"
    )
    preprocess: bool = Field(
        default=True, description="ONNX Runtime's quantization pre-processing (shape inference, graph optimization)"
    )
    extra_options: dict[str, Any] = Field(
        default_factory=dict, description="passed through to onnxruntime.quantization"
    )
    target: Target | None = Field(
        default=None,
        description="search for the fastest int8 model meeting this (mode/per_channel/calibration/smoothquant are then "
        "searched); with weights: the fewest MatMuls at backup that meet it",
    )
    search: Search = Search()
    allow_slower: bool = Field(
        default=False,
        description="keep an int8 model slower than fp32: with a target, instead of failing its gate; without gates, "
        "the run skips the default speed gate max_slowdown (default)",
    )
    # Weight-only (passes/quantize/weight_only.py): MatMul / Gather weights in blocks, activations stay float.
    weights: Literal["int4", "int8"] | None = Field(
        default=None,
        description="weight-only blockwise quantization of MatMul/Gather weights (MatMulNBits); null: the int8 modes above",
    )
    block_size: Literal[16, 32, 64, 128, 256] = Field(
        default=128, description="weights: weights per scale (a block along the reduction axis)"
    )
    symmetric: bool = Field(default=False, description="weights: no zero points (symmetric blocks)")
    accuracy_level: Literal[0, 1, 2, 3, 4] | None = Field(
        default=None,
        description="weights: MatMulNBits compute type (4: int8 activations, the fastest on CPU; null: ORT's default)",
    )
    algorithm: Literal["rtn", "hqq", "gptq", "awq", "k_quant"] = Field(
        default="rtn",
        description="weights: rtn (round to nearest) | hqq (half-quadratic; MatMul only, int4 only) | gptq (ONNX "
        "Runtime's GPTQ, calibrated on the text of a decoder; MatMul only, int4 only) | awq (activation-aware "
        "scales and clipping calibrated on the text of a decoder, then rtn; MatMul only, int4 only) | k_quant "
        "(llama.cpp's k-quant scales, as the model builder offers; MatMul only)",
    )
    act_order: bool = Field(
        default=True,
        description="weights, gptq: quantize each layer's columns in order of falling activation energy (GPTQ's "
        "act-order, GPTQModel's desc_act): fewer errors pushed onto the columns that matter most",
    )
    lm_head: Literal["int4", "int8", "fp32"] | None = Field(
        default=None, description="weights, decoders: precision of the MatMul writing the logits (null: as weights)"
    )
    embeddings: Literal["int4", "fp32"] | None = Field(
        default=None,
        description="weights: precision of embedding tables (Gather -> GatherBlockQuantized, int4 only in ONNX "
        "Runtime; null: as op_types says)",
    )
    ratio: float = Field(
        default=1.0,
        gt=0,
        le=1,
        description="weights: share of MatMul weights at `weights`; the most sensitive rest at `backup` (NNCF's ratio; "
        "ranked on data.eval)",
    )
    backup: Literal["int8", "fp32"] = Field(
        default="int8", description="weights: precision of the MatMuls ratio or a target keeps out of `weights`"
    )

    # The keys the recipe itself wrote, before a decoder's defaults filled the rest (decoder_defaults): a tied
    # decoder's embedding table is shared with its quantized lm_head unless the recipe asked for a float one.
    _written: frozenset[str] | None = PrivateAttr(default=None)

    def written_by_recipe(self, key: str) -> bool:
        return key in (self._written if self._written is not None else self.model_fields_set)

    @model_validator(mode="after")
    def _weight_only_fits(self) -> Config:
        # Keys written with their default (a resolved recipe from report.json, read back) are not a clash.
        written = {
            k
            for k in self.model_fields_set
            if getattr(self, k) != type(self).model_fields[k].get_default(call_default_factory=True)
        }
        weight_keys = {
            "block_size",
            "symmetric",
            "accuracy_level",
            "algorithm",
            "act_order",
            "ratio",
            "backup",
            "lm_head",
            "embeddings",
        } & written
        if self.weights is None:
            if weight_keys:
                raise ValueError(
                    f"{', '.join(sorted(weight_keys))} apply to weight-only quantization: add weights: int4 (or int8)"
                )
            return self
        clash = {
            "mode",
            "per_channel",
            "reduce_range",
            "weight_type",
            "activation_type",
            "symmetric_activation",
            "calibration",
            "smoothquant",
            "preprocess",
            "extra_options",
            "allow_slower",
        } & written
        if clash:
            raise ValueError(
                f"weights: {self.weights} is weight-only (activations stay float, no calibration); "
                f"{', '.join(sorted(clash))} belong to the int8 activation modes: drop them or drop weights"
            )
        searched = {k for k in self.search.model_fields_set if k not in WEIGHT_SEARCH_KEYS}
        if searched:
            raise ValueError(
                f"search.{sorted(searched)[0]} belongs to the int8 search; with weights the search ranks MatMuls and "
                f"takes only {', '.join(f'search.{k}' for k in WEIGHT_SEARCH_KEYS)}"
            )
        if self.target is not None and "ratio" in written:
            raise ValueError("give ratio or target, not both: a target searches for the ratio")
        if (self.ratio < 1 or self.target is not None) and self.weights == "int8" and self.backup == "int8":
            raise ValueError("weights: int8 with backup: int8 mixes nothing; use backup: fp32 (or weights: int4)")
        ops = set(self.op_types or [])
        if ops - {"MatMul", "Gather"}:
            raise ValueError(
                f"weights: op_types can be MatMul and Gather only (got {', '.join(sorted(ops - {'MatMul', 'Gather'}))})"
            )
        if self.algorithm in ("gptq", "awq", "k_quant") and "Gather" in ops:
            raise ValueError(
                f"algorithm: {self.algorithm} quantizes MatMul only; drop Gather from op_types (the "
                "embeddings key sets the embedding table's precision)"
            )
        if "act_order" in written and self.algorithm != "gptq":
            raise ValueError("act_order is a GPTQ setting: add algorithm: gptq")
        if self.algorithm == "gptq" and self.weights != "int4":
            raise ValueError("algorithm: gptq writes int4 only in ONNX Runtime; use weights: int4 or algorithm: rtn")
        if self.algorithm == "awq" and self.weights != "int4":
            raise ValueError("algorithm: awq searches int4 scales only; use weights: int4 or algorithm: rtn")
        if self.algorithm == "hqq":
            if self.weights != "int4":
                raise ValueError("algorithm: hqq writes int4 only; use weights: int4 or algorithm: rtn")
            if "Gather" in ops:
                raise ValueError(
                    "algorithm: hqq quantizes MatMul only in ONNX Runtime; drop Gather from op_types or use rtn"
                )
        return self
