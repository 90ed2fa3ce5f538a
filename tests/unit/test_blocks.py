"""Block arithmetic: parsing, membership at the edges, wrap-around and time to the next block."""

from datetime import UTC, datetime

import pytest

from agent_gateway.catalog.blocks import parse_block, seconds_until_next


def at(hour: int, minute: int = 0, second: int = 0) -> datetime:
    return datetime(2026, 11, 25, hour, minute, second, tzinfo=UTC)


def test_a_block_contains_its_start_and_not_its_end():
    europe = parse_block("europe", "08:00-16:00")
    assert europe.contains(at(8))
    assert europe.contains(at(15, 59, 59))
    assert not europe.contains(at(16))
    assert not europe.contains(at(7, 59, 59))


def test_a_block_may_end_at_midnight_and_may_wrap_past_it():
    americas = parse_block("americas", "16:00-24:00")
    assert americas.contains(at(23, 59)) and not americas.contains(at(0))
    night = parse_block("night", "20:00-04:00")
    assert night.contains(at(22)) and night.contains(at(3, 59)) and not night.contains(at(4))
    assert night.duration_min == 8 * 60
    assert parse_block("all", "00:00-24:00").contains(at(12))


@pytest.mark.parametrize("span", ["8:00-16:00", "08:00-16:60", "25:00-26:00", "08:00-08:00",
                                  "24:30-01:00", "08:00 16:00", "", "noon-night"])
def test_malformed_spans_are_refused(span):
    with pytest.raises(ValueError):
        parse_block("x", span)


def test_seconds_until_the_next_owned_block():
    asia = parse_block("asia", "00:00-08:00")
    americas = parse_block("americas", "16:00-24:00")
    # 10:00 -> americas opens at 16:00, six hours away.
    assert seconds_until_next([asia, americas], at(10)) == 6 * 3600
    # 17:30 -> asia opens at midnight (americas' own start is almost a day away).
    assert seconds_until_next([asia], at(17, 30)) == 6 * 3600 + 30 * 60
    # Fractions of a second round up, so a client retrying after Retry-After is inside.
    assert seconds_until_next([americas], datetime(2026, 11, 25, 15, 59, 59, 500000, tzinfo=UTC)) == 1
