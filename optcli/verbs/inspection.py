"""`optcli inspect`: what a model file holds (params, sparsity, dtypes, ops, inputs, outputs)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from optcli.errors import BadInput


def inspect_model(path: Path, trust_pickle: bool = False) -> dict:
    from optcli.artifact import load_onnx
    from optcli.config import unknown_suffix
    from optcli.measure import parameter_counts, size_on_disk

    if path.is_dir():
        return _inspect_folder(path, trust_pickle)
    if not path.is_file():
        raise BadInput(f"model {path} not found")
    if unknown_suffix(path):
        raise BadInput(f"model {unknown_suffix(path)}")
    if path.stat().st_size == 0:
        raise BadInput(f"model {path} is empty (0 bytes)")
    if path.suffix.lower() == ".onnx":
        model = load_onnx(path)
        info = {
            "path": str(path),
            "format": "onnx",
            **size_on_disk(path),
            **parameter_counts(path),
            **_onnx_details(path),
        }
        info["inputs"] = _described(model.file_inputs)
        return info
    return _inspect_torch(path, trust_pickle)


def _inspect_folder(path: Path, trust_pickle: bool) -> dict:
    """A Hugging Face folder: architecture, task, parameters, tokenizer, and the inputs optcli will feed it."""
    from optcli.artifact import load_any
    from optcli.hf.load import tokenizer_summary
    from optcli.measure import parameter_counts, size_on_disk

    model = load_any(path, trust_pickle=trust_pickle)
    params = list(model.module.parameters())
    return {
        "path": str(path),
        "format": "hugging face folder",
        **size_on_disk(path),
        **parameter_counts(path, model.module),
        "architecture": model.kind.removeprefix("hf "),
        "task": model.task,
        "tokenizer": tokenizer_summary(path),
        "parameter_dtypes": dict(Counter(str(t.dtype).removeprefix("torch.") for t in params)),
        "outputs": model.output_names,
        "inputs": [
            {"name": s.name, "shape": ["batch", "sequence"], "dtype": s.dtype, "batch_dynamic": True}
            for s in model.inputs
        ],
    }


def _described(file_inputs: list[dict]) -> list[dict]:
    return [{**i, "batch_dynamic": bool(i["shape"]) and not isinstance(i["shape"][0], int)} for i in file_inputs]


def _onnx_details(path: Path) -> dict:
    import numpy as np
    import onnx

    from optcli.artifact import onnx_inputs
    from optcli.measure import onnx_weight_tensors
    from optcli.onnx_check import all_initializers, all_nodes, nbits_counts

    proto = onnx.load(str(path))
    weights = onnx_weight_tensors(proto)
    # As stored: a packed int4 weight is counted as the weights it holds, but its type is the file's (uint4 / uint8).
    stored = {t.name: onnx.helper.tensor_dtype_to_np_dtype(t.data_type).name for t in all_initializers(proto)}
    dtypes = Counter(stored.get(name, arr.dtype.name) for name, arr in weights)
    layers = {name: round(1 - np.count_nonzero(arr) / arr.size, 4) for name, arr in weights if arr.ndim >= 2}
    nodes = all_nodes(proto)  # If / Loop bodies included: what the model runs, not just its top level
    ops = dict(Counter(n.op_type for n in nodes).most_common())
    used = {n.domain or "ai.onnx" for n in nodes}
    return {
        # Only the domains the graph uses: exporters declare a dozen they never call (empty version 1 entries).
        "opset": {o.domain or "ai.onnx": o.version for o in proto.opset_import if (o.domain or "ai.onnx") in used},
        "producer": f"{proto.producer_name} {proto.producer_version}".strip(),
        "ops": ops,
        "initializer_dtypes": dict(dtypes),
        "outputs": [o.name for o in proto.graph.output],
        "output_specs": onnx_inputs(_outputs_as_inputs(proto)),
        "layer_sparsity": layers,
        "summary": describe(model_kind(ops, dtypes, nbits_counts(proto)), weights),
    }


def _outputs_as_inputs(proto):
    # onnx_inputs reads graph.input; the outputs carry the same ValueInfo (name, dtype, dims).
    import onnx

    graph = onnx.helper.make_graph([], "outputs", list(proto.graph.output), [])
    return onnx.helper.make_model(graph)


def model_kind(ops: dict, dtypes: Counter, nbits: dict[int, int] | None = None) -> str:
    """What the model is, in one line: "static QDQ int8: 21 DequantizeLinear / 9 QuantizeLinear", "fp16 weights"."""

    def counted(*names: str) -> str:
        return " / ".join(f"{ops[n]} {n}" for n in names if ops.get(n))

    if ops.get("MatMulNBits") or ops.get("GatherBlockQuantized"):
        matmuls = " + ".join(f"{k} int{b}" for b, k in sorted((nbits or {}).items()))
        parts = [f"{matmuls} MatMulNBits"] if matmuls else []
        parts += [counted("GatherBlockQuantized")] if ops.get("GatherBlockQuantized") else []
        return f"weight-only blockwise: {' / '.join(parts)}"
    if ops.get("QuantizeLinear") and ops.get("DequantizeLinear"):
        return f"static QDQ int8: {counted('DequantizeLinear', 'QuantizeLinear')}"
    if ops.get("DynamicQuantizeLinear") or ops.get("MatMulInteger") or ops.get("ConvInteger"):
        return f"dynamic int8: {counted('DynamicQuantizeLinear', 'MatMulInteger', 'ConvInteger')}"
    if ops.get("QLinearConv") or ops.get("QLinearMatMul"):
        return f"int8 QOperator: {counted('QLinearConv', 'QLinearMatMul')}"
    if ops.get("DequantizeLinear"):
        return f"weight-only int8: {counted('DequantizeLinear')}"
    total = sum(dtypes.values())
    if total and dtypes.get("float16", 0) * 2 > total:
        return "fp16 weights"
    if total and dtypes.get("bfloat16", 0) * 2 > total:
        return "bf16 weights"
    return "fp32 weights" if total else "no weights"


def describe(kind: str, weights: list) -> str:
    """The one line `optcli inspect` opens with: the kind, and the share of zero weights where it is large."""
    import numpy as np

    total = sum(arr.size for _, arr in weights)
    zeros = total - sum(int(np.count_nonzero(arr)) for _, arr in weights)
    if total and zeros / total >= 0.05:
        kind += f"; {zeros / total * 100:.0f} % zero weights"
    return kind


def _inspect_torch(path: Path, trust_pickle: bool) -> dict:
    import torch

    from optcli.artifact import is_torchscript
    from optcli.measure import size_on_disk

    info = {"path": str(path), **size_on_disk(path)}
    if path.suffix == ".pt2":
        from optcli.artifact import load_exported_program

        model = load_exported_program(path)
        program = torch.export.load(str(path))
        tensors = {n: program.state_dict[n] for n in program.graph_signature.parameters if n in program.state_dict}
        info.update(
            format="torch.export",
            inputs=_described(model.file_inputs),
            ops=dict(Counter(str(n.target) for n in program.graph.nodes if n.op == "call_function").most_common(20)),
        )
    elif is_torchscript(path):
        module = torch.jit.load(str(path), map_location="cpu")
        tensors = dict(module.named_parameters())
        info.update(format="torchscript", inputs=None)
        quantized = Counter(k for k in node_kinds(module.inlined_graph) if k.startswith("quantized::"))
        if quantized:
            info["quantized_ops"] = dict(quantized)
    else:
        from optcli.artifact import is_tensor_dict, load_safetensors, unwrap_checkpoint

        if path.suffix == ".safetensors":
            state = load_safetensors(path)
        else:
            from optcli.artifact import load_torch_file
            from optcli.config import ModelSpec

            try:
                state = unwrap_checkpoint(torch.load(str(path), map_location="cpu", weights_only=True))
            except Exception:
                model = load_torch_file(path, ModelSpec(path=path), trust_pickle)  # raises the right one-line error
                state = dict(model.module.named_parameters())
            nested = {k: v for k, v in state.items() if is_tensor_dict(v)}
            if nested:  # several state_dicts (model and ema): each counted, under its key, and named
                info["state_dicts"] = {
                    str(k): sum(t.numel() for t in v.values() if torch.is_tensor(t)) for k, v in nested.items()
                }
                state = {f"{k}.{name}": t for k, v in nested.items() for name, t in v.items()}
        tensors = {
            k: v
            for k, v in state.items()
            if isinstance(v, torch.Tensor) and v.is_floating_point() and "running_" not in k
        }
        # torch.ao int8 modules keep their weights packed: (int8 weight, bias) tuples under `_packed_params`
        for k, v in state.items():
            for i, t in enumerate(v if isinstance(v, tuple) else [v]):
                if isinstance(t, torch.Tensor) and t.is_quantized:
                    tensors[f"{k}.{i}"] = t.int_repr()
                elif isinstance(v, tuple) and isinstance(t, torch.Tensor) and t.is_floating_point():
                    tensors[f"{k}.{i}"] = t  # the bias packed beside an int8 weight
        info.update(format="state_dict", inputs=None)
    total = sum(t.numel() for t in tensors.values())
    nonzero = sum(int(torch.count_nonzero(t)) for t in tensors.values())
    info.update(
        parameters=total,
        nonzero_parameters=nonzero,
        sparsity=round(1 - nonzero / total, 6) if total else 0.0,
        parameter_dtypes=dict(Counter(str(t.dtype).removeprefix("torch.") for t in tensors.values())),
        layer_sparsity={
            k: round(1 - int(torch.count_nonzero(t)) / t.numel(), 4) for k, t in tensors.items() if t.ndim >= 2
        },
    )
    info["summary"] = torch_summary(info)
    return info


def node_kinds(graph):
    """Every node kind of a TorchScript graph, inside if/loop blocks too (torch.ao's int8 ops sit in one)."""
    for node in graph.nodes():
        yield node.kind()
        for block in node.blocks():
            yield from node_kinds(block)


_PRECISION = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "float64": "fp64"}
_PRECISION.update(dict.fromkeys(("int8", "qint8", "uint8", "quint8"), "int8"))
_WHAT = {"torchscript": "TorchScript", "torch.export": "torch.export program", "state_dict": "state_dict weights"}


def torch_summary(info: dict) -> str:
    """The one line `inspect` opens a torch file with, as for ONNX: "fp32 torch module (TorchScript): 1,234
    parameters, 0 % zero weights"; "int8 ..." where the weights (or, in TorchScript, the ops) are quantized."""
    dtypes = Counter(info.get("parameter_dtypes") or {})
    precision = _PRECISION.get(dtypes.most_common(1)[0][0], dtypes.most_common(1)[0][0]) if dtypes else "no"
    if any(_PRECISION.get(d) == "int8" for d in dtypes):
        precision = "int8"
    ops = info.get("quantized_ops") or {}
    if ops:
        precision = "int8"
    line = f"{precision} torch module ({_WHAT.get(info['format'], info['format'])}): {info['parameters']:,} parameters"
    if info.get("state_dicts"):
        line += f" in {len(info['state_dicts'])} state_dicts ({', '.join(info['state_dicts'])}; model.state_dict_key picks one)"
    if info["parameters"]:
        line += f", {info['sparsity'] * 100:.0f} % zero weights"
    if ops:
        line += "; int8 ops " + ", ".join(ops)  # kinds only: torch.ao scripts both branches of a dtype switch
        if not info["parameters"]:
            line += " (weights packed inside the int8 ops, not counted)"
    return line
