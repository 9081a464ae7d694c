"""Typed building blocks shared by the recipe and the pass configs.

Every config is strict: unknown keys, NaN/inf and wrong types are errors when
the recipe loads, before any work starts.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    ValidationInfo,
    model_validator,
)

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
    shape: list[Annotated[int, Field(ge=1, le=2**31)]] | None = Field(
        default=None, max_length=8, description="[] for a scalar; default: the file's shape"
    )
    dtype: DType = "float32"
    batch_axis: int | None = Field(
        default=0,
        ge=0,
        le=7,
        description="the axis samples are stacked on (1 for a layers x batch x hidden state); null: no batch axis, "
        "the same value with every batch. Default: read from the file",
    )
    value: StrictBool | StrictInt | StrictFloat | None = Field(
        default=None, description="an input without batch axis (a sample rate): the value fed with every batch"
    )

    @model_validator(mode="after")
    def _not_huge(self) -> TensorSpec:
        shape = self.shape or []
        if math.prod(shape) > MAX_INPUT_ELEMENTS:
            raise ValueError(f"shape {shape} has {math.prod(shape):,} elements; the limit is {MAX_INPUT_ELEMENTS:,}")
        if self.value is not None and shape:
            raise ValueError(f"value is for an input without batch axis (shape []), not one of shape {shape}")
        if self.shape and self.batch_axis is not None and self.batch_axis >= len(self.shape):
            raise ValueError(f"batch_axis {self.batch_axis} is not an axis of shape {self.shape}")
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


# The model files every verb takes (init, validate, run, inspect, bench): one list, so no verb accepts a file
# another refuses. TorchScript archives are also saved as .jit / .torchscript (Ultralytics' export name).
ONNX_SUFFIXES = (".onnx",)
TORCH_SUFFIXES = (".pt", ".pth", ".jit", ".torchscript", ".pt2", ".safetensors", ".bin")


def unknown_suffix(path: Path) -> str | None:
    """Why a model file's extension is refused, or None (a folder is a Hugging Face model, checked when it loads)."""
    if path.is_dir() or path.suffix.lower() in ONNX_SUFFIXES + TORCH_SUFFIXES:
        return None
    return (
        f"{path.name} has an unknown extension; use .onnx, .pt/.pth/.jit (state_dict or TorchScript), "
        ".pt2 (torch.export) or .safetensors"
    )


class ModelSpec(StrictModel):
    path: RecipePath
    factory: ImportRef | None = Field(
        default=None, description="module:callable that builds the nn.Module; needed for a state_dict"
    )
    factory_kwargs: dict = Field(default_factory=dict)
    state_dict_key: str | None = Field(
        default=None,
        min_length=1,
        description="checkpoint key holding the weights ({model_state: {...}, epoch: 3}); default: state_dict, "
        "model_state_dict, model_state or model, else the one value that is a dict of tensors",
    )
    strict: bool = Field(
        default=True,
        description="false: load the state_dict with strict=False (keys the module lacks, e.g. training-only heads, "
        "are ignored and listed in the report's warnings)",
    )
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


LOWER_IS_BETTER_METRICS = ("mse", "perplexity")


def higher_is_better(metric: str) -> bool:
    """The direction of a data.eval metric (a user's module:callable scores like an accuracy)."""
    return metric not in LOWER_IS_BETTER_METRICS
