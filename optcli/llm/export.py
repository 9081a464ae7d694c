"""A causal-LM Hugging Face folder -> an onnxruntime-genai decoder folder, through onnxruntime-genai's model builder.

The builder is the engine of the field (GroupQueryAttention, rotary embeddings, MatMulNBits int4/int8, external
data, genai_config.json and the tokenizer files beside the model). It runs in a child process: its peak resident
memory is then its own (measured by the kernel), and a crash cannot take optcli down with it.
"""

from __future__ import annotations

import functools
import importlib.util
import re
import shutil
import time
from pathlib import Path

from optcli.errors import BadInput, first_line
from optcli.hf import OFFLINE_ENV
from optcli.hf.folder import raw_config
from optcli.llm.memory import run_child

BUILDER = "onnxruntime_genai.models.builder"
PRECISIONS = ("fp32", "int4", "int8")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


@functools.cache
def builder_architectures() -> tuple[str, ...]:
    """The `architectures` the installed builder exports, read from its dispatch (its source, not imported: the
    import costs torch and seconds)."""
    spec = importlib.util.find_spec(BUILDER)
    if spec is None or spec.origin is None:
        return ()
    source = Path(spec.origin).read_text(encoding="utf-8")
    return tuple(sorted(set(re.findall(r'config\.architectures\[0\] == "(\w+)"', source))))


def architecture(folder: Path) -> str:
    archs = raw_config(folder).get("architectures") or []
    return str(archs[0]) if archs else ""


def check_exportable(folder: Path) -> str:
    """The folder's architecture when the builder exports it and a tokenizer is beside it; else one sentence."""
    folder = Path(folder)
    if importlib.util.find_spec("onnxruntime_genai") is None:
        raise BadInput("exporting a decoder for generation needs onnxruntime-genai: pip install 'optcli[llm]'")
    arch = architecture(folder)
    supported = [a for a in builder_architectures() if not a.startswith("Whisper")]
    if arch not in supported:
        causal = [a for a in supported if a.endswith("ForCausalLM")]
        raise BadInput(
            f"{folder}: architecture {arch or '(none in config.json)'} is not one onnxruntime-genai's model builder "
            f"exports, and optcli has no other decoder export with a KV cache; supported: {', '.join(causal)}"
        )
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise BadInput(
            f"{folder}: no tokenizer beside the model (looked for {', '.join(TOKENIZER_FILES)}); save the model's "
            "tokenizer there with tokenizer.save_pretrained(folder)"
        )
    return arch


def export_decoder(
    hf_folder: Path,
    out_dir: Path,
    precision: str = "fp32",
    *,
    block_size: int | None = None,
    accuracy_level: int | None = None,
    extra_options: dict | None = None,
    execution_provider: str = "cpu",
    timeout: float | None = None,
) -> dict:
    """Write the decoder folder `out_dir` (created; must not hold files) from `hf_folder`.

    precision: fp32 | int4 | int8 (int4/int8: the builder's MatMulNBits weight-only quantization, round-to-nearest
    unless extra_options say otherwise); block_size, accuracy_level and extra_options are the builder's
    --extra_options. Returns {"engine", "precision", "options", "seconds", "peak_rss_bytes"}; raises RuntimeError
    (the builder's last words) when the builder fails."""
    if precision not in PRECISIONS:
        raise BadInput(f"precision {precision!r}: one of {', '.join(PRECISIONS)}")
    hf_folder, out_dir = Path(hf_folder), Path(out_dir)
    check_exportable(hf_folder)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise BadInput(f"{out_dir}: not empty; the decoder export writes a folder of its own")
    options = dict(extra_options or {})
    if block_size is not None:
        options["block_size"] = block_size
    if accuracy_level is not None:
        options["accuracy_level"] = accuracy_level
    cache = out_dir / ".builder-cache"  # the builder's scratch space stays inside our output, removed after
    args = ["-i", str(hf_folder), "-o", str(out_dir), "-p", precision, "-e", execution_provider]
    args += ["-c", str(cache)]
    if options:
        args += ["--extra_options", *(f"{k}={_option(v)}" for k, v in options.items())]
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    result = run_child(BUILDER, args, env=OFFLINE_ENV, timeout=timeout)
    seconds = time.perf_counter() - t0
    shutil.rmtree(cache, ignore_errors=True)
    if result.returncode != 0 or not (out_dir / "genai_config.json").is_file():
        said = [line for line in (result.stderr + result.stdout).splitlines() if line.strip()]
        raise RuntimeError(f"onnxruntime-genai's model builder failed: {first_line(said[-1] if said else '?')}")
    return {
        "engine": f"onnxruntime-genai {_version()} model builder",
        "precision": precision,
        "options": options,
        "seconds": round(seconds, 3),
        "peak_rss_bytes": result.peak_rss_bytes,
    }


def _option(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    return str(value)


def _version() -> str:
    from importlib.metadata import version

    return version("onnxruntime-genai")
