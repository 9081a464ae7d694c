"""The `decoder` pass: a causal-LM Hugging Face folder -> an onnxruntime-genai decoder folder (KV cache, external
data, genai_config.json, tokenizer), fp32 or weight-only int4/int8 through the builder's MatMulNBits quantizer."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from optcli.llm import FORMAT
from optcli.passes.base import Context, PassConfig, PassSpec

ARTIFACT = "decoder"  # the folder a step writes: steps/<n>-decoder/decoder/, copied to out/decoder/ when last


class Config(PassConfig):
    type: Literal["decoder"] = "decoder"
    precision: Literal["fp32", "int4", "int8"] = Field(
        default="int4", description="weights: fp32, or weight-only int4/int8 (MatMulNBits, round-to-nearest)"
    )
    block_size: Literal[16, 32, 64, 128, 256] = Field(default=32, description="int4/int8: weights per scale")
    accuracy_level: Literal[0, 1, 2, 3, 4] | None = Field(
        default=None, description="int4/int8: MatMulNBits compute type (4: int8 activations, the CPU default)"
    )
    extra_options: dict[str, str | int | float | bool] = Field(
        default_factory=dict, description="more of the builder's --extra_options (KEY: value)"
    )


def apply(model, config: Config, ctx: Context):
    from optcli.llm.export import export_decoder

    out = ctx.step_dir / ARTIFACT
    ctx.log(f"{ctx.step_name}: exporting with onnxruntime-genai's model builder ({config.precision})")
    quantized = config.precision != "fp32"
    done = export_decoder(
        Path(model.path),
        out,
        config.precision,
        block_size=config.block_size if quantized else None,
        accuracy_level=config.accuracy_level if quantized else None,
        extra_options=config.extra_options,
    )
    ctx.details["export"] = done
    return model.with_(format=FORMAT, module=None, path=out, kind="onnxruntime-genai decoder")


def check(config: Config, recipe, fmt: str) -> None:
    if recipe.passes and recipe.passes[0] is not config:
        raise ValueError("the decoder pass exports the model folder itself: make it the first pass")


PASS = PassSpec(
    type="decoder",
    config=Config,
    consumes=frozenset({"torch"}),
    produces=FORMAT,
    apply=apply,
    check=check,
    summary="causal-LM folder -> onnxruntime-genai decoder with KV cache (fp32 / int4 / int8 weights)",
)
