"""The report as a document: sections of a few kinds of block, built once (document.py) and drawn alike by every
renderer (markdown.py, html.py, terminal.py). Plain data, standard library only."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Chart:
    """A figure the HTML page draws beside a table (svg.py): "summary", "loss" (a training curve), "search"."""

    kind: str
    data: Any  # what the chart is drawn from (the report or the step, as a dict)


@dataclass
class Text:
    """A paragraph. tone: None (plain), "note" (an aside: dim, in italics)."""

    text: str
    tone: str | None = None


@dataclass
class Table:
    headers: list[str]
    rows: list[list[str]]
    wide: bool = False  # many columns: smaller type, scrolls sideways in HTML
    caption: str | None = None  # said before the table (under it in the terminal)
    chart: Chart | None = None  # drawn beside it where a renderer can
    drop: tuple[str, ...] = ()  # columns a narrow terminal may leave out (and say so), least needed first


@dataclass
class Items:
    """A bulleted list of (label or None, text); `empty` is said when there is none; tone "warn" for warnings."""

    items: list[tuple[str | None, str]]
    empty: str | None = None
    tone: str | None = None


@dataclass
class Checks:
    """Lines that held or did not (gates): (passed, text)."""

    lines: list[tuple[bool, str]]
    empty: str = "No gates."


@dataclass
class Notes:
    """Caveats about one step's figures: (step name, note)."""

    notes: list[tuple[str, str]]


@dataclass
class Charts:
    """Figures without a table (the HTML page's summary charts)."""

    charts: list[Chart]


Block = Text | Table | Items | Checks | Notes | Charts


@dataclass
class Section:
    """A titled part of the report. `step`: the step it is about (None for the report's own sections); `brief`: its
    one line in the terminal; `terminal`: the terminal draws it whole (it fits 100 columns)."""

    key: str
    title: str
    blocks: list[Block]
    step: str | None = None
    brief: str | None = None
    terminal: bool = False


@dataclass
class Document:
    """What every renderer draws: the head (verdict, evaluation, the verdict sentence and its caveats), the
    terminal's compact steps table and legend, then the sections in order."""

    verdict: str
    passed: bool | None
    evaluation: str | None
    sentence: str
    caveats: list[tuple[str, str]]  # (kind: "slower" | "busy", text)
    compact: Table
    terminal_legend: str
    sections: list[Section] = field(default_factory=list)

    def section(self, key: str) -> Section | None:
        return next((s for s in self.sections if s.key == key), None)
