"""Load and save models by format: ONNX, TorchScript, torch.export (.pt2), state_dict + factory.

Safe by default: torch.load runs with weights_only=True unless the user opts in to
unpickling, and ONNX external data must live inside the model's own folder.
"""

from __future__ import annotations

import importlib
import math
import os
import pickle
import re
import sys
import zipfile
from collections.abc import Sequence
from pathlib import Path

from optcli.errors import BadInput, first_line
from optcli.library_warnings import quiet_loggers
from optcli.model import (
    InputSpec,
    Model,
    batch_axes,
    example_inputs,
    fold_pruning,
    readable_dim,
    readable_shape,
    torch_dynamic_shapes,
)

ONNX_EXTERNAL_THRESHOLD = 1_800_000_000  # stay clear of protobuf's 2 GB message limit


# --------------------------------------------------------------------------- loading


def load_model(spec, trust_pickle: bool = False, sequence_length: int | None = None) -> Model:
    """Load the model a recipe's `model:` section names (a ModelSpec); sequence_length: a text model's example length."""
    path = Path(spec.path)
    if path.is_dir():
        return _load_folder(spec, path, trust_pickle, sequence_length)
    if not path.is_file():
        raise BadInput(f"model {path} not found")
    if path.stat().st_size == 0:
        raise BadInput(f"model {path} is empty (0 bytes): re-export or re-download it")
    suffix = path.suffix.lower()
    if suffix == ".onnx":
        model = load_onnx(path)
    elif suffix == ".pt2":
        model = load_exported_program(path)
    elif suffix == ".safetensors":
        model = _from_state_dict(load_safetensors(path), spec, path)
    else:
        model = load_torch_file(path, spec, trust_pickle or spec.trust_pickle)
    inputs = resolve_inputs(model.file_inputs, spec.inputs, path, sequence_length)
    return model.with_(inputs=inputs, output_names=spec.output_names or model.output_names)


def _load_folder(spec, path: Path, trust_pickle: bool, sequence_length: int | None) -> Model:
    from optcli.hf import is_folder

    if not is_folder(path):
        raise BadInput(
            f"model {path} is a folder without config.json; give a model file or a Hugging Face model folder"
        )
    from optcli.hf.load import load_folder

    model = load_folder(spec, trust_pickle=trust_pickle, sequence_length=sequence_length)
    return model.with_(output_names=spec.output_names or model.output_names)


def check_onnx_external_data(proto, folder: Path, path: Path) -> None:
    """External data must be a file inside the model's folder: never ../../etc/passwd or /abs/path."""
    from onnx.external_data_helper import _get_all_tensors, uses_external_data

    root = folder.resolve()
    for tensor in _get_all_tensors(proto):
        if not uses_external_data(tensor):
            continue
        location = next((e.value for e in tensor.external_data if e.key == "location"), "")
        target = (root / location).resolve()
        if os.path.isabs(location) or root not in target.parents:
            raise BadInput(
                f"{path}: external data of tensor {tensor.name!r} points outside the model folder ({location!r}); refusing to read it"
            )
        if not target.is_file():
            raise BadInput(
                f"{path}: external data file {location!r} (tensor {tensor.name!r}) is missing; keep it next to the model"
            )


def load_onnx(path: Path) -> Model:
    import onnx
    from google.protobuf.message import DecodeError

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except (DecodeError, ValueError, RuntimeError, OSError) as e:
        raise BadInput(
            f"{path}: not a valid ONNX file ({type(e).__name__}); was it truncated or is it another format?"
        ) from None
    if not proto.graph.node and not proto.graph.output:
        raise BadInput(f"{path}: not a valid ONNX file (no graph); was it truncated or is it another format?")
    check_onnx_external_data(proto, path.parent, path)
    model = Model(
        format="onnx",
        inputs=[],
        file_inputs=onnx_inputs(proto),
        path=path,
        output_names=[o.name for o in proto.graph.output],
        kind="onnx",
    )
    del proto  # the checker reads the file itself; holding inline weights too would add a model's size to the peak
    try:
        onnx.checker.check_model(str(path))
    except Exception as e:  # onnx raises ValidationError and several C++ error types
        raise BadInput(f"{path}: ONNX checker refused the model: {first_line(e)}") from None
    return model


_ONNX_DTYPES = {
    1: "float32",
    10: "float16",
    11: "float64",
    16: "bfloat16",
    7: "int64",
    6: "int32",
    3: "int8",
    2: "uint8",
    9: "bool",
}


def onnx_inputs(proto) -> list[dict]:
    initializers = {t.name for t in proto.graph.initializer}
    bounds = gather_bounds(proto)
    out = []
    for inp in proto.graph.input:
        if inp.name in initializers:
            continue
        tt = inp.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim]
        item = {"name": inp.name, "shape": dims, "dtype": _ONNX_DTYPES.get(tt.elem_type, f"onnx:{tt.elem_type}")}
        if inp.name in bounds:
            item["high"] = bounds[inp.name]
        out.append(item)
    return out


# Ops an index passes through unchanged in value on its way to a Gather (an exporter's casts and reshapes).
_INDEX_PASSTHROUGH = {"Cast", "Reshape", "Unsqueeze", "Squeeze", "Flatten", "Identity", "Expand", "Transpose"}


# Table lookups by index, and the attribute naming the looked-up axis (an int4 embedding is a GatherBlockQuantized).
_GATHERS = {"Gather": "axis", "GatherBlockQuantized": "gather_axis"}


def gather_bounds(proto) -> dict[str, int]:
    """Integer graph inputs that index a constant table (Gather's indices: an embedding's token ids): the table's
    size along the gathered axis, the exclusive bound of the ids generated for them."""
    sizes = {t.name: list(t.dims) for t in proto.graph.initializer}
    for node in proto.graph.node:
        if node.op_type == "Constant" and node.output:
            attr = next((a for a in node.attribute if a.name == "value" and a.HasField("t")), None)
            if attr is not None:
                sizes[node.output[0]] = list(attr.t.dims)
    origin = {i.name: i.name for i in proto.graph.input if i.name not in sizes}
    bounds: dict[str, int] = {}
    for node in proto.graph.node:  # topological order: an index's origin is known before its Gather
        if node.op_type in _INDEX_PASSTHROUGH and node.input and node.input[0] in origin:
            origin[node.output[0]] = origin[node.input[0]]
        elif node.op_type in _GATHERS and len(node.input) >= 2 and node.input[1] in origin and node.input[0] in sizes:
            axis = next((a.i for a in node.attribute if a.name == _GATHERS[node.op_type]), 0)
            dims = sizes[node.input[0]]
            if dims and -len(dims) <= axis < len(dims) and dims[axis] > 0:
                name = origin[node.input[1]]
                bounds[name] = min(bounds.get(name, dims[axis]), dims[axis])
    return bounds


def load_exported_program(path: Path) -> Model:
    import torch

    if not zipfile.is_zipfile(path):
        raise BadInput(f"{path}: not a torch.export archive (.pt2 is a zip file); was it truncated?")
    try:
        with quiet_loggers("torch.export"):  # it logs a traceback before raising on a broken archive
            program = torch.export.load(str(path))
    except Exception as e:
        raise BadInput(
            f"{path}: could not load the torch.export program ({type(e).__name__}: {str(e)[:200]})"
        ) from None
    inputs = []
    user_inputs = set(program.graph_signature.user_inputs)
    for node in program.graph.nodes:
        if node.op == "placeholder" and node.name in user_inputs:
            val = node.meta.get("val")
            shape = [d if isinstance(d, int) else None for d in val.shape] if val is not None else []
            inputs.append(
                {
                    "name": node.name,
                    "shape": shape,
                    "dtype": str(val.dtype).removeprefix("torch.") if val is not None else "float32",
                }
            )
    return Model(format="torch", inputs=[], file_inputs=inputs, module=program.module(), path=path, kind="torch.export")


def load_safetensors(path: Path) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise BadInput(f"{path}: not a valid safetensors file ({e})") from None


def is_torchscript(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as z:
            return any(n.endswith("constants.pkl") or "/code/" in n for n in z.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def graph_file_kind(path: Path) -> str | None:
    """ "torchscript" or "torch.export" for a file that loads as a graph without nn.Module layers (what prune, cluster,
    finetune and convert edit), read from its name and zip listing without torch; None otherwise."""
    suffix = path.suffix.lower()
    if suffix == ".pt2":
        return "torch.export"
    if suffix in (".pt", ".pth") and path.is_file() and is_torchscript(path):
        return "torchscript"
    return None


def load_torch_file(path: Path, spec, trust_pickle: bool) -> Model:
    import torch

    if is_torchscript(path):
        try:
            module = torch.jit.load(str(path), map_location="cpu")
        except Exception as e:
            raise BadInput(
                f"{path}: could not load the TorchScript archive ({type(e).__name__}: {str(e)[:200]})"
            ) from None
        module = module.eval()
        return Model(
            format="torch",
            inputs=[],
            file_inputs=torchscript_inputs(module),
            module=module,
            path=path,
            kind="torchscript",
        )
    if not _looks_like_torch_save(path):
        raise BadInput(
            f"{path}: not a PyTorch checkpoint (neither a torch.save zip nor a pickle); is it truncated or another format?"
        )
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
        kind = "state_dict"
    except pickle.UnpicklingError as e:
        if "Unsupported global" not in str(e) and "Unsupported operand" not in str(e):
            raise BadInput(
                f"{path}: not a PyTorch checkpoint (cannot be read by torch.load); is it truncated or another format?"
            ) from None
        if not trust_pickle:
            raise BadInput(
                f"{path}: holds pickled Python objects, which run code when loaded; save a state_dict instead, "
                "or opt in with model.trust_pickle: true / --trust-pickle if you trust this file"
            ) from None
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=False)
        except Exception as e:
            raise BadInput(f"{path}: could not unpickle ({type(e).__name__}: {str(e)[:200]})") from None
        kind = "pickle"
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, AttributeError, KeyError) as e:
        raise BadInput(
            f"{path}: not a PyTorch checkpoint ({type(e).__name__}); is it truncated or another format?"
        ) from None
    if isinstance(obj, torch.nn.Module):
        return Model(format="torch", inputs=[], module=obj.eval(), path=path, kind="pickle")
    if not isinstance(obj, dict):
        raise BadInput(f"{path}: holds a {type(obj).__name__}, not a state_dict or module")
    model = _from_state_dict(unwrap_checkpoint(obj, getattr(spec, "state_dict_key", None), path), spec, path)
    return model.with_(kind=kind)


def _looks_like_torch_save(path: Path) -> bool:
    # torch.save writes a zip since 1.6; older files are a pickle starting with the PROTO opcode.
    with open(path, "rb") as fh:
        head = fh.read(2)
    return zipfile.is_zipfile(path) or (len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5)


# Where training scripts put the weights beside epoch, optimizer and the like, most common first.
CHECKPOINT_KEYS = ("state_dict", "model_state_dict", "model_state", "model")


def is_tensor_dict(obj) -> bool:
    """A state_dict: a mapping holding tensors and no nested mapping (an optimizer's state nests them)."""
    import torch

    return (
        isinstance(obj, dict)
        and any(isinstance(v, torch.Tensor) for v in obj.values())
        and not any(isinstance(v, dict) for v in obj.values())
    )


def unwrap_checkpoint(obj: dict, key: str | None = None, path: Path | None = None) -> dict:
    """The state_dict inside a training checkpoint: obj[key] when given (model.state_dict_key), else the first of
    CHECKPOINT_KEYS holding a dict, else the one value that is a dict of tensors; obj itself when it is one."""
    if key is not None:
        if not isinstance(obj.get(key), dict):
            holding = [k for k, v in obj.items() if isinstance(v, dict)]
            raise BadInput(
                f"model.state_dict_key: {path.name if path else 'the checkpoint'} has no dict under {key!r}"
                + (
                    f" (keys holding one: {', '.join(map(str, holding[:5]))})"
                    if holding
                    else " (it is the state_dict itself: remove the key)"
                )
            )
        return obj[key]
    if is_tensor_dict(obj):
        return obj
    for known in CHECKPOINT_KEYS:
        if isinstance(obj.get(known), dict):
            return unwrap_checkpoint(obj[known]) if not is_tensor_dict(obj[known]) else obj[known]
    inner = [v for v in obj.values() if is_tensor_dict(v)]
    return inner[0] if len(inner) == 1 else obj


def _from_state_dict(state: dict, spec, path: Path) -> Model:
    import torch

    if spec.factory is None:
        raise BadInput(
            f"{path}: is a state_dict (weights only); set model.factory: module:callable that builds the nn.Module"
        )
    nested = [str(k) for k, v in state.items() if isinstance(v, dict)]
    if nested:  # a training checkpoint whose state_dict could not be told apart (two of them: model and ema)
        raise BadInput(
            f"{path}: a checkpoint whose weights sit under a key ({', '.join(nested[:5])}): set model.state_dict_key "
            "to the one holding the state_dict"
        )
    module = build_from_factory(spec.factory, spec.factory_kwargs, "model.factory")
    if not isinstance(module, torch.nn.Module):
        raise BadInput(f"model.factory {spec.factory} returned {type(module).__name__}, not a torch.nn.Module")
    try:
        result = module.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches raise even with strict=False
        detail = next((line.strip() for line in str(e).splitlines() if "size mismatch" in line), str(e).splitlines()[0])
        raise BadInput(
            f"{path}: does not fit the module built by {spec.factory} ({detail[:200]}); check model.factory_kwargs"
        ) from None
    strict = getattr(spec, "strict", True)
    missing, unexpected = result.missing_keys, result.unexpected_keys
    if strict and (missing or unexpected):
        fixes = []
        if unexpected:
            fixes.append("model.strict: false ignores keys the module does not have (training-only heads)")
        if missing:
            fixes.append("model.factory / factory_kwargs must build the module these weights come from")
        raise BadInput(
            f"{path}: does not fit the module built by {spec.factory}: "
            f"missing {missing[:3]}, unexpected {unexpected[:3]}; {'; '.join(fixes)}"
        )
    notes = []
    if unexpected:
        notes.append(
            f"model.strict: false: {len(unexpected)} checkpoint key(s) the module does not have were ignored: "
            + ", ".join(unexpected[:10])
            + (" …" if len(unexpected) > 10 else "")
        )
    if missing:
        notes.append(
            f"model.strict: false: {len(missing)} module weight(s) missing from the checkpoint keep the factory's "
            "initial values: " + ", ".join(missing[:10]) + (" …" if len(missing) > 10 else "")
        )
    return Model(format="torch", inputs=[], module=module.eval(), path=path, kind="state_dict", notes=tuple(notes))


def import_ref(ref: str, what: str):
    """Import `module:callable`. The working directory is searched too, like `python -m`."""
    module_name, _, attr = ref.partition(":")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        obj = importlib.import_module(module_name)
    except ImportError as e:
        raise BadInput(f"{what}: cannot import module {module_name!r} ({e}); is it on PYTHONPATH?") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise BadInput(f"{what}: module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj


def build_from_factory(ref: str, kwargs: dict, what: str):
    factory = import_ref(ref, what)
    try:
        return factory(**kwargs)
    except TypeError as e:
        raise BadInput(f"{what} {ref}: {e}; check the *_kwargs given to it") from None


def suggested_shape(dims: list, path: Path, dtype: str = "float32", batch_axis: int | None = 0) -> tuple[int, ...]:
    """A concrete shape for an input with free dimensions: batch 1 on the batch axis, the sizes the file knows, and
    for free height/width the image size an exporter recorded in the metadata (Ultralytics' imgsz), else 224; a free
    sequence length of token ids 128."""
    side = _metadata_image_size(path)
    spatial = [i for i in range(len(dims)) if i != batch_axis and not (isinstance(dims[i], int) and dims[i] > 0)]
    out = []
    for i, d in enumerate(dims):
        if isinstance(d, int) and d > 0:
            out.append(d)
        elif i == batch_axis:
            out.append(1)
        else:
            k = spatial.index(i) - (len(spatial) - len(side)) if len(side) >= 1 else -1
            out.append(side[k] if 0 <= k < len(side) else 128 if dtype.startswith("int") else 224)
    return tuple(out)


def _metadata_image_size(path: Path) -> list[int]:
    if path.suffix.lower() != ".onnx":
        return []
    try:
        import onnx

        props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    except Exception:
        return []
    sizes = [int(n) for n in re.findall(r"\d+", props.get("imgsz", ""))][:2]
    return sizes * 2 if len(sizes) == 1 else sizes


def resolve_inputs(
    file_inputs: list[dict], recipe_inputs, path: Path, sequence_length: int | None = None
) -> list[InputSpec]:
    """Input specs from the file where it fixes them, else from model.inputs; each with its batch axis (read from
    the file's dims, or the recipe's batch_axis).

    With text data (sequence_length), a free dimension 1 is the sequence: measured at that length, left free.
    """
    given = {t.name: t for t in recipe_inputs or []}
    if not file_inputs:
        if not given:
            raise BadInput(
                f"{path}: the file does not record its inputs; list them under model.inputs (name, shape, dtype)"
            )
        return [_recipe_only(t, path) for t in recipe_inputs]
    names = [i["name"] for i in file_inputs]
    schema = any(i.get("python") or i["shape"] is None for i in file_inputs)
    if schema and set(given) - set(names) and not any(i.get("python") for i in file_inputs):
        return [_recipe_only(t, path) for t in recipe_inputs]  # tensors only, named otherwise: by position
    for name in given:
        if name not in names:
            raise BadInput(f"model.inputs: {name!r} is not an input of {path.name} (its inputs: {', '.join(names)})")
    if schema:
        return _schema_inputs(file_inputs, given, path)
    axes = batch_axes(file_inputs)
    specs = []
    for item, axis in zip(file_inputs, axes, strict=True):
        name, dims = item["name"], list(item["shape"])
        t = given.get(name)
        if t is not None and "batch_axis" in t.model_fields_set:
            axis = t.batch_axis if t.batch_axis is None or t.batch_axis < len(dims) else axis
        batch_free = axis is not None and not (isinstance(dims[axis], int) and dims[axis] > 0)
        if t is not None and t.shape is not None:
            if len(t.shape) != len(dims) or any(
                isinstance(d, int) and d > 0 and d != s and a != axis
                for a, (d, s) in enumerate(zip(dims, t.shape, strict=False))
            ):
                raise BadInput(
                    f"model.inputs: {name!r} has shape {readable_shape(t.shape)} but the file says {readable_shape(dims)}"
                    " (? is a size the file leaves free)"
                )
            dtype = t.dtype if "dtype" in t.model_fields_set else item["dtype"]
            specs.append(
                InputSpec(
                    name,
                    tuple(t.shape),
                    dtype,
                    batch_dynamic=batch_free,
                    high=item.get("high"),
                    batch_axis=axis,
                    value=t.value,
                )
            )
            continue
        free: tuple[int, ...] = ()
        if sequence_length and len(dims) == 2 and axis == 0 and not (isinstance(dims[1], int) and dims[1] > 0):
            dims[1], free = sequence_length, (1,)
        for a, d in enumerate(dims):
            if a != axis and a not in free and (not isinstance(d, int) or d <= 0):
                concrete = suggested_shape(dims, path, item["dtype"], axis)
                label = readable_dim(d)
                raise BadInput(
                    f"input {name!r} has a dynamic dimension {a}{f' ({label})' if label != '?' else ''} with no size: "
                    f"give one with --shape {name}={'x'.join(map(str, concrete))} (optcli init) or in model.inputs "
                    f"(- {{name: {name}, shape: {list(concrete)}, dtype: {item['dtype']}}})"
                )
        shape = tuple(1 if a == axis and batch_free else d for a, d in enumerate(dims))
        specs.append(
            InputSpec(
                name,
                shape,
                item["dtype"],
                batch_dynamic=batch_free,
                dynamic_axes=free,
                high=item.get("high"),
                batch_axis=axis,
                value=t.value if t is not None else None,
            )
        )
    for spec in specs:
        if math.prod(spec.shape) > 2**31:
            raise BadInput(f"input {spec.name!r}: shape {readable_shape(spec.shape)} is too large to allocate")
    return specs


def _recipe_only(t, path: Path) -> InputSpec:
    """An input of a file that records none (a state_dict's module): all from the recipe; batch axis 0 unless set."""
    if t.shape is None:
        raise BadInput(f"model.inputs: {t.name!r} needs a shape ({path.name} does not record it): add shape: [...]")
    return InputSpec(
        t.name, tuple(t.shape), t.dtype, batch_dynamic=bool(t.shape), batch_axis=t.batch_axis, value=t.value
    )


def _schema_inputs(file_inputs: list[dict], given: dict, path: Path) -> list[InputSpec]:
    """TorchScript: forward's arguments by name; tensors take the recipe's shape, Python numbers its value."""
    specs = []
    while file_inputs and file_inputs[-1].get("optional") and file_inputs[-1]["name"] not in given:
        file_inputs = file_inputs[:-1]  # trailing arguments with a default, left to it
    for item in file_inputs:
        name, t = item["name"], given.get(item["name"])
        if item.get("python"):
            if t is None or t.value is None:
                raise BadInput(
                    f"model.inputs: {path.name}'s forward takes {name!r} as a Python {item['python']}, not a tensor: "
                    f"give the value to pass (- {{name: {name}, value: ...}})"
                )
            specs.append(
                InputSpec(
                    name, (), item["dtype"], batch_dynamic=False, batch_axis=None, value=t.value, python=item["python"]
                )
            )
        elif t is None or t.shape is None:
            tensors = [i["name"] for i in file_inputs if not i.get("python")]
            raise BadInput(
                f"{path} does not record its input shapes; its forward takes {_signature(file_inputs)}: give the shape "
                f"of {', '.join(repr(n) for n in tensors)} with --shape {tensors[0]}=1x3x32x32 (optcli init) or in model.inputs"
            )
        else:
            specs.append(_recipe_only(t, path))
    return specs


def _signature(file_inputs: list[dict]) -> str:
    return ", ".join(f"{i['name']}: {i.get('python') or 'Tensor'}" for i in file_inputs)


_SCHEMA_NUMBERS = {"int": ("int64", "int"), "float": ("float32", "float"), "bool": ("bool", "bool")}


def torchscript_inputs(module) -> list[dict]:
    """forward's arguments as the TorchScript schema declares them: tensors (shape unknown), and Python numbers
    (int / float / bool: a sample rate, a flag) fed as values. Arguments of other types are refused in a sentence."""
    try:
        arguments = module.forward.schema.arguments[1:]  # [0] is self
    except (AttributeError, RuntimeError):
        return []
    out = []
    for arg in arguments:
        kind = str(arg.type).removeprefix("Optional[").removesuffix("]")
        optional = arg.has_default_value()
        if kind == "Tensor":
            out.append({"name": arg.name, "shape": None, "dtype": "float32", "optional": optional})
        elif kind in _SCHEMA_NUMBERS:
            dtype, python = _SCHEMA_NUMBERS[kind]
            out.append({"name": arg.name, "shape": [], "dtype": dtype, "python": python, "optional": optional})
        elif arg.has_default_value():
            break  # this one and those after it left to their defaults (later ones cannot be passed by position)
        else:
            raise BadInput(
                f"TorchScript forward takes {arg.name!r} of type {arg.type}; optcli feeds tensors and Python "
                "int / float / bool values only: wrap the module in one whose forward takes those"
            )
    return out


# --------------------------------------------------------------------------- saving


def save_torch(module, inputs: list[InputSpec], folder: Path) -> Path:
    """Write a torch module with torch.export (.pt2, dynamic batch). Returns the file."""
    import torch

    module = fold_pruning(module)
    feeds = example_inputs(inputs, batch=2)
    args = tuple(torch.from_numpy(feeds[s.name]) for s in inputs)
    dynamic = tuple(torch_dynamic_shapes(inputs).values())
    target = folder / "model.pt2"
    if isinstance(module, torch.jit.ScriptModule):
        raise BadInput(
            "a TorchScript module cannot be re-saved by torch.export; give a state_dict + factory or a .pt2 to run torch passes"
        )
    program = torch.export.export(module, args, dynamic_shapes=dynamic, strict=False)
    torch.export.save(program, str(target))
    return target


def save_onnx(proto, target: Path) -> Path:
    """Save an ONNX model; weights go to an external data file past the protobuf limit."""
    import onnx

    large = proto.ByteSize() > ONNX_EXTERNAL_THRESHOLD if _has_inline_data(proto) else True
    if large:
        onnx.save_model(
            proto, str(target), save_as_external_data=True, all_tensors_to_one_file=True, location=target.name + ".data"
        )
    else:
        onnx.save_model(proto, str(target))
    return target


def _has_inline_data(proto) -> bool:
    from onnx.external_data_helper import uses_external_data

    return not any(uses_external_data(t) for t in proto.graph.initializer)


def artifact_files(path: Path) -> list[Path]:
    """The model file plus any external data files it references."""
    if path.is_dir():
        from optcli.hf.folder import folder_files

        return folder_files(path)
    files = [path]
    if path.suffix == ".onnx":
        import onnx
        from onnx.external_data_helper import _get_all_tensors, uses_external_data

        proto = onnx.load(str(path), load_external_data=False)
        seen = set()
        for t in _get_all_tensors(proto):
            if uses_external_data(t):
                loc = next(e.value for e in t.external_data if e.key == "location")
                if loc not in seen:
                    seen.add(loc)
                    files.append(path.parent / loc)
    return files


def parse_shape_arg(item: str) -> tuple[str, list[int], str]:
    """`name=1x3x32x32[:dtype]` -> (name, [1, 3, 32, 32], dtype)."""
    name, sep, rest = item.partition("=")
    dims, _, dtype = rest.partition(":")
    try:
        shape = [int(d) for d in dims.lower().split("x")] if dims else []
    except ValueError:
        shape = None
    if not sep or not name or shape is None or any(d < 1 for d in shape):
        raise BadInput(f"--shape {item!r}: write name=1x3x32x32 (optionally :int64), every size a positive integer")
    return name, shape, dtype or "float32"


def load_any(path: Path, shapes: Sequence[str] = (), trust_pickle: bool = False, factory: str | None = None) -> Model:
    """Load a model file outside a recipe (inspect, bench, init), with --shape for unknown inputs."""
    from optcli.config import ModelSpec, TensorSpec, unknown_suffix

    if path.is_file() and unknown_suffix(path):  # the files `run` takes, no more, no fewer
        raise BadInput(f"model {unknown_suffix(path)}")
    try:
        given = [
            TensorSpec.model_validate({"name": n, "shape": s, "dtype": d})
            for n, s, d in (parse_shape_arg(x) for x in shapes)
        ]
        spec = ModelSpec(path=path, factory=factory, inputs=given or None)
    except ValueError as e:
        raise BadInput(f"--shape/--factory: {str(e).splitlines()[-1].strip()}") from None
    return load_model(spec, trust_pickle=trust_pickle)
