"""The recipe's report.llm section: how an LLM recipe measures each step (typed, validated when the recipe loads)."""

from __future__ import annotations

from pydantic import Field, model_validator

from optcli.config import StrictModel


class LlmReport(StrictModel):
    """Perplexity window and generation settings; every step is measured with the same ones."""

    context: int = Field(default=256, ge=2, le=1_000_000, description="perplexity: tokens per sliding window")
    stride: int = Field(default=128, ge=1, le=1_000_000, description="perplexity: tokens between window starts")
    prompt_tokens: int = Field(default=64, ge=1, le=1_000_000, description="generation: prompt length (N tokens)")
    new_tokens: int = Field(default=32, ge=2, le=100_000, description="generation: greedy tokens per prompt")
    prompts: int = Field(default=4, ge=1, le=1000, description="generation: prompts taken from the eval text (K)")
    rounds: int = Field(default=6, ge=2, le=100, description="decode speed-up: interleaved A/B rounds")
    threads: int | None = Field(default=None, ge=1, le=1024, description="ONNX Runtime threads (default: its own)")
    check_logits: bool = Field(
        default=True, description="compare the fp32 export's logits (prefill + 8 decode steps) with transformers'"
    )

    @model_validator(mode="after")
    def _stride_within_context(self) -> LlmReport:
        if self.stride > self.context:
            raise ValueError(
                f"stride ({self.stride}) must not exceed context ({self.context}): tokens would go unscored"
            )
        return self
