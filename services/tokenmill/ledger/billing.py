"""Invoice arithmetic: billing periods, lines, the rounding rule and document numbers. Pure.

The rounding rule, the only one: every line's amount is its exact amount rounded to the cent
with ROUND_HALF_EVEN (banker's rounding: a half cent goes to the even cent, so halves do not
drift one way over many lines), and an invoice's subtotal, credits and total are sums of
rounded lines. A total is never rounded, so it always equals the sum of the lines shown.

A usage line is one model, tier, plan version and token class: the tokens used, the tokens
charged (past the included quota) and the amount the period's requests were rated at. Because
rating charges each request the difference it makes to the period's band price
(tokenmill.ledger.rating), the sum of a line's request charges is the band price of the line's
period total: bands are applied over the whole period with nothing to redo here. A credit line
is one reason, negative.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from decimal import ROUND_HALF_EVEN, Decimal
from typing import Literal

from tokenmill.ledger.rating import TOKEN_CLASSES, TokenClass, TokenCounts

CENT = Decimal("0.01")
PERIOD_PATTERN = re.compile(r"^(\d{4})-(\d{2})$")
DAY_PATTERN = re.compile(r"^\d{4}-\d{2}-\d{2}$")
NUMBER_DIGITS = 6
INVOICE_SERIES = "TM"
CREDIT_NOTE_SERIES = "CN"


@dataclass(frozen=True, order=True)
class Period:
    """A billing period: one calendar month, UTC."""

    start: date

    def __post_init__(self) -> None:
        assert self.start.day == 1, self.start

    @classmethod
    def parse(cls, text: str) -> Period:
        """Read "YYYY-MM"; raise ValueError saying what is wrong with anything else."""
        match = PERIOD_PATTERN.match(text)
        if match is None or not 1 <= int(match.group(2)) <= 12 or int(match.group(1)) < 1970:
            raise ValueError(f"{text!r} is not a billing period: write the month as YYYY-MM")
        return cls(date(int(match.group(1)), int(match.group(2)), 1))

    @classmethod
    def of(cls, at: datetime) -> Period:
        at = at.astimezone(UTC)
        return cls(date(at.year, at.month, 1))

    @property
    def end(self) -> date:
        """The first day of the next period (exclusive)."""
        year, month = divmod(self.start.month, 12)
        return date(self.start.year + year, month + 1, 1)

    @property
    def start_at(self) -> datetime:
        return datetime(self.start.year, self.start.month, 1, tzinfo=UTC)

    @property
    def end_at(self) -> datetime:
        return datetime(self.end.year, self.end.month, 1, tzinfo=UTC)

    def __str__(self) -> str:
        return f"{self.start.year:04d}-{self.start.month:02d}"


def parse_day(text: str) -> date:
    """Read "YYYY-MM-DD"; raise ValueError for anything else."""
    try:
        if DAY_PATTERN.match(text):
            return date.fromisoformat(text)
    except ValueError:
        pass
    raise ValueError(f"{text!r} is not a day: write it as YYYY-MM-DD")


def round_line(amount: Decimal) -> Decimal:
    """The rounding rule: to the cent, half to even."""
    return amount.quantize(CENT, rounding=ROUND_HALF_EVEN)


def document_number(series: str, year: int, number: int) -> str:
    assert number >= 1, number
    return f"{series}-{year:04d}-{number:0{NUMBER_DIGITS}d}"


@dataclass(frozen=True)
class UsageGroup:
    """A period's booked requests of one model, tier and plan version, summed."""

    model: str
    tier: str
    plan_id: str
    plan_version: str
    requests: int
    tokens: TokenCounts
    charged: TokenCounts
    revenue: dict[TokenClass, Decimal]


@dataclass(frozen=True)
class CreditGroup:
    """A period's credits of one reason, summed (amount > 0: what is given back)."""

    reason: str
    requests: int
    amount: Decimal


@dataclass(frozen=True)
class Line:
    kind: Literal["usage", "credit"]
    requests: int
    amount_exact: Decimal
    amount: Decimal
    tokens: int = 0
    charged_tokens: int = 0
    model: str | None = None
    tier: str | None = None
    plan_id: str | None = None
    plan_version: str | None = None
    token_class: TokenClass | None = None
    reason: str | None = None

    def __post_init__(self) -> None:
        assert self.amount == round_line(self.amount_exact), self


@dataclass(frozen=True)
class Figures:
    """An invoice's lines and totals, and its included quota: tokens included by the plan,
    tokens used in the period, and how many of those the quota covered."""

    lines: tuple[Line, ...]
    included_tokens: int
    used_tokens: int
    charged_tokens: int

    @property
    def subtotal(self) -> Decimal:
        return sum((line.amount for line in self.lines if line.kind == "usage"), Decimal(0))

    @property
    def credits_total(self) -> Decimal:
        return sum((line.amount for line in self.lines if line.kind == "credit"), Decimal(0))

    @property
    def total(self) -> Decimal:
        return self.subtotal + self.credits_total

    @property
    def quota_used_tokens(self) -> int:
        return self.used_tokens - self.charged_tokens


def usage_lines(groups: Iterable[UsageGroup]) -> list[Line]:
    """One line per group and token class, leaving out classes with no tokens and no amount."""
    lines = []
    order = sorted(groups, key=lambda g: (g.model, g.tier, g.plan_id, g.plan_version))
    for group in order:
        for token_class in TOKEN_CLASSES:
            tokens, amount = group.tokens.of(token_class), group.revenue[token_class]
            if tokens == 0 and amount == 0:
                continue
            lines.append(
                Line(
                    kind="usage",
                    requests=group.requests,
                    amount_exact=amount,
                    amount=round_line(amount),
                    tokens=tokens,
                    charged_tokens=group.charged.of(token_class),
                    model=group.model,
                    tier=group.tier,
                    plan_id=group.plan_id,
                    plan_version=group.plan_version,
                    token_class=token_class,
                )
            )
    return lines


def credit_lines(groups: Iterable[CreditGroup]) -> list[Line]:
    """One negative line per reason."""
    lines = []
    for group in sorted(groups, key=lambda g: g.reason):
        assert group.amount > 0, group
        lines.append(
            Line(
                kind="credit",
                requests=group.requests,
                amount_exact=-group.amount,
                amount=round_line(-group.amount),
                reason=group.reason,
            )
        )
    return lines


def figures(
    usage: Sequence[UsageGroup], credits: Sequence[CreditGroup], included_tokens: int
) -> Figures:
    return Figures(
        lines=(*usage_lines(usage), *credit_lines(credits)),
        included_tokens=included_tokens,
        used_tokens=sum(group.tokens.total for group in usage),
        charged_tokens=sum(group.charged.total for group in usage),
    )
