"""`optcli init MODEL`: a starter recipe with the inputs read from the file."""

from __future__ import annotations

from pathlib import Path

import yaml

from optcli.errors import BadInput


def starter_recipe(path: Path, factory: str | None = None, shapes: list[str] = ()) -> str:
    from optcli.artifact import load_any
    from optcli.model import check_feedable

    suffix = path.suffix.lower()
    needs_factory = suffix == ".safetensors" or (suffix in (".pt", ".pth") and not _is_module_file(path))
    if needs_factory and factory is None:
        raise BadInput(f"{path} holds only weights; pass --factory module:callable that builds the nn.Module")
    try:
        model = load_any(path, shapes, factory=factory)
        check_feedable(model.inputs, path)
    except BadInput as e:
        if "does not record its inputs" in str(e):
            raise BadInput(
                f"{path} does not record its input shapes; pass --shape name=1x3x32x32 (and :int64 for ids)"
            ) from None
        raise
    spec = {"path": str(path)}
    if factory:
        spec["factory"] = factory
    spec["inputs"] = [{"name": s.name, "shape": list(s.shape), "dtype": s.dtype} for s in model.inputs]
    passes = [{"type": "quantize", "mode": "dynamic", "per_channel": True}]
    if model.format == "torch":
        passes.insert(0, {"type": "export", "opset": 18})
    recipe = {
        "model": spec,
        "passes": passes,
        "report": {"latency": {"batch_sizes": [1, 32], "warmup": 5, "runs": 30, "threads": 2}},
        "gates": {"min_fidelity_cosine": 0.99},
    }
    header = (
        f"# optcli recipe for {path.name} (written by optcli init)\n"
        "# Add data.eval (a .npz keyed by input name, plus labels) to measure accuracy, and data.calibration\n"
        "# for static int8 (mode: static). `optcli passes` lists every option; `optcli validate` checks this file.\n"
    )
    return header + yaml.safe_dump(recipe, sort_keys=False)


def _is_module_file(path: Path) -> bool:
    from optcli.artifact import is_torchscript

    return is_torchscript(path)
