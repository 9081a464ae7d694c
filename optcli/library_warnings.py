"""Catch what the libraries say while a pass runs (ONNX Runtime's quantizer, the exporters) for the report.

Their log lines and UserWarnings matter to users but, printed to the terminal, they break `--json` pipes and
drown the progress lines; the report's `warnings` list is where a user looks for them.
"""

from __future__ import annotations

import contextlib
import logging
import re
import warnings
from collections.abc import Sequence

from optcli.errors import first_line

# Internal deprecations of torch/onnx plumbing are not actionable by a user of optcli.
_IGNORED = (DeprecationWarning, FutureWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning)


class _Collector(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(f"{record.name}: {record.getMessage()}")


@contextlib.contextmanager
def quiet_loggers(*names: str, level: int = logging.CRITICAL):
    """Raise the level of these loggers inside the block (each one: torch gives its module loggers their own)."""
    loggers = [logging.getLogger(n) for n in names]
    previous = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(level)
    try:
        yield
    finally:
        for lg, lvl in zip(loggers, previous, strict=True):
            lg.setLevel(lvl)


@contextlib.contextmanager
def captured(limit: int = 200):
    """Yields a list that receives, once each, the library warnings raised inside the block."""
    collected: list[str] = []
    handler = _Collector()
    root = logging.getLogger()
    propagate = logging.lastResort
    root.addHandler(handler)
    logging.lastResort = None  # the root handler above now receives what would have gone to stderr
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield collected
    finally:
        root.removeHandler(handler)
        logging.lastResort = propagate
        messages = handler.messages + [
            f"{w.category.__name__}: {w.message}" for w in caught if not issubclass(w.category, _IGNORED)
        ]
        for message in dict.fromkeys(shortened(m) for m in messages if m.strip()):
            if len(collected) < limit:
                collected.append(message)


def shortened(message: str, limit: int = 300) -> str:
    """The message's first line; past `limit` characters, cut after its last whole sentence that fits (else its last
    whole word) and marked with "…", never mid-word (torch's export warnings run to a paragraph on one line)."""
    line = first_line(message, limit=len(message) + 1)
    if len(line) <= limit:
        return line
    head = line[: limit - 1]
    sentence = max(head.rfind(". "), head.rfind("; "), head.rfind(": "))
    if sentence >= limit // 2:
        return head[: sentence + 1] + " …"
    word = head.rfind(" ")
    return (head[:word] if word > 0 else head).rstrip(" ,;:") + "…"


# What a library's message means for the user, and what to do: (pattern, key, words(count, captured names)).
_KNOWN = (
    (
        re.compile(r"Please consider to run pre-processing before quantization"),
        "preprocess",
        lambda n, names: (
            "quantized without ONNX Runtime's pre-processing (shape inference, graph optimization), which can leave "
            "ops unquantized or slower; keep `preprocess: true` (the default) unless it fails on this model"
        ),
    ),
    (
        re.compile(r"Axis (\d+) is out-of-range for weight '([^']*)' with rank (\d+)"),
        "per_channel_rank",
        lambda n, names: (
            f"per_channel: {n} weight(s) with no channel axis (rank 1, e.g. {names[0]}) were quantized per-tensor; "
            "nothing to fix (they are BatchNorm-like scales: folding them into the convs first removes them)"
        ),
    ),
)
# A logger's or warning class's name in front of a message tells the user nothing ("root: ...").
_SPEAKER = re.compile(r"^(root|onnxruntime[\w.]*|onnx[\w.]*|torch[\w.]*|py\.warnings|[A-Z]\w*Warning): ")


def in_words(messages: list[str], already: Sequence[str] = ()) -> tuple[list[str], list[str]]:
    """(what the user reads, the original texts for the report's details).

    Each kind of known message once, in optcli's words with its cause and fix (repeats counted, not listed);
    others without the logger's name. A message optcli already said in its own words (pre-processing skipped)
    is not said again.
    """
    found: dict[str, list[str]] = {}
    plain: list[str] = []
    for message in messages:
        text = _SPEAKER.sub("", message, count=1)
        for pattern, key, _ in _KNOWN:
            hit = pattern.search(text)
            if hit:
                found.setdefault(key, []).append(hit.group(2) if hit.re.groups >= 2 else text)
                break
        else:
            plain.append(text)
    if any("pre-processing skipped" in w for w in already):
        found.pop("preprocess", None)
    words = [describe(len(found[key]), found[key]) for _, key, describe in _KNOWN if key in found]
    return words + plain[:10], list(messages)
