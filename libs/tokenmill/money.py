"""Money and physical quantities as exact decimals. Floats never touch an amount."""

from __future__ import annotations

from decimal import ROUND_HALF_EVEN, Context, Decimal

TOKENS_PER_MILLION = Decimal(1_000_000)
JOULES_PER_KWH = Decimal(3_600_000)
SECONDS_PER_HOUR = Decimal(3_600)
# Internal amounts keep this many decimal places; only invoice lines round to cents.
AMOUNT_PLACES = Decimal("0.000000000001")


def to_decimal(value: float | int | str | Decimal) -> Decimal:
    """Convert a measured float through its shortest repr, never through binary expansion."""
    if isinstance(value, Decimal):
        return value
    if isinstance(value, float):
        return Decimal(repr(value))
    return Decimal(value)


# Built once: entering a localcontext per amount cost more than the quantize itself.
_AMOUNT_CONTEXT = Context(prec=40, rounding=ROUND_HALF_EVEN)


def quantize_amount(value: Decimal) -> Decimal:
    return value.quantize(AMOUNT_PLACES, context=_AMOUNT_CONTEXT)


JOULES_PER_TOKEN_PLACES = Decimal("0.000000001")


def joules_per_token(energy_j: Decimal, tokens: int) -> Decimal | None:
    """A request's joules per token (to the nanojoule); None for no tokens."""
    return (energy_j / tokens).quantize(JOULES_PER_TOKEN_PLACES) if tokens else None
