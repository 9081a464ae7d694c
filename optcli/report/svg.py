"""The SVG chart kit of report.html: horizontal bars, a scatter of search candidates, a loss curve.

Hand-written SVG strings (no plotting library, no script), every label escaped.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from html import escape
from typing import Any

from optcli.report.passviews import candidate_label, search_candidates, training_epochs
from optcli.report.view import dig, finite, fmt_ms, fmt_num

BAR = "#4f7cba"
BAR_ORIGINAL = "#9aa5b1"


def _short(label: str, n: int = 24) -> str:
    return label if len(label) <= n else label[: n - 1] + "…"


def svg_bar_chart(kind: str, title: str, labels: list[str], values: list[Any], fmt: Callable[[Any], str]) -> str:
    """Horizontal bars from zero; a missing value gets no bar and "n/a"."""
    label_w, bar_w, value_w, row_h, top = 165, 260, 90, 24, 34
    width = label_w + bar_w + value_w
    height = top + row_h * len(labels) + 10
    vmax = max([v for v in values if finite(v) and v > 0] or [1.0])
    parts = [
        f'<svg class="chart" data-chart="{escape(kind)}" width="{width}" '
        f'height="{height}" viewBox="0 0 {width} {height}" role="img" aria-label="{escape(title)}">',
        f'<text x="8" y="20" font-size="14" font-weight="600">{escape(title)}</text>',
    ]
    for i, (label, v) in enumerate(zip(labels, values, strict=False)):
        y = top + i * row_h
        parts.append(
            f'<text x="{label_w - 8}" y="{y + 16}" font-size="12" text-anchor="end">'
            f"<title>{escape(label)}</title>{escape(_short(label))}</text>"
        )
        if finite(v) and v > 0:
            w = max(1.0, bar_w * v / vmax)
            color = BAR_ORIGINAL if i == 0 else BAR
            parts.append(f'<rect x="{label_w}" y="{y + 3}" width="{w:.1f}" height="{row_h - 8}" fill="{color}"/>')
            parts.append(f'<text x="{label_w + w + 5:.1f}" y="{y + 16}" font-size="12">{escape(fmt(v))}</text>')
        else:
            text = fmt(v) if finite(v) else "n/a"
            parts.append(f'<text x="{label_w + 5}" y="{y + 16}" font-size="12" fill="#888">{escape(text)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """Round-numbered ticks (steps of 1, 2 or 5 x 10^k) inside [lo, hi], at most about n of them."""
    step = 10 ** math.floor(math.log10((hi - lo) / n))
    for m in (1, 2, 5, 10):
        if (hi - lo) / (step * m) <= n:
            step *= m
            break
    first = math.ceil(lo / step)
    return [k * step for k in range(first, math.floor(hi / step) + 1)]


def _span(values: list[float], pad: float = 0.08) -> tuple[float, float]:
    lo, hi = min(values), max(values)
    if hi == lo:
        d = abs(lo) * 0.05 or 1.0
        return lo - d, hi + d
    d = (hi - lo) * pad
    return lo - d, hi + d


class _Plot:
    """Maps data to pixels inside a fixed plot area and draws the axes."""

    def __init__(
        self, xs: list[float], ys: list[float], width: int = 460, height: int = 300, xticks: list[float] | None = None
    ):
        self.w, self.h, self.xticks = width, height, xticks
        self.left, self.right, self.top, self.bottom = 64, 16, 34, 44
        self.x0, self.x1 = _span(xs)
        self.y0, self.y1 = _span(ys)

    def px(self, x: float) -> float:
        return self.left + (x - self.x0) / (self.x1 - self.x0) * (self.w - self.left - self.right)

    def py(self, y: float) -> float:
        return self.h - self.bottom - (y - self.y0) / (self.y1 - self.y0) * (self.h - self.top - self.bottom)

    def frame(self, kind: str, title: str, xlabel: str, ylabel: str) -> list[str]:
        w, h, lft, bot = self.w, self.h, self.left, self.h - self.bottom
        out = [
            f'<svg class="chart" data-chart="{escape(kind)}" width="{w}" height="{h}" '
            f'viewBox="0 0 {w} {h}" role="img" aria-label="{escape(title)}">',
            f'<text x="8" y="20" font-size="14" font-weight="600">{escape(title)}</text>',
            f'<line x1="{lft}" y1="{bot}" x2="{w - self.right}" y2="{bot}" stroke="#444"/>',
            f'<line x1="{lft}" y1="{self.top}" x2="{lft}" y2="{bot}" stroke="#444"/>',
            f'<text x="{(lft + w - self.right) / 2:.1f}" y="{h - 6}" font-size="12" text-anchor="middle">{escape(xlabel)}</text>',
            f'<text x="12" y="{(self.top + bot) / 2:.1f}" font-size="12" text-anchor="middle" '
            f'transform="rotate(-90 12 {(self.top + bot) / 2:.1f})">{escape(ylabel)}</text>',
        ]
        for t in self.xticks or _ticks(self.x0, self.x1):
            x = self.px(t)
            out.append(f'<line x1="{x:.1f}" y1="{bot}" x2="{x:.1f}" y2="{bot + 4}" stroke="#444"/>')
            out.append(
                f'<text x="{x:.1f}" y="{bot + 16}" font-size="10" text-anchor="middle">{escape(f"{t:.3g}")}</text>'
            )
        for t in _ticks(self.y0, self.y1):
            y = self.py(t)
            out.append(f'<line x1="{lft}" y1="{y:.1f}" x2="{w - self.right}" y2="{y:.1f}" stroke="#eee"/>')
            out.append(
                f'<text x="{lft - 6}" y="{y + 3:.1f}" font-size="10" text-anchor="end">{escape(f"{t:.4g}")}</text>'
            )
        return out


def svg_scatter(step: dict) -> str:
    """Search candidates: latency (x) vs metric (y), chosen ones highlighted, target as a dashed line."""
    cands, target = search_candidates(step)
    pts = [
        (c["latency_ms"], c["metric"], bool(c.get("chosen")), candidate_label(c, i))
        for i, c in enumerate(cands)
        if finite(c.get("latency_ms")) and finite(c.get("metric"))
    ]
    if not pts:
        return ""
    ys = [p[1] for p in pts] + ([target] if finite(target) else [])
    plot = _Plot([p[0] for p in pts], ys)
    out = plot.frame("search", f"{step.get('name')}: search candidates", "latency p50 (ms)", "metric")
    if finite(target):
        y = plot.py(target)
        out.append(
            f'<line x1="{plot.left}" y1="{y:.1f}" x2="{plot.w - plot.right}" y2="{y:.1f}" '
            f'stroke="#b91c1c" stroke-dasharray="5,4"/>'
        )
        out.append(
            f'<text x="{plot.w - plot.right - 4}" y="{y - 4:.1f}" font-size="11" fill="#b91c1c" '
            f'text-anchor="end">{escape(f"target {fmt_num(target)}")}</text>'
        )
    for x, y, chosen, label in sorted(pts, key=lambda p: p[2]):  # chosen drawn last, on top
        fill, r = ("#15803d", 6) if chosen else (BAR, 4)
        out.append(
            f'<circle cx="{plot.px(x):.1f}" cy="{plot.py(y):.1f}" r="{r}" fill="{fill}" fill-opacity="0.85">'
            f"<title>{escape(f'{label}: {fmt_ms(x)} ms, {fmt_num(y)}')}</title></circle>"
        )
        if chosen:
            out.append(
                f'<text x="{plot.px(x) + 8:.1f}" y="{plot.py(y) - 6:.1f}" font-size="11" fill="#15803d">'
                f"{escape(f'chosen: {label}')}</text>"
            )
    out.append("</svg>")
    return "".join(out)


def svg_loss_curve(step: dict) -> str:
    """Training loss per epoch as a polyline with points; the best epoch is marked."""
    pts = [(e["epoch"], e["loss"]) for e in training_epochs(step) if finite(e.get("epoch")) and finite(e.get("loss"))]
    if not pts:
        return ""
    best = dig(step, "details", "training", "best_epoch")
    epochs = [p[0] for p in pts]
    every = max(1, math.ceil(len(epochs) / 10))
    plot = _Plot(epochs, [p[1] for p in pts], xticks=epochs[::every])
    out = plot.frame("training", f"{step.get('name')}: training loss", "epoch", "loss")
    line = " ".join(f"{plot.px(x):.1f},{plot.py(y):.1f}" for x, y in pts)
    out.append(f'<polyline points="{line}" fill="none" stroke="{BAR}" stroke-width="2"/>')
    for x, y in pts:
        is_best = x == best
        out.append(
            f'<circle cx="{plot.px(x):.1f}" cy="{plot.py(y):.1f}" r="{5 if is_best else 3}" '
            f'fill="{"#15803d" if is_best else BAR}"><title>{escape(f"epoch {x}: loss {fmt_num(y)}")}</title></circle>'
        )
    out.append("</svg>")
    return "".join(out)


def svg_pareto(points: list[dict], xlabel: str, ylabel: str, fmt_x: Callable[[Any], str], stairs: bool = True) -> str:
    """A sweep's variants: x (size or latency) vs the metric; the Pareto front joined as a staircase (stairs:
    a front over two objectives), the best variant ringed, variants failing a gate hollow, the original as a grey
    square.

    points: {label, x, y, front, best, passed, original?, r? (marker radius: a third objective)} each."""
    pts = [p for p in points if finite(p.get("x")) and finite(p.get("y"))]
    if not pts:
        return ""
    plot = _Plot([p["x"] for p in pts], [p["y"] for p in pts], width=560, height=340)
    out = plot.frame("pareto", f"{ylabel} vs {xlabel}", xlabel, ylabel)
    front = sorted((p for p in pts if p.get("front")), key=lambda p: p["x"])
    if stairs and len(front) > 1:
        steps = [(front[0]["x"], front[0]["y"])]
        for p in front[1:]:
            steps += [(p["x"], steps[-1][1]), (p["x"], p["y"])]
        line = " ".join(f"{plot.px(x):.1f},{plot.py(y):.1f}" for x, y in steps)
        out.append(f'<polyline class="front" points="{line}" fill="none" stroke="#15803d" stroke-width="2"/>')
    for p in pts:
        x, y = plot.px(p["x"]), plot.py(p["y"])
        label = str(p["label"])
        tip = f"<title>{escape(label + ': ' + fmt_x(p['x']) + ', ' + fmt_num(p['y']))}</title>"
        if p.get("original"):
            out.append(
                f'<rect x="{x - 5:.1f}" y="{y - 5:.1f}" width="10" height="10" fill="{BAR_ORIGINAL}">{tip}</rect>'
            )
            out.append(f'<text x="{x + 8:.1f}" y="{y + 4:.1f}" font-size="11" fill="#555">original</text>')
            continue
        color = "#15803d" if p.get("front") else BAR
        fill = color if p.get("passed") else "#fff"
        out.append(
            f'<circle class="variant{" front" if p.get("front") else ""}" cx="{x:.1f}" cy="{y:.1f}" '
            f'r="{p.get("r", 5):.1f}" fill="{fill}" fill-opacity="0.8" stroke="{color}" stroke-width="2">{tip}</circle>'
        )
        if p.get("best"):
            ring = p.get("r", 5) + 5
            out.append(
                f'<circle cx="{x:.1f}" cy="{y:.1f}" r="{ring:.1f}" fill="none" stroke="#b45309" stroke-width="2"/>'
            )
            out.append(
                f'<text x="{x + 12:.1f}" y="{y - 8:.1f}" font-size="11" fill="#b45309">'
                f"{escape('best: ' + _short(label, 40))}</text>"
            )
    out.append("</svg>")
    return "".join(out)


def svg_history(points: list[dict], ylabel: str) -> str:
    """A study's trials in the order they finished: the metric of each (failed ones as red crosses at the
    bottom), the best-so-far among finished ones as a line. points: {trial, y, failed} each."""
    done = [p for p in points if finite(p.get("y"))]
    if not points or not done:
        return ""
    plot = _Plot([p["trial"] for p in points], [p["y"] for p in done], width=560, height=300)
    out = plot.frame("history", f"trial history: {ylabel}", "trial", ylabel)
    low = plot.y0
    for p in points:
        x, n = plot.px(p["trial"]), p["trial"]
        if not finite(p.get("y")):
            y = plot.py(low) - 4
            out.append(
                f'<path class="failed" d="M{x - 4:.1f},{y - 4:.1f} l8,8 m0,-8 l-8,8" stroke="#b91c1c" stroke-width="2">'
                f"<title>trial {escape(str(n))}: failed</title></path>"
            )
            continue
        out.append(
            f'<circle class="trial" cx="{x:.1f}" cy="{plot.py(p["y"]):.1f}" r="4" fill="{BAR}">'
            f"<title>trial {escape(str(n))}: {escape(fmt_num(p['y']))}</title></circle>"
        )
    best, line = None, []
    for p in sorted(done, key=lambda p: p["trial"]):
        best = p["y"] if best is None or (p["y"] > best if p.get("higher", True) else p["y"] < best) else best
        line.append(f"{plot.px(p['trial']):.1f},{plot.py(best):.1f}")
    if len(line) > 1:
        out.append(f'<polyline class="best-so-far" points="{" ".join(line)}" fill="none" stroke="#15803d"/>')
    out.append("</svg>")
    return "".join(out)
