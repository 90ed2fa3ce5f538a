"""Bar charts as plain geometry, drawn by the templates as inline SVG (no script, no fetch)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Bar:
    x: float
    y: float
    width: float
    height: float
    value: int
    label: str


@dataclass(frozen=True)
class Tick:
    y: float
    value: int


@dataclass(frozen=True)
class XLabel:
    x: float
    text: str


@dataclass(frozen=True)
class BarChart:
    width: int
    height: int
    plot_left: int
    plot_right: int
    plot_bottom: int
    bars: tuple[Bar, ...]
    ticks: tuple[Tick, ...]
    x_labels: tuple[XLabel, ...]
    total: int

    @property
    def is_empty(self) -> bool:
        return self.total == 0


def nice_ceiling(value: int) -> int:
    """The smallest 1, 2 or 5 times a power of ten that is at least `value` (and at least 1)."""
    if value <= 1:
        return 1
    power = 10 ** math.floor(math.log10(value))
    for step in (1, 2, 5, 10):
        if step * power >= value:
            return step * power
    return 10 * power


def bar_chart(
    values: Sequence[int], labels: Sequence[str], *, width: int = 520, height: int = 190,
    max_x_labels: int = 8, axes: bool = True,
) -> BarChart:
    """Vertical bars for `values`, scaled to a rounded maximum, with a few gridlines and x labels."""
    left, right = (44, width - 22) if axes else (0, width)
    top, bottom = (8, height - 24) if axes else (0, height)
    ceiling = nice_ceiling(max(values, default=0))
    slot = (right - left) / max(1, len(values))
    gap = min(6.0, slot * 0.25)
    bars = []
    for i, (value, label) in enumerate(zip(values, labels, strict=True)):
        bar_height = (bottom - top) * value / ceiling
        # Non-zero values stay visible even when tiny next to the largest.
        if value > 0:
            bar_height = max(bar_height, 2.0)
        bars.append(Bar(x=round(left + i * slot + gap / 2, 2), y=round(bottom - bar_height, 2),
                        width=round(slot - gap, 2), height=round(bar_height, 2), value=value, label=label))
    # Gridlines at zero, the top and, when it is a whole number, the middle.
    tick_values = (0, ceiling // 2, ceiling) if ceiling % 2 == 0 else (0, ceiling)
    ticks = tuple(
        Tick(y=round(bottom - (bottom - top) * value / ceiling, 2), value=value) for value in tick_values
    ) if axes else ()
    every = max(1, math.ceil(len(values) / max_x_labels))
    x_labels = tuple(
        XLabel(x=round(left + i * slot + slot / 2, 2), text=label)
        for i, label in enumerate(labels)
        if axes and (len(labels) - 1 - i) % every == 0
    )
    return BarChart(width=width, height=height, plot_left=left, plot_right=right, plot_bottom=bottom,
                    bars=tuple(bars), ticks=ticks, x_labels=x_labels, total=sum(values))
