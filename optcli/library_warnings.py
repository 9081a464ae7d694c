"""Catch what the libraries say while a pass runs (ONNX Runtime's quantizer, the exporters) for the report.

Their log lines and UserWarnings matter to users but, printed to the terminal, they break `--json` pipes and
drown the progress lines; the report's `warnings` list is where a user looks for them.
"""

from __future__ import annotations

import contextlib
import logging
import warnings

from optcli.errors import first_line

# Internal deprecations of torch/onnx plumbing are not actionable by a user of optcli.
_IGNORED = (DeprecationWarning, FutureWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning)


class _Collector(logging.Handler):
    def __init__(self):
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
def captured(limit: int = 10):
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
        for message in dict.fromkeys(first_line(m) for m in messages if m.strip()):
            if len(collected) < limit:
                collected.append(message)
