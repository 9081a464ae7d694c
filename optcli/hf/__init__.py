"""Hugging Face model folders (config.json + weights + tokenizer), read offline through transformers.

The face of the package: cheap checks the recipe and the verbs use without importing torch or transformers.
Loading is load.py, the wrapper modules modules.py, writing a folder back save.py, what a folder holds folder.py.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from optcli.errors import BadInput

EXTRA = "pip install 'optcli[hf]'"
OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


def is_folder(path: Path) -> bool:
    """A Hugging Face model folder: a directory holding config.json."""
    path = Path(path)
    return path.is_dir() and (path / "config.json").is_file()


def require_transformers(what: Path):
    try:
        import transformers
    except ImportError:
        raise BadInput(
            f"{what} is a Hugging Face model folder; reading it needs transformers, the hf extra: {EXTRA}"
        ) from None
    return transformers


@contextlib.contextmanager
def offline():
    """No hub call can happen inside: offline variables set (and put back), transformers' chatter silenced."""
    saved = {k: os.environ.get(k) for k in OFFLINE_ENV}
    os.environ.update(OFFLINE_ENV)
    import huggingface_hub.constants as hub
    from transformers.utils import logging as tf_logging

    # huggingface_hub reads HF_HUB_OFFLINE once, at import: a process that imported it earlier needs the constant set too.
    was_offline, hub.HF_HUB_OFFLINE = hub.HF_HUB_OFFLINE, True
    verbosity = tf_logging.get_verbosity()
    tf_logging.set_verbosity_error()
    tf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hub.HF_HUB_OFFLINE = was_offline
        tf_logging.set_verbosity(verbosity)
        tf_logging.enable_progress_bar()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
