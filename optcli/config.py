"""Typed building blocks shared by the recipe and the pass configs.

Every config is strict: unknown keys, NaN/inf and wrong types are errors when
the recipe loads, before any work starts.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationInfo, model_validator

DType = Literal["float32", "float16", "float64", "bfloat16", "int64", "int32", "int8", "uint8", "bool"]

# Refuse shapes whose tensors could not be allocated on a normal machine before
# trying: one input of more than 2**31 elements is almost surely a typo.
MAX_INPUT_ELEMENTS = 2**31


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True, validate_default=True)


def _resolve_against_recipe(value: Path, info: ValidationInfo) -> Path:
    base = (info.context or {}).get("base_dir")
    value = value.expanduser()
    if base is not None and not value.is_absolute():
        value = Path(os.path.normpath(Path(base) / value))
    return value


# Relative paths in a recipe are relative to the recipe file, so a recipe runs
# the same from any working directory.
RecipePath = Annotated[Path, AfterValidator(_resolve_against_recipe)]

ImportRef = Annotated[str, Field(pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$", description="module:callable")]


class TensorSpec(StrictModel):
    name: str = Field(min_length=1)
    shape: list[Annotated[int, Field(ge=1, le=2**31)]] = Field(min_length=0, max_length=8)
    dtype: DType = "float32"

    @model_validator(mode="after")
    def _not_huge(self) -> TensorSpec:
        if math.prod(self.shape) > MAX_INPUT_ELEMENTS:
            raise ValueError(
                f"shape {self.shape} has {math.prod(self.shape):,} elements; the limit is {MAX_INPUT_ELEMENTS:,}"
            )
        return self


class DataSource(StrictModel):
    """A file of arrays keyed by input name (.npz/.pt/.safetensors), or a factory returning batches."""

    path: RecipePath | None = None
    factory: ImportRef | None = None
    factory_kwargs: dict = Field(default_factory=dict)
    samples: int | None = Field(default=None, ge=1, le=10_000_000)
    batch_size: int = Field(default=32, ge=1, le=65536)
    labels: str | None = Field(default=None, description="key of the labels array, if any")
    metric: str = Field(
        default="accuracy",
        description="accuracy | top5 | mse | perplexity (causal LM text) | module:callable(outputs, labels) -> float",
    )
    shuffle: bool = False
    seed: int = Field(default=0, ge=0, le=2**32 - 1)
    take: tuple[Annotated[float, Field(ge=0, le=1)], Annotated[float, Field(ge=0, le=1)]] | None = Field(
        default=None,
        description="[start, stop]: only this fraction of the file's samples, in file order ([0, 0.5] the first half); "
        "calibration: [0, 0.5] and eval: [0.5, 1] on one file keep the two apart",
    )
    # Text, tokenized by the model folder's own tokenizer (optcli.textdata).
    text: RecipePath | None = Field(
        default=None, description="text file: .txt (one example per line) or .jsonl (text field + optional label field)"
    )
    max_length: int = Field(default=128, ge=2, le=65536, description="text: tokens per example (padded / truncated)")
    text_field: str = Field(default="text", min_length=1, description="text: the .jsonl field holding the text")
    tokenizer: RecipePath | None = Field(
        default=None, description="text: folder of the tokenizer; default: model.path (a Hugging Face folder)"
    )

    @model_validator(mode="after")
    def _one_source(self) -> DataSource:
        if sum(x is not None for x in (self.path, self.factory, self.text)) != 1:
            raise ValueError(
                "give exactly one of 'path' (a .npz/.pt/.safetensors file), 'factory' (module:callable) or 'text' (.txt/.jsonl)"
            )
        if self.take is not None and self.path is None:
            raise ValueError("take slices an array file: use it with 'path'")
        if self.take is not None and not self.take[0] < self.take[1]:
            raise ValueError(f"take: [start, stop] needs start < stop (got {list(self.take)})")
        if self.metric not in METRICS and ":" not in self.metric:
            raise ValueError(f"metric '{self.metric}' is not {', '.join(METRICS)} or module:callable")
        return self


METRICS = ("accuracy", "top5", "mse", "perplexity")
HF_TASKS = ("feature-extraction", "text-classification", "token-classification", "causal-lm")


ONNX_SUFFIXES = (".onnx",)
TORCH_SUFFIXES = (".pt", ".pth", ".pt2", ".safetensors", ".bin")


class ModelSpec(StrictModel):
    path: RecipePath
    factory: ImportRef | None = Field(
        default=None, description="module:callable that builds the nn.Module; needed for a state_dict"
    )
    factory_kwargs: dict = Field(default_factory=dict)
    inputs: list[TensorSpec] | None = Field(
        default=None, description="input names/shapes/dtypes where the file does not fix them"
    )
    output_names: list[str] | None = None
    trust_pickle: bool = Field(
        default=False, description="allow torch.load to unpickle arbitrary objects (runs code from the file)"
    )
    task: Literal[HF_TASKS] | None = Field(  # type: ignore[valid-type]
        default=None, description="Hugging Face folder: what the model does; default: read from config.json"
    )
    trust_remote_code: bool = Field(
        default=False, description="Hugging Face folder: run model code shipped inside the folder (auto_map)"
    )

    @property
    def format(self) -> str:
        return "onnx" if self.path.suffix.lower() in ONNX_SUFFIXES and not self.path.is_dir() else "torch"
