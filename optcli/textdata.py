"""Text files -> token arrays keyed by model input name, through the model folder's own tokenizer.

A .txt file holds one example per line; a .jsonl file one JSON object per line with a text field and,
optionally, a label field. Batches are padded to max_length (the shape every measured batch shares).
Token classification takes one label per word (a list; the text a string split on whitespace, or a list of
words): the first sub-word token of each word carries its label, the other positions IGNORE_INDEX.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from optcli.errors import BadInput

IGNORE_INDEX = -100  # label of positions a causal-LM loss / perplexity skips (padding), as in transformers


def read_texts(path: Path, text_field: str, label_field: str | None) -> tuple[list[str], list | None]:
    """Lines of a .txt, or objects of a .jsonl; blank lines are skipped."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise BadInput(f"{path}: not UTF-8 text (byte {e.start}); save it as UTF-8") from None
    if path.suffix.lower() != ".jsonl":
        texts = [line for line in lines if line.strip()]
        if not texts:
            raise BadInput(f"{path}: holds no text (one example per line)")
        return texts, None
    texts, labels = [], []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise BadInput(f"{path}:{number}: not a JSON object ({e.msg}); write one object per line") from None
        text = obj.get(text_field) if isinstance(obj, dict) else None
        words = isinstance(text, list) and bool(text) and all(isinstance(w, str) for w in text)
        if not isinstance(text, str) and not words:
            raise BadInput(
                f"{path}:{number}: no field {text_field!r} holding a string or a list of words "
                "(set text_field: to the field holding the text)"
            )
        texts.append(obj[text_field])
        if label_field is not None:
            if label_field not in obj:
                raise BadInput(f"{path}:{number}: no label field {label_field!r}")
            labels.append(obj[label_field])
    if not texts:
        raise BadInput(f"{path}: holds no examples")
    return texts, (labels if label_field is not None else None)


def jsonl_label_field(path: Path, given: str | None) -> str | None:
    """The label field: the one named, else `label`/`labels` when the first object has it."""
    if given is not None or path.suffix.lower() != ".jsonl":
        return given
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if line.strip():
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                return None
            return next((k for k in ("label", "labels") if isinstance(obj, dict) and k in obj), None)
    return None


def tokenize(tokenizer, texts: list, names: list[str], max_length: int) -> dict[str, np.ndarray]:
    texts = [" ".join(t) if isinstance(t, list) else t for t in texts]  # pre-split words, read as one text
    enc = tokenizer(texts, padding="max_length", truncation=True, max_length=max_length, return_tensors="np")
    return input_arrays(enc, names)


def input_arrays(enc, names: list[str]) -> dict[str, np.ndarray]:
    missing = [n for n in names if n not in enc]
    if missing:
        raise BadInput(f"the tokenizer gives no {', '.join(missing)} (it gives {', '.join(enc.keys())})")
    return {n: np.asarray(enc[n], dtype=np.int64) for n in names}


def label_ids(labels: list, label2id: dict | None, where: str) -> np.ndarray:
    """Integer labels as given; string labels through the model config's label2id."""
    if all(isinstance(v, int) and not isinstance(v, bool) for v in labels):
        return np.asarray(labels, dtype=np.int64)
    if all(isinstance(v, str) for v in labels):
        if not label2id:
            raise BadInput(f"{where}: string labels but the model config has no label2id; give class indices")
        unknown = sorted({v for v in labels if v not in label2id})
        if unknown:
            raise BadInput(
                f"{where}: labels {unknown[:3]} are not among the model's classes ({', '.join(list(label2id)[:8])})"
            )
        return np.asarray([label2id[v] for v in labels], dtype=np.int64)
    raise BadInput(f"{where}: labels must be class indices (integers) or class names (strings)")


def token_labels(
    tokenizer, texts: list, labels: list, names: list[str], max_length: int, label2id: dict | None, where: str
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Token classification: inputs tokenized word by word, each word's label on its first sub-word token."""
    if not getattr(tokenizer, "is_fast", False):
        raise BadInput(f"{where}: per-word labels need a fast tokenizer (tokenizer.json) to map words to tokens")
    words = [t if isinstance(t, list) else t.split() for t in texts]
    for i, (w, lab) in enumerate(zip(words, labels, strict=True), start=1):
        if not isinstance(lab, list) or len(lab) != len(w):
            given = f"{len(lab)} labels" if isinstance(lab, list) else f"a {type(lab).__name__}"
            raise BadInput(
                f"{where}: example {i} has {given} for {len(w)} words; give a list with one label per "
                "whitespace-separated word (or the words themselves as a list in the text field)"
            )
    flat = label_ids([v for lab in labels for v in lab], label2id, where)
    enc = tokenizer(
        words,
        is_split_into_words=True,
        padding="max_length",
        truncation=True,
        max_length=max_length,
        return_tensors="np",
    )
    out = np.full((len(words), enc["input_ids"].shape[1]), IGNORE_INDEX, dtype=np.int64)
    start = 0
    for i, w in enumerate(words):
        previous = None
        for j, word in enumerate(enc.word_ids(i)):
            if word is not None and word != previous:
                out[i, j] = flat[start + word]
            previous = word
        start += len(w)
    return input_arrays(enc, names), out


def next_token_labels(arrays: dict[str, np.ndarray]) -> np.ndarray:
    """Causal-LM labels: the ids themselves, padding masked out (the model shifts them inside its loss)."""
    labels = arrays["input_ids"].copy()
    if "attention_mask" in arrays:
        labels[arrays["attention_mask"] == 0] = IGNORE_INDEX
    return labels


def perplexity(logits: np.ndarray, labels: np.ndarray) -> float:
    """exp of the mean next-token cross-entropy over the positions whose label is kept."""
    logits = logits[:, :-1].astype(np.float64)
    target = labels[:, 1:]
    keep = target != IGNORE_INDEX
    if not keep.any():
        raise BadInput("perplexity: every label position is padding; give longer texts")
    shifted = logits - logits.max(-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    picked = np.take_along_axis(log_probs, np.where(keep, target, 0)[..., None], axis=-1)[..., 0]
    return float(np.exp(-(picked * keep).sum() / keep.sum()))


def check_length(max_length: int, config: dict, tokenizer, where: str) -> None:
    """Padding past the model's position table fails inside the model: refuse it here, naming the limit."""
    limits = {
        f"config.json {key}": value
        for key in ("max_position_embeddings", "n_positions")
        if isinstance(value := config.get(key), int) and value > 0
    }
    if 0 < getattr(tokenizer, "model_max_length", 0) < 1_000_000:
        limits["the tokenizer's model_max_length"] = tokenizer.model_max_length
    if limits:
        name, limit = min(limits.items(), key=lambda kv: kv[1])
        if max_length > limit:
            raise BadInput(
                f"{where}: max_length {max_length} is longer than the model takes ({limit}, {name}); set max_length: {limit} or less"
            )


def load_text(source, inputs, model, where: str) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    """(arrays keyed by input name, labels or None) from a data source with `text:`; `model` is the loaded original."""
    from optcli.hf.folder import encoder_folder, raw_config
    from optcli.hf.load import load_tokenizer

    folder = Path(source.tokenizer) if source.tokenizer is not None else encoder_folder(Path(model.path))
    task = getattr(model, "task", "") or ""
    path = Path(source.text)
    label_field = jsonl_label_field(path, source.labels)
    texts, labels = read_texts(path, source.text_field, label_field)
    if source.samples:
        texts = texts[: source.samples]
        labels = labels[: source.samples] if labels is not None else None
    names = [s.name for s in inputs]
    tokenizer = load_tokenizer(folder)
    config = raw_config(folder) if (folder / "config.json").is_file() else {}
    check_length(source.max_length, config, tokenizer, where)
    label2id = config.get("label2id")
    if task == "token-classification" and labels is not None:
        return token_labels(tokenizer, texts, labels, names, source.max_length, label2id, where)
    arrays = tokenize(tokenizer, texts, names, source.max_length)
    if task == "causal-lm":
        return arrays, next_token_labels(arrays)
    if labels is None:
        return arrays, None
    return arrays, label_ids(labels, label2id, where)
