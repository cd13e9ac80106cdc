"""The dashboard's chart: sent, deferred and failed per hour over 24 hours, drawn as SVG on the server.

No chart library and nothing from the network; styled by app.css, so the CSP's
no-inline-style rule holds. The page carries the same numbers as a table.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

SERIES = (("sent", "Sent"), ("deferred", "Deferred"), ("failed", "Failed"))
WIDTH, HEIGHT = 720, 220
LEFT, RIGHT, TOP, BOTTOM = 44, 8, 10, 26  # room for the axis labels


@dataclass(frozen=True)
class Bar:
    series: str
    x: float
    y: float
    width: float
    height: float


@dataclass(frozen=True)
class Hour:
    start: float
    label: str  # "14:00"
    counts: dict[str, int]
    bars: list[Bar]
    x: float  # the slot's left edge
    width: float

    @property
    def title(self) -> str:
        parts = ", ".join(f"{self.counts[key]} {name.lower()}" for key, name in SERIES)
        return f"{self.label}–{time.strftime('%H:00', time.gmtime(self.start + 3600))} UTC: {parts}"


@dataclass
class Chart:
    hours: list[Hour]
    top: int  # the value of the highest gridline
    gridlines: list[tuple[float, int]] = field(default_factory=list)  # (y, value)
    width: int = WIDTH
    height: int = HEIGHT
    left: int = LEFT
    bottom_y: float = HEIGHT - BOTTOM

    @property
    def totals(self) -> dict[str, int]:
        return {key: sum(h.counts[key] for h in self.hours) for key, _ in SERIES}

    @property
    def empty(self) -> bool:
        return not any(self.totals.values())

    @property
    def description(self) -> str:
        totals = self.totals
        return (f"Over the last {len(self.hours)} hours: " +
                ", ".join(f"{totals[key]} {name.lower()}" for key, name in SERIES) + ".")


def nice_top(value: int) -> int:
    """The smallest of 1, 2, 5, 10, 20, 50... (times a power of ten) that is at least ``value``."""
    if value <= 1:
        return 1
    magnitude = 10 ** int(math.floor(math.log10(value)))
    for step in (1, 2, 5, 10):
        if step * magnitude >= value:
            return step * magnitude
    return 10 * magnitude


def build_chart(hourly: list[tuple[int, dict[str, int]]]) -> Chart:
    """Stacked bars, one slot per hour, oldest on the left."""
    plot_width = WIDTH - LEFT - RIGHT
    plot_height = HEIGHT - TOP - BOTTOM
    top = nice_top(max((sum(c.values()) for _, c in hourly), default=0))
    slot = plot_width / max(len(hourly), 1)
    bar_width = slot * 0.7
    hours = []
    for index, (start, counts) in enumerate(hourly):
        x = LEFT + index * slot
        base = float(TOP + plot_height)
        bars = []
        for key, _ in SERIES:
            height = plot_height * counts.get(key, 0) / top
            if height > 0:
                base -= height
                bars.append(Bar(key, round(x + (slot - bar_width) / 2, 2), round(base, 2), round(bar_width, 2),
                                round(height, 2)))
        hours.append(Hour(float(start), time.strftime("%H:00", time.gmtime(start)),
                          {key: counts.get(key, 0) for key, _ in SERIES}, bars, round(x, 2), round(slot, 2)))
    grid = [(round(TOP + plot_height * (1 - fraction), 2), int(top * fraction)) for fraction in (0, 0.5, 1)
            if fraction == 0 or top * fraction == int(top * fraction)]
    return Chart(hours, top, grid)
