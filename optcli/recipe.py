"""YAML recipe -> typed, validated Recipe. Every mistake is found here, before any work starts."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, Union, cast

import yaml
from pydantic import Field, ValidationError, create_model

from optcli.config import ONNX_SUFFIXES, TORCH_SUFFIXES, DataSource, ModelSpec, StrictModel, unknown_suffix
from optcli.errors import BadInput
from optcli.llm.config import LlmReport
from optcli.passes import all_passes, get_pass
from optcli.passes.base import PassConfig

if TYPE_CHECKING:
    from pydantic_core import ErrorDetails

    from optcli.passes.quantize.config import Config as QuantizeConfig


class DataSpec(StrictModel):
    calibration: DataSource | None = None
    eval: DataSource | None = None
    train: DataSource | None = None


class LatencySpec(StrictModel):
    batch_sizes: list[Annotated[int, Field(ge=1, le=4096)]] = Field(default=[1], min_length=1)
    warmup: int = Field(default=5, ge=0, le=10_000)
    runs: int = Field(default=30, ge=1, le=100_000)
    threads: int = Field(default=2, ge=1, le=1024)


class ReportSpec(StrictModel):
    latency: LatencySpec = LatencySpec()
    target: Literal["cpu", "cuda", "tensorrt", "openvino"] = Field(
        default="cpu",
        description="hardware the report measures on (ONNX Runtime execution providers) and the int8 preset quantize uses",
    )
    fidelity_samples: int = Field(
        default=64, ge=1, le=100_000, description="inputs compared with the original model when there is no eval data"
    )
    llm: LlmReport | None = Field(
        default=None, description="decoder LLMs (a decoder pass): perplexity window and generation settings"
    )


class Gates(StrictModel):
    max_accuracy_drop: float | None = Field(default=None, ge=0)
    min_fidelity_cosine: float | None = Field(
        default=None, ge=-1, le=1, description="lowest mean cosine to the original, worst output judged by cosine"
    )
    min_top1_agreement: float | None = Field(
        default=None, ge=0, le=1, description="class scores: lowest fraction of samples whose argmax is unchanged"
    )
    min_position_agreement: float | None = Field(
        default=None,
        ge=0,
        le=1,
        description="sequences [N, T, C]: lowest fraction of positions whose argmax is unchanged",
    )
    max_value_error: float | None = Field(
        default=None,
        ge=0,
        description="values ([N], [N, 1]: a probability, a regression): largest error over the original's range",
    )
    max_size_bytes: int | None = Field(default=None, ge=1)
    min_speedup: float | None = Field(default=None, gt=0)
    max_perplexity_increase: float | None = Field(
        default=None, ge=0, description="causal LM: perplexity may rise by at most this fraction of fp32's (0.02 = 2%)"
    )
    min_decode_speedup: float | None = Field(
        default=None, gt=0, description="decoder LLMs: decode tokens/s over the fp32 decoder, timed side by side"
    )
    inconclusive: Literal["pass", "fail"] = Field(
        default="pass",
        description="a speed gate whose confidence interval straddles its limit (a noisy machine): pass or fail",
    )


class SweepSpec(StrictModel):
    """`optcli sweep`: the grid of recipe keys to vary (every combination is a run); ignored by `optcli run`."""

    grid: dict[str, Annotated[list[Any], Field(min_length=1)]] = Field(
        default_factory=dict,
        description="recipe key (as for --set) -> values; passes.N: [true, false] keeps or drops pass N",
    )
    minimize: Literal["size", "compressed", "latency"] = Field(
        default="size", description="what the Pareto front trades against the metric; the best variant has least of it"
    )


class Recipe(StrictModel):
    """A validated recipe as the type checker sees it: every section but the passes is static.

    `passes` is narrowed at run time by recipe_model() to the union of the registered passes' configs (each
    `type:` picks its own class); here it is the pass contract every config shares."""

    model: ModelSpec
    data: DataSpec = DataSpec()
    passes: list[PassConfig] = Field(default_factory=list)
    report: ReportSpec = ReportSpec()
    gates: Gates = Gates()
    sweep: SweepSpec | None = None
    seed: Annotated[int, Field(ge=0, le=2**32 - 1)] = 0


@functools.cache
def recipe_model() -> type[Recipe]:
    """The Recipe class, built from the registered passes so each `type:` picks its own config class."""
    configs = tuple(p.config for p in all_passes())
    # a union built from the registry at run time, which no static checker can follow: code reads Recipe.passes
    PassUnion = Annotated[Union[configs], Field(discriminator="type")]  # type: ignore[valid-type]  # noqa: UP007 (runtime tuple)
    return create_model("Recipe", __base__=Recipe, passes=(list[PassUnion], Field(default_factory=list)))


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = (), check_files: bool = True) -> Recipe:
    path = Path(path)
    refuse_model_file(path)
    if not path.is_file():
        raise BadInput(f"recipe {path} not found: give the path of a YAML recipe (optcli init MODEL writes one)")
    text = path.read_text(encoding="utf-8", errors="replace")
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        _check_expansion(root, path)
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise BadInput(
            f"{where}: not valid YAML ({getattr(e, 'problem', None) or e}); only plain YAML is read, no python tags"
        ) from None
    except RecursionError:
        raise BadInput(f"{path}: YAML nested too deeply to be a recipe") from None
    if not isinstance(raw, dict):
        raise BadInput(f"{path}: a recipe is a mapping with at least 'model:' (optcli init MODEL writes one)")
    for item in overrides:
        _apply_override(raw, item)
    if overrides and isinstance(raw.get("passes"), list):  # --set passes.N=null drops pass N (a sweep's on/off)
        raw["passes"] = [p for p in raw["passes"] if p is not None]
    recipe = _validate(raw, root, path, overrides)
    check_recipe(recipe, path, root, check_files=check_files, overrides=overrides)
    return with_implicit_exports(recipe)


# The first bytes of model files no YAML text starts with: a zip (torch.save, TorchScript, .pt2), a pickle's PROTO
# opcode (old torch.save), an ONNX ModelProto (field 1, ir_version, a varint: tag 0x08).
_MODEL_MAGIC = (b"PK\x03\x04", b"\x80", b"\x08")
_MODEL_SUFFIXES = (*ONNX_SUFFIXES, *TORCH_SUFFIXES)


def refuse_model_file(path: Path) -> None:
    """A model given where a recipe goes (`optcli run model.onnx`): say so before a YAML parser quotes its bytes."""
    if path.is_dir():
        is_model = (path / "config.json").is_file()  # a Hugging Face folder
    elif path.is_file():
        try:
            with open(path, "rb") as fh:
                head = fh.read(4)
        except OSError:
            return  # the read below reports it in its own words
        is_model = path.suffix.lower() in _MODEL_SUFFIXES or head.startswith(_MODEL_MAGIC)
    else:
        return
    if is_model:
        raise BadInput(f"{path} is a model, not a recipe: `optcli init {path} > recipe.yaml` writes one")


MAX_YAML_VALUES = 100_000


def _check_expansion(root, path: Path) -> None:
    """Refuse YAML whose aliases expand to a huge tree (a 'billion laughs'): validating it would never finish."""
    sizes: dict[int, int] = {}

    def size(node, open_: set) -> int:
        if id(node) in sizes:
            return sizes[id(node)]
        if id(node) in open_:
            raise BadInput(f"{path}:{node.start_mark.line + 1}: a YAML alias refers to itself; write the value out")
        open_.add(id(node))
        children = (
            node.value
            if isinstance(node, yaml.SequenceNode)
            else [n for kv in node.value for n in kv]
            if isinstance(node, yaml.MappingNode)
            else []
        )
        total = 1 + sum(size(c, open_) for c in children)
        open_.discard(id(node))
        if total > MAX_YAML_VALUES:
            raise BadInput(
                f"{path}:{node.start_mark.line + 1}: YAML aliases (*name) expand this to more than {MAX_YAML_VALUES:,} values; write the recipe out plainly"
            )
        sizes[id(node)] = total
        return total

    if root is not None:
        size(root, set())


def recipe_from_dict(raw: dict, base_dir: Path, check_files: bool = True) -> Recipe:
    """Validate an in-memory recipe (tests, `optcli init`)."""
    recipe = _validate(raw, None, base_dir / "recipe.yaml")
    check_recipe(recipe, base_dir / "recipe.yaml", None, check_files=check_files)
    return with_implicit_exports(recipe)


def _validate(raw: dict, root, path: Path, overrides=()) -> Recipe:
    try:
        return recipe_model().model_validate(raw, context={"base_dir": path.parent.resolve()})
    except ValidationError as e:
        err = _most_useful(e.errors(include_url=False), raw)
        loc = [p for p in err["loc"] if not _is_union_tag(p, raw, err["loc"])]
        message = _message(err)
        if err["type"] == "extra_forbidden":
            where = "each pass's keys" if loc[:1] == ["passes"] else "the passes; `optcli schema` every recipe key"
            message = (
                f"unknown key{_did_you_mean(str(loc[-1]), _keys_at(loc[:-1], raw))} (`optcli passes` lists {where})"
            )
        raise BadInput(f"{_origin(path, root, loc, overrides)}: {_dotted(loc) or 'recipe'}: {message}") from None


def _override_loc(item: str) -> list:
    key = item.split("=", 1)[0].strip()
    return [int(p) if p.isdigit() else p for p in key.split(".")]


def _origin(path: Path, root, loc, overrides=()) -> str:
    """Where the user wrote the value at loc: a --set flag that touched it, else the recipe's file and line."""
    for item in reversed(list(overrides)):  # the last --set of a key wins
        set_loc = _override_loc(item)
        n = min(len(set_loc), len(loc))
        if n and set_loc[:n] == list(loc[:n]):
            return f"--set {item}"
    return _where(path, root, loc)


def _keys_at(loc, raw: dict) -> list[str]:
    """The keys the recipe accepts at loc (a mapping), for a did-you-mean; [] when unknown."""
    from pydantic import BaseModel

    cls: Any = recipe_model()
    node: Any = raw
    for part in loc:
        if isinstance(part, int):
            node = node[part] if isinstance(node, list) and part < len(node) else None
            if cls == "passes":
                kind = node.get("type") if isinstance(node, dict) else None
                try:
                    cls = get_pass(str(kind)).config
                except KeyError:
                    return []
            continue
        node = node.get(part) if isinstance(node, dict) else None
        if part == "passes" and cls is recipe_model():
            cls = "passes"
            continue
        field = cls.model_fields.get(part) if isinstance(cls, type) and issubclass(cls, BaseModel) else None
        cls = _model_in(field.annotation) if field is not None else None
        if cls is None:
            return []
    return list(cls.model_fields) if isinstance(cls, type) and issubclass(cls, BaseModel) else []


def _model_in(annotation) -> Any:
    """The pydantic model inside an annotation (Model, Model | None, list[Model]), or None."""
    import typing

    from pydantic import BaseModel

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def _did_you_mean(key: str, known: list[str]) -> str:
    import difflib

    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    return f": did you mean `{close[0]}`?" if close else ""


def _most_useful(errors: list[ErrorDetails], raw: dict) -> ErrorDetails:
    # An unknown pass type yields one error per union member; the tag error says it best.
    for err in errors:
        if err["type"] == "union_tag_invalid":
            return err
    return errors[0]


def _message(err: ErrorDetails) -> str:
    if err["type"] == "extra_forbidden":
        return "unknown key (`optcli passes` lists every pass's keys)"
    if err["type"] == "union_tag_invalid":
        return f"unknown pass type {err['input'].get('type')!r} (known: {', '.join(p.type for p in all_passes())})"
    if err["type"] == "union_tag_not_found":
        return f"each pass needs a 'type' (one of: {', '.join(p.type for p in all_passes())})"
    msg = err["msg"].removeprefix("Value error, ")
    if "input" in err and not isinstance(err["input"], (dict, list)):
        msg += f" (got {err['input']!r})"
    return msg


def _is_union_tag(part, raw: dict, loc) -> bool:
    # pydantic inserts the discriminator value ('quantize') into the location of pass errors.
    return isinstance(part, str) and part in {p.type for p in all_passes()} and "passes" in loc[:1]


def _dotted(loc) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _where(path: Path, root, loc) -> str:
    """path:line of the deepest YAML node the location reaches (the line a user should edit)."""
    node, line = root, None
    for part in loc:
        if node is None:
            break
        line = node.start_mark.line + 1
        if isinstance(node, yaml.MappingNode) and isinstance(part, str):
            node = next((v for k, v in node.value if k.value == part), None)
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
        else:
            node = None
    if node is not None:
        line = node.start_mark.line + 1
    return f"{path}:{line}" if line else str(path)


def _apply_override(raw: dict, item: str) -> None:
    if "=" not in item:
        raise BadInput(f"--set {item!r}: write key.path=value, e.g. --set passes.0.sparsity=0.5")
    key, value = item.split("=", 1)
    parts = key.strip().split(".")
    node: Any = raw
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise BadInput(
                    f"--set {key}: {'.'.join(parts[:i]) or 'recipe'} has {len(node)} items, no index {part!r}"
                )
            if last:
                node[int(part)] = _override_value(key, value)
            else:
                node = node[int(part)]
        elif isinstance(node, dict):
            if last:
                node[part] = _override_value(key, value)
            else:
                node = node.setdefault(part, {})
        else:
            raise BadInput(f"--set {key}: {'.'.join(parts[:i])} is a value, not a mapping or list")


def _override_value(key: str, value: str):
    try:
        return yaml.safe_load(value)
    except yaml.YAMLError as e:
        raise BadInput(
            f"--set {key}: {value!r} is not a plain YAML value ({getattr(e, 'problem', None) or e})"
        ) from None


def pass_step_names(recipe: Recipe) -> list[str]:
    return [f"{i + 1}-{p.type}" for i, p in enumerate(recipe.passes)]


def check_recipe(recipe: Recipe, path: Path, root, check_files: bool = True, overrides=()) -> None:
    """Checks that need the whole recipe: files present, each pass able to follow the one before."""
    spec = recipe.model
    if check_files:
        if not spec.path.exists():
            raise BadInput(f"{_where(path, root, ['model', 'path'])}: model.path: {spec.path} not found")
        for name in ("calibration", "eval", "train"):
            source = getattr(recipe.data, name)
            if source is not None and source.path is not None and not source.path.is_file():
                raise BadInput(
                    f"{_where(path, root, ['data', name, 'path'])}: data.{name}.path: {source.path} not found"
                )
            if source is not None and source.text is not None and not source.text.is_file():
                raise BadInput(
                    f"{_where(path, root, ['data', name, 'text'])}: data.{name}.text: {source.text} not found"
                )
    _check_text_sources(recipe, path, root)
    suffix = spec.path.suffix.lower()
    refused = unknown_suffix(spec.path)  # a Hugging Face folder: what it holds is checked when it loads (optcli.hf)
    if refused:
        raise BadInput(f"model.path: {refused}")
    if suffix in (".safetensors", ".bin") and spec.factory is None and not spec.path.is_dir():
        raise BadInput(
            f"model.factory: {spec.path.name} holds only weights; set model.factory: module:callable that builds the nn.Module"
        )
    fmt = spec.format
    int8_by = "model.path" if check_files and suffix in ONNX_SUFFIXES and holds_int8(spec.path) else None
    for i, cfg in enumerate(recipe.passes):
        p = get_pass(cfg.type)
        where = _origin(path, root, ["passes", i], overrides)
        if int8_by is not None and not p.takes_int8:
            raise BadInput(f"{where}: passes[{i}] ({cfg.type}) {_INT8_REFUSAL.get(cfg.type, _INT8_OTHER)(int8_by)}")
        if p.makes_int8:
            int8_by = f"passes[{i}] ({cfg.type})"
        if (
            fmt == "torch" and "onnx" in p.consumes and "torch" not in p.consumes
        ):  # an ONNX-only pass (quantize also takes a decoder folder)
            fmt = "onnx"  # an export with defaults is inserted before it (with_implicit_exports)
        if fmt not in p.consumes:
            hint = (
                (
                    ": an ONNX graph has no autograd or module structure for torch passes to train or edit; give the torch checkpoint "
                    "(.pt + model.factory, or .pt2) as model.path, or put this pass before the export"
                )
                if fmt == "onnx"
                else ""
            )
            raise BadInput(
                f"{where}: passes[{i}] ({cfg.type}) needs a {'/'.join(sorted(p.consumes))} model but gets {fmt}{hint}"
            )
        if p.check is not None:
            try:
                p.check(cfg, recipe, fmt)
            except ValueError as e:
                raise BadInput(f"{where}: passes[{i}] ({cfg.type}): {e}") from None
        fmt = p.output_format(fmt)


def _check_text_sources(recipe: Recipe, path: Path, root) -> None:
    """Text data needs a tokenizer: the model folder's own, or one named by data.<name>.tokenizer."""
    for name in ("calibration", "eval", "train"):
        source = getattr(recipe.data, name)
        if source is None or source.text is None or source.tokenizer is not None:
            continue
        if not recipe.model.path.is_dir():
            raise BadInput(
                f"{_where(path, root, ['data', name, 'text'])}: data.{name}.text needs a tokenizer: make model.path the "
                f"Hugging Face folder, or set data.{name}.tokenizer: the folder holding tokenizer.json"
            )


_INT8_OTHER = lambda by: f"cannot take the int8 graph {by} holds; put it before the quantize step"  # noqa: E731
_INT8_REFUSAL = {
    "prune": lambda by: (
        f"would prune the int8 graph {by} holds (its weights are int8 codes with scales, not floats to zero): "
        "put prune before quantize"
    ),
    "quantize": lambda by: (
        f"would quantize the int8 graph {by} holds a second time: keep one quantize step, last"
        + ("" if by.startswith("passes") else ", and give the fp32 model as model.path")
    ),
    "finetune": lambda by: (
        f"cannot train the int8 graph {by} holds (no float weights or autograd): put finetune (and prune) before "
        "quantize"
    ),
}


def holds_int8(path: Path) -> bool:
    """An ONNX model that is already quantized (Q/DQ or integer ops); False where it cannot be read here.
    `optcli init` asks the same question, so it never writes a quantize step this check would refuse."""
    try:
        from optcli.onnxgraph import graph_view

        proto = graph_view(path).proto
    except Exception:  # a broken file is refused, in its own words, when the model is loaded
        return False
    from optcli.onnx_check import holds_int8 as graph_holds_int8

    return graph_holds_int8(proto)


def with_implicit_exports(recipe: Recipe) -> Recipe:
    """A torch model handed to an ONNX-only pass (quantize) is exported first, as a step of its own; an ONNX graph
    from the user is prepared (constants lifted, opset upgraded, ORT pre-processing) before its first quantize."""
    export_config, prepare_config = get_pass("export").config, get_pass("prepare").config
    fmt, passes = recipe.model.format, []
    prepared_by = None
    for cfg in recipe.passes:
        p = get_pass(cfg.type)
        if (
            fmt == "torch" and "onnx" in p.consumes and "torch" not in p.consumes
        ):  # an ONNX-only pass (quantize also takes a decoder folder)
            passes.append(export_config(type="export"))
            fmt = "onnx"
            prepared_by = "export"  # our own export: initializers, a recent opset; quantize pre-processes it itself
        if cfg.type == "quantize" and fmt != "genai":  # a decoder folder is quantized as the builder wrote it
            cfg = cast("QuantizeConfig", cfg)  # the discriminated union gave this type its own config class
            if prepared_by is None:
                # `preprocess: false` written on quantize turns off the ORT rung of the implicit step too.
                off = "preprocess" in cfg.model_fields_set and not cfg.preprocess
                passes.append(
                    prepare_config.model_validate({"type": "prepare", "preprocess": "none" if off else "auto"})
                )
                prepared_by = "prepare"
            if prepared_by == "prepare" and "preprocess" not in cfg.model_fields_set:
                cfg = cfg.model_copy(update={"preprocess": False})  # the prepare step ran ORT's pre-processing
        elif cfg.type in ("prepare", "export"):
            prepared_by = cfg.type
        passes.append(cfg)
        fmt = p.output_format(fmt)
    return recipe.model_copy(update={"passes": passes})
