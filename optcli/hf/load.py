"""A Hugging Face folder -> Model: AutoConfig + the Auto class of the task, offline, safetensors first.

The module the passes get is a TextModel: (input_ids, attention_mask[, token_type_ids]) -> one tensor, with
batch and sequence axes free. pytorch_model.bin loads only through weights_only unpickling unless --trust-pickle.
"""

from __future__ import annotations

import inspect
import pickle
from pathlib import Path

from optcli.errors import BadInput, first_line
from optcli.hf import offline, require_transformers
from optcli.hf.folder import (
    check_remote_code,
    check_weights,
    encoder_folder,
    infer_task,
    raw_config,
    sentence_modules,
    weights_file,
)
from optcli.model import InputSpec, Model

AUTO_CLASSES = {
    "feature-extraction": "AutoModel",
    "text-classification": "AutoModelForSequenceClassification",
    "token-classification": "AutoModelForTokenClassification",
    "causal-lm": "AutoModelForCausalLM",
}
DEFAULT_SEQUENCE = 128


def load_folder(spec, trust_pickle: bool = False, sequence_length: int | None = None) -> Model:
    """`spec` is a ModelSpec (path, task, trust_remote_code); sequence_length sets the example shape (data max_length)."""
    import torch

    from optcli.hf.modules import TextModel, sentence_pooling

    folder = Path(spec.path)
    transformers = require_transformers(folder)
    trust_remote_code = bool(spec.trust_remote_code)
    trust_pickle = trust_pickle or bool(spec.trust_pickle)
    modules = sentence_modules(folder)
    source = encoder_folder(folder)
    if not (source / "config.json").is_file():
        raise BadInput(f"{folder / 'modules.json'}: the transformer's folder {source} holds no config.json")
    raw = raw_config(source)
    check_remote_code(raw, source, trust_remote_code)
    task = spec.task or infer_task(raw, folder)
    if modules is not None and task != "feature-extraction":
        raise BadInput(f"{folder}: a sentence-transformers folder gives embeddings; set model.task: feature-extraction")
    config = load_config(source, raw, trust_remote_code, transformers)
    weights = weights_file(source)
    check_weights(weights)
    pooling = sentence_pooling(folder, modules) if modules is not None else None
    auto = getattr(transformers, AUTO_CLASSES[task])
    kwargs = {
        "config": config,
        "local_files_only": True,
        "trust_remote_code": trust_remote_code,
        "use_safetensors": weights.name.startswith("model.safetensors"),
        "weights_only": not trust_pickle,
        "dtype": torch.float32,
    }
    if pooling is not None and _takes(auto, config, "add_pooling_layer"):
        kwargs["add_pooling_layer"] = False  # the sentence pooling replaces BERT's pooler, whose weights go unused
    model = _from_pretrained(auto, source, weights, task, kwargs, trust_pickle)
    names = input_names(source, model)
    module = TextModel(model, names, task, pooling).eval()
    seq = min(sequence_length or DEFAULT_SEQUENCE, max_positions(config))
    inputs = [InputSpec(n, (1, seq), "int64", dynamic_axes=(1,), high=id_bound(n, config)) for n in names]
    return Model(
        format="torch",
        inputs=inputs,
        module=module,
        path=folder,
        output_names=[module.output_name],
        kind=f"hf {type(model).__name__}" + (" + sentence pooling" if pooling is not None else ""),
        task=task,
    )


def load_config(source: Path, raw: dict, trust_remote_code: bool, transformers):
    model_type = raw.get("model_type")
    if not trust_remote_code and model_type not in transformers.CONFIG_MAPPING:
        raise BadInput(
            f"{source / 'config.json'}: model_type {model_type!r} is unknown to transformers {transformers.__version__}; "
            "upgrade transformers or check the folder"
        )
    try:
        with offline():
            config = transformers.AutoConfig.from_pretrained(
                str(source), local_files_only=True, trust_remote_code=trust_remote_code
            )
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise BadInput(f"{source / 'config.json'}: transformers cannot read it ({first_line(e)})") from None
    # Eager attention exports to plain MatMul/Softmax, which ONNX Runtime's quantizer understands.
    config._attn_implementation = "eager"
    return config


def _from_pretrained(auto, source: Path, weights: Path, task: str, kwargs: dict, trust_pickle: bool):
    try:
        with offline():
            return auto.from_pretrained(str(source), **kwargs).eval()
    except pickle.UnpicklingError as e:
        if not trust_pickle:
            raise BadInput(
                f"{weights}: holds pickled Python objects, which run code when loaded; convert it to model.safetensors, "
                "or opt in with --trust-pickle (model.trust_pickle: true) if you trust this file"
            ) from None
        raise BadInput(f"{weights}: cannot be read ({first_line(e)}); re-save or re-download it") from None
    except ValueError as e:
        if "Unrecognized configuration class" in str(e):
            raise BadInput(
                f"{source}: {type(kwargs['config']).__name__} has no {auto.__name__} in transformers "
                f"(model.task: {task}); choose another model.task"
            ) from None
        raise BadInput(f"{weights}: could not load the weights ({first_line(e)})") from None
    except Exception as e:  # safetensors, torch and transformers raise many types for a damaged file
        raise BadInput(f"{weights}: could not load the weights ({type(e).__name__}: {first_line(e)})") from None


def _takes(auto, config, name: str) -> bool:
    try:
        cls = auto._model_mapping[type(config)]
    except (KeyError, AttributeError):
        return False
    return name in inspect.signature(cls.__init__).parameters


def max_positions(config) -> int:
    for key in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return 4096


def id_bound(name: str, config) -> int | None:
    """Exclusive bound of generated ids, so fidelity and latency inputs stay inside the embedding tables."""
    if name == "input_ids":
        return getattr(config, "vocab_size", None)
    if name == "token_type_ids":
        return getattr(config, "type_vocab_size", None) or 1
    return None


def load_tokenizer(folder: Path):
    """The folder's own tokenizer (offline). One without a pad token pads with its end-of-text token (GPT-2)."""
    transformers = require_transformers(folder)
    if not folder.is_dir():
        raise BadInput(f"tokenizer folder {folder} not found")
    try:
        with offline():
            tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as e:  # missing files raise OSError, damaged ones many types
        raise BadInput(
            f"{folder}: no usable tokenizer ({type(e).__name__}: {first_line(e)}); save one there with "
            "tokenizer.save_pretrained, or set data.<name>.tokenizer"
        ) from None
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise BadInput(f"{folder}: the tokenizer has neither a pad nor an end-of-text token; cannot pad batches")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def input_names(folder: Path, model) -> list[str]:
    """The inputs that both the tokenizer gives and the model's forward takes, in TextModel's order."""
    from optcli.hf.modules import INPUT_NAMES

    takes = set(inspect.signature(model.forward).parameters)
    try:
        given = set(load_tokenizer(folder)("a").keys())
    except BadInput:
        given = {"input_ids", "attention_mask"}  # no tokenizer: the inputs every text model takes
    return [n for n in INPUT_NAMES if n in takes and n in given] or ["input_ids"]


def tokenizer_summary(folder: Path) -> dict | None:
    """For inspect: the tokenizer's class, vocabulary, inputs and length, or None without one."""
    try:
        tok = load_tokenizer(encoder_folder(folder))
    except BadInput:
        return None
    max_len = tok.model_max_length if tok.model_max_length < 1_000_000 else None
    return {
        "class": type(tok).__name__,
        "vocab_size": len(tok),
        "inputs": list(tok("a").keys()),
        "max_length": max_len,
        "padding_side": tok.padding_side,
    }
