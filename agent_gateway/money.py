"""USDC amounts: decimal strings at the edges, integer atomic units (6 decimals) everywhere else."""

from __future__ import annotations

from decimal import ROUND_HALF_UP, Decimal, InvalidOperation

USDC_DECIMALS = 6
ATOMIC_PER_USDC = 10**USDC_DECIMALS


def parse_usdc(text: str) -> int:
    """'39.00' -> 39_000_000. Rejects floats, negatives, NaN and more than 6 decimals."""
    if not isinstance(text, str):
        raise ValueError("must be a decimal string such as \"39.00\"")
    try:
        value = Decimal(text.strip())
    except InvalidOperation:
        raise ValueError(f"{text!r} is not a decimal number") from None
    if not value.is_finite():
        raise ValueError(f"{text!r} is not a finite number")
    if value < 0:
        raise ValueError("must not be negative")
    atomic = value * ATOMIC_PER_USDC
    if atomic != atomic.to_integral_value():
        raise ValueError(f"{text!r} has more than {USDC_DECIMALS} decimals")
    return int(atomic)


def format_usdc(atomic: int) -> str:
    """39_000_000 -> '39.00'; keeps up to 6 decimals, at least 2."""
    value = (Decimal(atomic) / ATOMIC_PER_USDC).quantize(Decimal(1).scaleb(-USDC_DECIMALS))
    text = format(value.normalize(), "f")
    whole, _, frac = text.partition(".")
    return f"{whole}.{frac.ljust(2, '0')}"


def round_atomic(value: Decimal) -> int:
    """Round a computed (discounted) atomic amount to a whole atomic unit, half up."""
    return int(value.quantize(Decimal(1), rounding=ROUND_HALF_UP))
