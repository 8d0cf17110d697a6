"""Tiny SVG charts for the benchmark report: grouped bars and lines, log or linear axes.

Written by hand so that `make bench` draws its plots with the standard library alone and no
network. The output is plain SVG 1.1 that GitHub and browsers render.
"""

from __future__ import annotations

import math
from html import escape

PALETTE = ["#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948", "#b07aa1"]
FONT = 'font-family="Helvetica, Arial, sans-serif"'


def _nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if hi <= lo:
        hi = lo + 1
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = min((m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw), default=10 * mag)
    start = math.floor(lo / step) * step
    ticks = [round(start, 10)]
    while ticks[-1] < hi - step * 1e-9:
        ticks.append(round(ticks[-1] + step, 10))
    return ticks


def _log_ticks(lo: float, hi: float) -> list[float]:
    a, b = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
    return [10.0 ** e for e in range(a, b + 1)]


def _fmt(v: float) -> str:
    if v >= 1e6:
        return f"{v / 1e6:g}M"
    if v >= 1e3:
        return f"{v / 1e3:g}k"
    if v == int(v):
        return str(int(v))
    return f"{v:g}"


class _Axis:
    def __init__(self, lo: float, hi: float, top: float, bottom: float, log: bool):
        self.log = log
        if log:
            lo = max(lo, 1e-9)
            self.ticks = _log_ticks(lo, hi)
            self.lo, self.hi = math.log10(self.ticks[0]), math.log10(self.ticks[-1])
        else:
            self.ticks = _nice_ticks(min(0.0, lo), hi)
            self.lo, self.hi = self.ticks[0], self.ticks[-1]
        self.top, self.bottom = top, bottom

    def __call__(self, v: float) -> float:
        x = math.log10(max(v, 1e-9)) if self.log else v
        frac = (x - self.lo) / ((self.hi - self.lo) or 1)
        return self.bottom - frac * (self.bottom - self.top)


def _frame(width: int, height: int, title: str) -> list[str]:
    return [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}">',
        f'<rect width="{width}" height="{height}" fill="white"/>',
        f'<text x="{width / 2}" y="22" text-anchor="middle" font-size="15" font-weight="bold" '
        f'{FONT}>{escape(title)}</text>',
    ]


def _legend(labels: list[str], x: float, y: float) -> list[str]:
    out = []
    for i, label in enumerate(labels):
        yy = y + i * 17
        out.append(f'<rect x="{x}" y="{yy - 10}" width="12" height="12" '
                   f'fill="{PALETTE[i % len(PALETTE)]}"/>')
        out.append(f'<text x="{x + 17}" y="{yy}" font-size="12" {FONT}>{escape(label)}</text>')
    return out


def _y_axis(ax: _Axis, left: float, right: float, label: str, mid_y: float) -> list[str]:
    out = []
    for t in ax.ticks:
        y = ax(t)
        out.append(f'<line x1="{left}" y1="{y:.1f}" x2="{right}" y2="{y:.1f}" stroke="#e5e5e5"/>')
        out.append(f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end" font-size="11" '
                   f'{FONT}>{_fmt(t)}</text>')
    out.append(f'<text x="16" y="{mid_y}" text-anchor="middle" font-size="12" {FONT} '
               f'transform="rotate(-90 16 {mid_y})">{escape(label)}</text>')
    return out


def bars(title: str, categories: list[str], series: list[tuple[str, list[float | None]]],
         ylabel: str, log: bool = False, width: int = 820, height: int = 400,
         annotate: list[str] | None = None) -> str:
    """Grouped bars: one group per category, one bar per series. None values are skipped."""
    left, right, top, bottom = 70, width - 170, 40, height - 70
    values = [v for _, vs in series for v in vs if v is not None and (v > 0 or not log)]
    if not values:
        values = [1.0]
    ax = _Axis(min(values), max(values) * (1.0 if log else 1.08), top, bottom, log)
    out = _frame(width, height, title) + _y_axis(ax, left, right, ylabel, (top + bottom) / 2)
    group_w = (right - left) / max(len(categories), 1)
    bar_w = group_w * 0.8 / max(len(series), 1)
    base = bottom if not log else ax(ax.ticks[0])
    for ci, cat in enumerate(categories):
        gx = left + ci * group_w + group_w * 0.1
        for si, (_, vs) in enumerate(series):
            v = vs[ci] if ci < len(vs) else None
            if v is None or (log and v <= 0):
                continue
            y = ax(v)
            x = gx + si * bar_w
            out.append(f'<rect x="{x:.1f}" y="{y:.1f}" width="{bar_w - 1:.1f}" '
                       f'height="{max(base - y, 0.5):.1f}" fill="{PALETTE[si % len(PALETTE)]}">'
                       f'<title>{escape(cat)}: {v:g}</title></rect>')
        cx = left + ci * group_w + group_w / 2
        out.append(f'<text x="{cx:.1f}" y="{bottom + 16}" text-anchor="middle" font-size="11" '
                   f'{FONT}>{escape(cat)}</text>')
        if annotate and ci < len(annotate) and annotate[ci]:
            out.append(f'<text x="{cx:.1f}" y="{bottom + 31}" text-anchor="middle" '
                       f'font-size="10" fill="#555" {FONT}>{escape(annotate[ci])}</text>')
    out.append(f'<line x1="{left}" y1="{bottom}" x2="{right}" y2="{bottom}" stroke="#333"/>')
    out += _legend([s for s, _ in series], right + 15, top + 12)
    out.append("</svg>")
    return "\n".join(out) + "\n"


def lines(title: str, xs: list[float], series: list[tuple[str, list[float | None]]],
          xlabel: str, ylabel: str, logx: bool = True, logy: bool = False,
          width: int = 820, height: int = 400, y2: tuple[str, list[float | None]] | None = None,
          y2label: str = "", y2_line: bool = True) -> str:
    """Lines with markers over shared x values; optional second series on a right axis."""
    left, right, top, bottom = 70, width - 200, 40, height - 60
    values = [v for _, vs in series for v in vs if v is not None] or [1.0]
    ax_y = _Axis(min(values), max(values) * (1.0 if logy else 1.08), top, bottom, logy)
    xs_pos = [x for x in xs if x > 0] or [1.0]
    ax_x = _Axis(min(xs_pos), max(xs_pos), left, right, logx)
    def px(v: float) -> float:
        x = math.log10(max(v, 1e-9)) if logx else v
        return left + (right - left) * (x - ax_x.lo) / ((ax_x.hi - ax_x.lo) or 1)

    out = _frame(width, height, title) + _y_axis(ax_y, left, right, ylabel, (top + bottom) / 2)
    for t in ax_x.ticks:
        x = px(t)
        out.append(f'<line x1="{x:.1f}" y1="{top}" x2="{x:.1f}" y2="{bottom}" stroke="#f0f0f0"/>')
        out.append(f'<text x="{x:.1f}" y="{bottom + 16}" text-anchor="middle" font-size="11" '
                   f'{FONT}>{_fmt(t)}</text>')
    out.append(f'<text x="{(left + right) / 2}" y="{bottom + 36}" text-anchor="middle" '
               f'font-size="12" {FONT}>{escape(xlabel)}</text>')

    def draw(vs, color, axis, dash="", line=True):
        pts = [(px(x), axis(v)) for x, v in zip(xs, vs) if v is not None and x > 0]
        res = []
        if line and len(pts) > 1:
            d = " ".join(f"{x:.1f},{y:.1f}" for x, y in pts)
            res.append(f'<polyline points="{d}" fill="none" stroke="{color}" stroke-width="2" '
                       f'{dash}/>')
        for (x, y), v in zip(pts, [v for x0, v in zip(xs, vs) if v is not None and x0 > 0]):
            res.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3.5" fill="{color}">'
                       f'<title>{v:g}</title></circle>')
        return res

    for i, (_, vs) in enumerate(series):
        out += draw(vs, PALETTE[i % len(PALETTE)], ax_y)
    labels = [s for s, _ in series]
    if y2:
        v2 = [v for v in y2[1] if v is not None] or [1.0]
        ax2 = _Axis(min(v2), max(v2) * 1.08, top, bottom, False)
        color = PALETTE[len(series) % len(PALETTE)]
        for t in ax2.ticks:
            out.append(f'<text x="{right + 6}" y="{ax2(t) + 4:.1f}" font-size="11" fill="{color}" '
                       f'{FONT}>{_fmt(t)}</text>')
        mid = (top + bottom) / 2
        out.append(f'<text x="{right + 52}" y="{mid}" text-anchor="middle" font-size="12" '
                   f'fill="{color}" {FONT} transform="rotate(90 {right + 52} {mid})">'
                   f'{escape(y2label)}</text>')
        out += draw(y2[1], color, ax2, 'stroke-dasharray="5,3"', line=y2_line)
        labels.append(y2[0])
    out.append(f'<line x1="{left}" y1="{bottom}" x2="{right}" y2="{bottom}" stroke="#333"/>')
    out += _legend(labels, right + 70, top + 12)
    out.append("</svg>")
    return "\n".join(out) + "\n"
