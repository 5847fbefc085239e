"""The report as one self-contained SVG picture, from a `Tally`; no I/O, no dependency.

Two panels: the give-up curve (hang-ups and early talk by seconds waited, with the
share of held clients each delay would repel) and the verdicts over time.
"""

from __future__ import annotations

import math
import time
from html import escape

from repeld.report.tally import BIN, CATEGORIES, LAST_BIN, Tally

__all__ = ["COLOURS", "LABELS", "legend_rows", "render_svg"]

WIDTH = 900
HEIGHT = 840
LEFT, RIGHT = 70, 830
#: A generous width of one character of the 12-pixel legend text (DejaVu Sans, the
#: widest of the fonts named, averages about 7 pixels), so that no legend outgrows
#: the picture: an entry that would pass the right edge starts a new row.
_CHAR = 7.4
_ROW = 18
FONT = 'font-family="DejaVu Sans, Helvetica, Arial, sans-serif"'

COLOURS = {
    "pass": "#43a047",
    "pass-other": "#90a4ae",
    "early-talker": "#e53935",
    "hangup": "#fb8c00",
    "would-repel": "#f48fb1",
    "dnsbl": "#6a1b9a",
    "proxy-error": "#424242",
    "share": "#1e3a8a",
}
LABELS = {
    "pass": "passed after the delay",
    "pass-other": "passed at once (trusted, nodelay, cache, dnswl)",
    "early-talker": "early talker cut off",
    "hangup": "hung up",
    "would-repel": "early talker, only logged",
    "dnsbl": "cut off by a DNS list",
    "proxy-error": "PROXY header error (balancer)",
}


def _nice_step(top: float, ticks: int = 5) -> float:
    # Counts: no step below one connection.
    raw = max(top, 1.0) / ticks
    power = 10.0 ** math.floor(math.log10(raw))
    return max(1.0, next(m * power for m in (1, 2, 5, 10) if m * power >= raw))


def _text(x: float, y: float, body: str, extra: str = "") -> str:
    return f'<text x="{x:.1f}" y="{y:.1f}" {FONT} {extra}>{escape(body)}</text>'


def _rect(x: float, y: float, w: float, h: float, colour: str, title: str) -> str:
    return (
        f'<rect x="{x:.1f}" y="{y:.1f}" width="{max(w, 0.5):.1f}" height="{h:.1f}" '
        f'fill="{colour}"><title>{escape(title)}</title></rect>'
    )


def _axes(top: float, bottom: float, ymax: float, step: float, label: str) -> list[str]:
    parts = []
    for i in range(round(ymax / step) + 1):
        y = bottom - (bottom - top) * i * step / ymax
        parts.append(f'<line x1="{LEFT}" y1="{y:.1f}" x2="{RIGHT}" y2="{y:.1f}" stroke="#e0e0e0"/>')
        parts.append(_text(LEFT - 6, y + 4, f"{i * step:g}", 'font-size="11" text-anchor="end"'))
    parts.append(
        f'<line x1="{LEFT}" y1="{bottom}" x2="{RIGHT}" y2="{bottom}" stroke="#333"/>'
        f'<line x1="{LEFT}" y1="{top}" x2="{LEFT}" y2="{bottom}" stroke="#333"/>'
    )
    mid = (top + bottom) / 2
    parts.append(
        _text(
            18,
            mid,
            label,
            f'font-size="12" text-anchor="middle" transform="rotate(-90 18 {mid:.1f})"',
        )
    )
    return parts


def legend_rows(keys: list[str], labels: dict[str, str]) -> list[list[tuple[float, str]]]:
    """The legend's entries as rows of (x, key), each row within LEFT..WIDTH - 10."""
    rows: list[list[tuple[float, str]]] = [[]]
    x: float = LEFT
    for key in keys:
        width = 17 + _CHAR * len(labels[key])
        if rows[-1] and x + width > WIDTH - 10:
            rows.append([])
            x = LEFT
        rows[-1].append((x, key))
        x += width + 16
    return rows


def _legend(y: float, keys: list[str], labels: dict[str, str]) -> list[str]:
    parts = []
    for row in legend_rows(keys, labels):
        for x, key in row:
            parts.append(
                f'<rect x="{x:.1f}" y="{y - 9:.1f}" width="12" height="12" fill="{COLOURS[key]}"/>'
            )
            parts.append(_text(x + 17, y + 1, labels[key], 'font-size="12"'))
        y += _ROW
    return parts


def _curve(tally: Tally, top: float, bottom: float) -> list[str]:
    hangups = tally.curve("hangup")
    early = tally.curve("early", "would")
    bins = len(hangups)
    ymax_raw = max([*hangups, *early, 1])
    step = _nice_step(ymax_raw)
    ymax = step * math.ceil(ymax_raw / step)
    parts = [
        _text(
            LEFT,
            top - 28,
            "Give-up curve: seconds waited before hanging up or talking",
            'font-size="15" font-weight="bold"',
        ),
    ]
    parts += _axes(top, bottom, ymax, step, "connections")
    slot = (RIGHT - LEFT) / bins
    bar = slot * 0.38
    for i in range(bins):
        x = LEFT + i * slot
        for offset, count, key in ((0.1, hangups[i], "hangup"), (0.52, early[i], "early-talker")):
            h = (bottom - top) * count / ymax
            what = LABELS[key]
            label = f"{i * BIN}+ s" if i * BIN >= LAST_BIN else f"{i * BIN}-{(i + 1) * BIN} s"
            parts.append(
                _rect(
                    x + slot * offset, bottom - h, bar, h, COLOURS[key], f"{what}, {label}: {count}"
                )
            )
        edge = f"{i * BIN}"
        parts.append(_text(x, bottom + 16, edge, 'font-size="11" text-anchor="middle"'))
    parts.append(_text(RIGHT, bottom + 16, "s", 'font-size="11" text-anchor="middle"'))
    parts.append(
        _text(
            (LEFT + RIGHT) / 2,
            bottom + 34,
            "seconds waited (elapsed)",
            'font-size="12" text-anchor="middle"',
        )
    )
    # The share of held clients a delay of x seconds repels, on the right-hand axis.
    judged = tally.judged
    if judged:
        points = []
        for i in range(bins):
            x = LEFT + (i + 1) * slot if i + 1 < bins else RIGHT
            delay = (i + 1) * BIN if i + 1 < bins else LAST_BIN
            share = tally.what_if(delay).repelled / judged
            points.append(f"{x:.1f},{bottom - (bottom - top) * share:.1f}")
        parts.append(
            f'<polyline points="{LEFT},{bottom} {" ".join(points)}" fill="none" '
            f'stroke="{COLOURS["share"]}" stroke-width="2.5"><title>share of held clients '
            f"a delay of x seconds repels</title></polyline>"
        )
        for pct in (0, 25, 50, 75, 100):
            y = bottom - (bottom - top) * pct / 100
            parts.append(
                _text(RIGHT + 6, y + 4, f"{pct}%", f'font-size="11" fill="{COLOURS["share"]}"')
            )
        mid = (top + bottom) / 2
        parts.append(
            _text(
                WIDTH - 14,
                mid,
                "repelled by a delay of x s",
                f'font-size="12" text-anchor="middle" fill="{COLOURS["share"]}" '
                f'transform="rotate(90 {WIDTH - 14} {mid:.1f})"',
            )
        )
    for delay in tally.delays_seen():
        x = LEFT + min(delay, LAST_BIN + BIN) / (LAST_BIN + BIN) * (RIGHT - LEFT)
        parts.append(
            f'<line x1="{x:.1f}" y1="{top}" x2="{x:.1f}" y2="{bottom}" stroke="#333" '
            'stroke-dasharray="5,4"/>'
        )
        parts.append(_text(x + 4, top + 12, f"delay in force: {delay} s", 'font-size="11"'))
    labels = {
        **LABELS,
        "share": "share repelled by a delay of x s (at least, past the delay in force)",
    }
    parts += _legend(
        bottom + 58, ["hangup", "early-talker", "share"], {**labels, "early-talker": "early talk"}
    )
    return parts


def _over_time(tally: Tally, top: float, bottom: float) -> list[str]:
    parts = [_text(LEFT, top - 28, "Verdicts over time (UTC)", 'font-size="15" font-weight="bold"')]
    start, width, buckets = tally.over_time()
    if not buckets:
        parts.append(_text(LEFT, (top + bottom) / 2, "no timestamped events", 'font-size="13"'))
        return parts
    count = len(buckets)
    ymax_raw = max(sum(b.values()) for b in buckets)
    step = _nice_step(ymax_raw)
    ymax = step * math.ceil(ymax_raw / step)
    parts += _axes(top, bottom, ymax, step, f"connections per {_duration(width)}")
    slot = (RIGHT - LEFT) / count
    for i, bucket in enumerate(buckets):
        y = bottom
        for category in CATEGORIES:
            n = bucket[category]
            if n:
                h = (bottom - top) * n / ymax
                y -= h
                stamp = time.strftime("%Y-%m-%d %H:%M", time.gmtime(start + i * width))
                parts.append(
                    _rect(
                        LEFT + i * slot + slot * 0.08,
                        y,
                        slot * 0.84,
                        h,
                        COLOURS[category],
                        f"{stamp}: {LABELS[category]} {n}",
                    )
                )
    fmt = "%H:%M" if count * width <= 86400 else "%m-%d %H:%M"
    every = max(1, math.ceil(count / 8))
    for i in range(0, count, every):
        label = time.strftime(fmt, time.gmtime(start + i * width))
        parts.append(
            _text(LEFT + i * slot, bottom + 16, label, 'font-size="11" text-anchor="middle"')
        )
    present = [c for c in CATEGORIES if any(b[c] for b in buckets)]
    parts += _legend(bottom + 40, present, LABELS)
    return parts


def _duration(seconds: int) -> str:
    for unit, name in ((86400, "day"), (3600, "hour"), (60, "minute")):
        if seconds % unit == 0:
            n = seconds // unit
            return name if n == 1 else f"{n} {name}s"
    return f"{seconds} s"


def render_svg(tally: Tally) -> str:
    """The whole picture as an SVG document."""
    parts = [
        '<?xml version="1.0" encoding="UTF-8"?>',
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" '
        f'viewBox="0 0 {WIDTH} {HEIGHT}">',
        "<title>repeld report</title>",
        f'<rect width="{WIDTH}" height="{HEIGHT}" fill="white"/>',
        _text(
            WIDTH / 2,
            30,
            _headline(tally),
            'font-size="17" font-weight="bold" text-anchor="middle"',
        ),
    ]
    parts += _curve(tally, 110, 400)
    parts += _over_time(tally, 520, 720)
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


def _headline(tally: Tally) -> str:
    judged = tally.judged
    if not judged:
        return "repeld: no held connections in these logs"
    share = 100.0 * tally.repelled / judged
    return f"repeld repelled {tally.repelled} of {judged} held connections ({share:.1f}%)"
