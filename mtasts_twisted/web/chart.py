"""
Charts drawn on the server as SVG (no script in the page): stacked bars
per hour (L{hourly_chart}) and horizontal bars of totals (L{bar_chart}).

They are L{twisted.web.template} tags, so every label is escaped when the
page is flattened.  Each bar is a C{<rect>} with class C{point} and a
C{data-value}, so a test (or a browser) can count the data points.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from twisted.web.template import Tag

from mtasts_twisted.web.data import Series

__all__ = ["FAILURE_PALETTE", "LOOKUP_COLOURS", "OUTCOME_COLOURS", "PALETTE", "bar_chart", "hourly_chart", "outcome_colour"]

#: Fill colours, one per series in turn.
PALETTE = ("#1565c0", "#6a1b9a", "#00838f", "#ef6c00", "#5d4037", "#455a64", "#ad1457", "#2e7d32",
           "#f9a825", "#c62828")

#: Fill colours of failures: reds, oranges and purples.
FAILURE_PALETTE = ("#c62828", "#ef6c00", "#ad1457", "#6a1b9a", "#8d6e63", "#f9a825", "#d84315", "#4527a0",
                   "#880e4f", "#bf360c")

#: Socketmap answers' colours: ok, notfound, temp, perm.
LOOKUP_COLOURS = ("#2e7d32", "#90a4ae", "#fb8c00", "#c62828")

#: Delivery outcomes' colours (green, amber, red), one shade per policy mode.
OUTCOME_COLOURS = {
    "delivered": ("#1b5e20", "#43a047", "#81c784", "#a5d6a7"),
    "transient": ("#e65100", "#fb8c00", "#ffb74d", "#ffe0b2"),
    "permanent": ("#b71c1c", "#e53935", "#ef9a9a", "#ffcdd2"),
}


def outcome_colour(label: str, modes: Sequence[str]) -> str:
    """
    The colour of an C{outcome/mode} series: its outcome's hue, its mode's
    shade (darker for C{enforce}).
    """
    outcome, _, mode = label.partition("/")
    shades = OUTCOME_COLOURS.get(outcome)
    if shades is None:
        return PALETTE[0]
    return shades[modes.index(mode) % len(shades)] if mode in modes else shades[-1]

_WIDTH = 720
_HEIGHT = 220
_LEFT = 40
_BOTTOM = 24
_LEGEND = 16


def _svg(width: int, height: int, label: str) -> Tag:
    return Tag("svg", attributes={
        "xmlns": "http://www.w3.org/2000/svg", "width": str(width), "height": str(height),
        "viewBox": f"0 0 {width} {height}", "role": "img", "aria-label": label, "class": "chart"})


def hourly_chart(title: str, hours: Sequence[float], series: Sequence[Series],
                 colours: Sequence[str] = PALETTE) -> Tag:
    """
    Stacked bars, one per hour, one colour per series, with a legend.

    @param title: the chart's accessible name.
    @param hours: the start of each hour (POSIX time), oldest first.
    @param series: the L{Series}, each with one point per hour.
    @param colours: the series' colours in turn.
    """
    legend_rows = (len(series) + 3) // 4
    height = _HEIGHT + legend_rows * _LEGEND
    svg = _svg(_WIDTH, height, title)
    plot_h = _HEIGHT - _BOTTOM - 10
    totals = [sum(s.points[i] for s in series) for i in range(len(hours))]
    top = max(totals, default=0) or 1
    slot = (_WIDTH - _LEFT - 10) / max(len(hours), 1)
    svg(Tag("line", attributes={"x1": str(_LEFT), "y1": str(10 + plot_h), "x2": str(_WIDTH - 10),
                                "y2": str(10 + plot_h), "stroke": "#888"}))
    svg(Tag("text", attributes={"x": "2", "y": "18", "font-size": "11"})(str(top)))
    svg(Tag("text", attributes={"x": "2", "y": str(10 + plot_h), "font-size": "11"})("0"))
    for i, hour in enumerate(hours):
        x = _LEFT + i * slot
        base = 10.0 + plot_h
        for n, s in enumerate(series):
            value = s.points[i]
            if not value:
                continue
            h = plot_h * value / top
            base -= h
            svg(Tag("rect", attributes={
                "class": "point", "x": f"{x + 1:.1f}", "y": f"{base:.1f}", "width": f"{slot - 2:.1f}",
                "height": f"{h:.1f}", "fill": colours[n % len(colours)], "data-value": str(value)})(
                Tag("title")(f"{s.label} {time.strftime('%H:00', time.gmtime(hour))}: {value}")))
        if i % 3 == 0:
            svg(Tag("text", attributes={"x": f"{x:.1f}", "y": str(_HEIGHT - 6), "font-size": "10"})(
                time.strftime("%H:00", time.gmtime(hour))))
    for n, s in enumerate(series):
        lx, ly = 10 + (n % 4) * 175, _HEIGHT + (n // 4) * _LEGEND
        svg(Tag("rect", attributes={"x": str(lx), "y": str(ly), "width": "10", "height": "10",
                                    "fill": colours[n % len(colours)]}))
        svg(Tag("text", attributes={"x": str(lx + 14), "y": str(ly + 9), "font-size": "11"})(
            f"{s.label} ({sum(s.points)})"))
    if not series:
        svg(Tag("text", attributes={"x": str(_WIDTH // 2 - 40), "y": str(_HEIGHT // 2),
                                    "font-size": "12"})("nothing yet"))
    return svg


def bar_chart(title: str, values: Sequence[tuple[str, int]], colours: Sequence[str] = PALETTE) -> Tag:
    """
    Horizontal bars of totals, one per label.

    @param title: the chart's accessible name.
    @param values: C{(label, count)} pairs.
    @param colours: the bars' colours in turn.
    """
    row = 22
    height = max(len(values), 1) * row + 10
    svg = _svg(_WIDTH, height, title)
    top = max((v for _, v in values), default=0) or 1
    for i, (label, value) in enumerate(values):
        y = 5 + i * row
        width = (_WIDTH - 260) * value / top
        svg(Tag("text", attributes={"x": "2", "y": str(y + 14), "font-size": "12"})(label))
        svg(Tag("rect", attributes={
            "class": "point", "x": "200", "y": str(y + 2), "width": f"{max(width, 1):.1f}", "height": "16",
            "fill": colours[i % len(colours)], "data-value": str(value)})(Tag("title")(f"{label}: {value}")))
        svg(Tag("text", attributes={"x": f"{204 + width:.1f}", "y": str(y + 14), "font-size": "12"})(str(value)))
    if not values:
        svg(Tag("text", attributes={"x": "2", "y": "20", "font-size": "12"})("none"))
    return svg
