"""USDC amounts: decimal strings in, integer atomic units out, nothing lossy accepted."""

import pytest

from agent_gateway.money import format_usdc, parse_usdc


@pytest.mark.parametrize("text,atomic", [("39.00", 39_000_000), ("0.000001", 1), ("14.99", 14_990_000), ("0", 0)])
def test_parse(text, atomic):
    assert parse_usdc(text) == atomic


@pytest.mark.parametrize("text", ["-1", "1.0000001", "NaN", "Infinity", "abc", "", "1e400x"])
def test_parse_refuses(text):
    with pytest.raises(ValueError):
        parse_usdc(text)


def test_parse_refuses_floats():
    with pytest.raises(ValueError):
        parse_usdc(39.0)  # type: ignore[arg-type]


@pytest.mark.parametrize("atomic,text", [(39_000_000, "39.00"), (1, "0.000001"), (14_990_000, "14.99"), (397_800_000, "397.80")])
def test_format(atomic, text):
    assert format_usdc(atomic) == text
