"""Daily UTC time blocks: parsing `HH:MM-HH:MM`, "is now inside", and seconds to the next one."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime

MINUTES_PER_DAY = 24 * 60
_SPAN = re.compile(r"^(\d{2}):(\d{2})-(\d{2}):(\d{2})$")

DEFAULT_BLOCKS = {
    "asia": "00:00-08:00",
    "europe": "08:00-16:00",
    "americas": "16:00-24:00",
}


@dataclass(frozen=True)
class Block:
    """A named window [start, end) in minutes after UTC midnight; end <= start wraps past midnight."""

    name: str
    start_min: int
    end_min: int

    @property
    def hours_utc(self) -> str:
        return f"{_hhmm(self.start_min)}-{_hhmm(self.end_min)}"

    @property
    def label(self) -> str:
        """How the API shows a block's hours: "08:00-16:00 UTC"."""
        return f"{self.hours_utc} UTC"

    @property
    def duration_min(self) -> int:
        return (self.end_min - self.start_min) % MINUTES_PER_DAY or MINUTES_PER_DAY

    def contains(self, at: datetime) -> bool:
        return (_minute_of_day(at) - self.start_min) % MINUTES_PER_DAY < self.duration_min


def parse_block(name: str, span: str) -> Block:
    """Parse `HH:MM-HH:MM` (24:00 allowed as an end); raise ValueError with a readable reason."""
    match = _SPAN.match(span.strip()) if isinstance(span, str) else None
    if not match:
        raise ValueError(f"{span!r} is not of the form HH:MM-HH:MM")
    sh, sm, eh, em = (int(g) for g in match.groups())
    if sh > 23 or sm > 59 or em > 59 or eh > 24 or (eh == 24 and em != 0):
        raise ValueError(f"{span!r} is not a valid time of day")
    start, end = sh * 60 + sm, eh * 60 + em
    if start == end % MINUTES_PER_DAY and end != MINUTES_PER_DAY:
        raise ValueError(f"{span!r} is empty (start equals end)")
    return Block(name=name, start_min=start, end_min=end)


def seconds_until_next(blocks: Iterable[Block], at: datetime) -> int:
    """Whole seconds from `at` until the earliest start among `blocks` (rounded up, at least 1)."""
    at = at.astimezone(UTC)
    now_s = _minute_of_day(at) * 60 + at.second + at.microsecond / 1e6
    waits = [((b.start_min * 60 - now_s) % (MINUTES_PER_DAY * 60)) for b in blocks]
    if not waits:
        raise ValueError("no blocks")
    wait = min(waits)
    return max(1, int(-(-wait // 1)))


def _minute_of_day(at: datetime) -> int:
    at = at.astimezone(UTC)
    return at.hour * 60 + at.minute


def _hhmm(minutes: int) -> str:
    return f"{minutes // 60:02d}:{minutes % 60:02d}"
