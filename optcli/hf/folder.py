"""What a Hugging Face folder holds, read without transformers: config, task, weights, sentence-transformers modules."""

from __future__ import annotations

import json
from pathlib import Path

from optcli.config import HF_TASKS
from optcli.errors import BadInput

WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


def read_json(path: Path, what: str):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadInput(f"{path}: not valid JSON ({e}); the {what} is damaged, re-save or re-download it") from None


def raw_config(folder: Path) -> dict:
    raw = read_json(folder / "config.json", "model config")
    if not isinstance(raw, dict):
        raise BadInput(f"{folder / 'config.json'}: holds a {type(raw).__name__}, not a model config")
    return raw


def sentence_modules(folder: Path) -> list[dict] | None:
    """modules.json of a sentence-transformers folder, in order; None for a plain transformers folder."""
    path = folder / "modules.json"
    if not path.is_file():
        return None
    modules = read_json(path, "sentence-transformers module list")
    if not isinstance(modules, list) or not all(isinstance(m, dict) for m in modules):
        raise BadInput(f"{path}: not a sentence-transformers module list (a JSON list of {{type, path}})")
    return sorted(modules, key=lambda m: m.get("idx", 0))


def module_kind(module: dict) -> str:
    return str(module.get("type", "")).rsplit(".", 1)[-1]


def encoder_folder(folder: Path) -> Path:
    """Where the transformer of a sentence-transformers folder lives: its root, or the Transformer module's path."""
    for m in sentence_modules(folder) or []:
        if module_kind(m) == "Transformer" and m.get("path"):
            return folder / m["path"]
    return folder


def check_remote_code(raw: dict, folder: Path, trust_remote_code: bool) -> None:
    if raw.get("auto_map") and not trust_remote_code:
        classes = ", ".join(sorted(str(v) for v in dict(raw["auto_map"]).values()))[:160]
        raise BadInput(
            f"{folder}: the model's code ships inside the folder ({classes}) and would run when loaded; "
            "set model.trust_remote_code: true only if you trust it"
        )


def task_of(arch: str) -> str | None:
    if arch.endswith("ForSequenceClassification"):
        return "text-classification"
    if arch.endswith("ForTokenClassification"):
        return "token-classification"
    if arch.endswith(("ForCausalLM", "LMHeadModel")):
        return "causal-lm"
    if arch.endswith("Model") and "For" not in arch:
        return "feature-extraction"
    return None


def infer_task(raw: dict, folder: Path) -> str:
    if sentence_modules(folder) is not None:
        return "feature-extraction"
    archs = raw.get("architectures") or []
    tasks = {task_of(str(a)) for a in archs}
    found = [t for t in tasks if t is not None]
    if len(tasks) == 1 and found:
        return found[0]
    raise BadInput(
        f"{folder}: cannot tell the task from config.json architectures {archs or '(none)'}; "
        f"set model.task: one of {', '.join(HF_TASKS)}"
    )


def weights_file(folder: Path) -> Path:
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            return folder / name
    raise BadInput(f"{folder}: no weights beside config.json (looked for {', '.join(WEIGHT_FILES)}); copy them in")


def check_weights(path: Path) -> None:
    """A damaged safetensors header or a missing shard is named here, before transformers reports it its own way."""
    if path.name.endswith(".index.json"):
        index = read_json(path, "weight index")
        shards = sorted(set((index.get("weight_map") or {}).values())) if isinstance(index, dict) else []
        if not shards:
            raise BadInput(f"{path}: a weight index without a weight_map; the folder is incomplete")
        root = path.parent.resolve()
        for shard in shards:
            target = (root / str(shard)).resolve()
            if root not in target.parents or not target.is_file():
                raise BadInput(f"{path}: weight shard {shard!r} is missing from the folder")
            if target.suffix == ".safetensors":
                check_weights(target)
        return
    if path.stat().st_size == 0:
        raise BadInput(f"{path}: empty weight file (0 bytes); re-save or re-download it")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                list(f.keys())
        except (SafetensorError, OSError, ValueError) as e:
            raise BadInput(
                f"{path}: not a valid safetensors file ({str(e)[:160]}); re-save or re-download it"
            ) from None


def folder_files(folder: Path) -> list[Path]:
    """Every file of the folder, sorted (hashing, sizes, copies)."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".optcli"))
