"""A torch model that came from a Hugging Face folder, written back as one (save_pretrained layout)."""

from __future__ import annotations

import shutil
from pathlib import Path

from optcli.errors import BadInput
from optcli.hf import offline
from optcli.hf.folder import encoder_folder, module_kind, sentence_modules
from optcli.model import fold_pruning


def save_folder(module, source: Path, target: Path) -> Path:
    """Weights (safetensors) + config through save_pretrained; the tokenizer and sentence-transformers files beside."""
    from optcli.hf.load import load_tokenizer
    from optcli.hf.modules import TextModel

    if not isinstance(module, TextModel):
        raise BadInput("only a model loaded from a Hugging Face folder can be written back as one")
    module = fold_pruning(module)  # pruning masks become plain zeros in the saved weights
    modules = sentence_modules(source)
    encoder_target = target / encoder_folder(source).relative_to(source)
    target.mkdir(parents=True, exist_ok=True)
    if modules is not None:
        for name in ("modules.json", "config_sentence_transformers.json", "sentence_bert_config.json"):
            if (source / name).is_file():
                shutil.copyfile(source / name, target / name)
        for m in modules:
            path = str(m.get("path", ""))
            if path and module_kind(m) != "Transformer" and (source / path).is_dir():
                shutil.copytree(source / path, target / path, dirs_exist_ok=True)
    with offline():
        module.model.save_pretrained(str(encoder_target), safe_serialization=True)
    try:
        tokenizer = load_tokenizer(encoder_folder(source))
    except BadInput:
        return target  # a folder without a tokenizer stays without one
    with offline():
        tokenizer.save_pretrained(str(encoder_target))
    return target
