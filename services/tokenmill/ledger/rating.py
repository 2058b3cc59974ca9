"""Rating: what a request's tokens are charged under a price plan. Pure functions, exact decimals.

A plan prices each token class (input, cached input, output) in bands over the billing period's
tokens of that class (Stripe's `tiers_mode`): "graduated" prices each band's tokens at that
band's rate; "volume" prices all of the period's tokens at the rate of the band that the
period's total reaches. A monthly included quota (all classes together) is used up first, in
the order input, cached input, output; only the tokens past it are rated.

A request is charged the difference it makes to the period's amount: amount(charged tokens
after it) - amount(charged tokens before it), per class. The charges of a period's requests
therefore add up, exactly and in any booking order, to the band price of the period's total,
so the journal and the invoice agree without a true-up. Under volume pricing a request that
moves the period into a cheaper band lowers the amount of every earlier token: its charge is
negative, a discount the books show where it happened.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from functools import cached_property
from typing import Literal

from tokenmill.money import TOKENS_PER_MILLION, quantize_amount

TokenClass = Literal["input", "cached_input", "output"]
TOKEN_CLASSES: tuple[TokenClass, ...] = ("input", "cached_input", "output")
TiersMode = Literal["graduated", "volume"]
BANDS_MAX = 16
PRICE_PLACES_MAX = 6


@dataclass(frozen=True)
class Band:
    """Tokens up to `up_to_tokens` of the period (None: no limit) at `price_per_mtok`."""

    up_to_tokens: int | None
    price_per_mtok: Decimal


@dataclass(frozen=True)
class TokenCounts:
    input: int = 0
    cached_input: int = 0
    output: int = 0

    def __post_init__(self) -> None:
        assert min(self.input, self.cached_input, self.output) >= 0, self

    @property
    def total(self) -> int:
        return self.input + self.cached_input + self.output

    def of(self, token_class: TokenClass) -> int:
        return getattr(self, token_class)

    def __add__(self, other: TokenCounts) -> TokenCounts:
        return TokenCounts(
            self.input + other.input,
            self.cached_input + other.cached_input,
            self.output + other.output,
        )


@dataclass(frozen=True)
class PlanVersion:
    """One version of a price plan, as ledger.price_plans and ledger.price_bands hold it."""

    plan_id: str
    version: str
    effective_from: datetime
    currency: str
    tiers_mode: TiersMode
    included_tokens_monthly: int
    quota_policy: Literal["charge", "refuse"]
    bands: Mapping[TokenClass, tuple[Band, ...]]

    def __post_init__(self) -> None:
        assert self.tiers_mode in ("graduated", "volume"), self.tiers_mode
        assert self.included_tokens_monthly >= 0, self.included_tokens_monthly
        for token_class in TOKEN_CLASSES:
            check_bands(self.bands.get(token_class, ()))

    def highest_price_per_mtok(self, token_class: TokenClass) -> Decimal:
        """The most one token of `token_class` can cost: what an admission hold must cover."""
        return max(band.price_per_mtok for band in self.bands[token_class])


def check_bands(bands: tuple[Band, ...]) -> None:
    """Raise ValueError unless `bands` rise strictly and only the last one is unbounded."""
    if not 1 <= len(bands) <= BANDS_MAX:
        raise ValueError(f"a token class needs 1 to {BANDS_MAX} bands, not {len(bands)}")
    if bands[-1].up_to_tokens is not None:
        raise ValueError("the last band must have no upper limit")
    limits = [band.up_to_tokens for band in bands[:-1]]
    if any(limit is None or limit <= 0 for limit in limits) or limits != sorted(set(limits)):
        raise ValueError("band limits must be positive and strictly rising")
    if any(band.price_per_mtok < 0 for band in bands):
        raise ValueError("band prices cannot be negative")
    # With at most 6 places per million tokens, every amount is exact at the books' 12 places,
    # so a period's request charges add up to its band price with nothing lost to rounding.
    if any(band.price_per_mtok.as_tuple().exponent < -PRICE_PLACES_MAX for band in bands):
        raise ValueError(f"band prices have at most {PRICE_PLACES_MAX} decimal places")


def graduated_amount(bands: tuple[Band, ...], tokens: int) -> Decimal:
    """The first `tokens` of a period, each band's tokens at that band's rate."""
    amount, floor = Decimal(0), 0
    for band in bands:
        ceiling = tokens if band.up_to_tokens is None else min(tokens, band.up_to_tokens)
        if ceiling > floor:
            amount += (ceiling - floor) * band.price_per_mtok
        floor = max(floor, ceiling)
        if floor >= tokens:
            break
    return amount / TOKENS_PER_MILLION


def volume_amount(bands: tuple[Band, ...], tokens: int) -> Decimal:
    """All `tokens` of a period at the rate of the band their total falls in."""
    band = next(b for b in bands if b.up_to_tokens is None or tokens <= b.up_to_tokens)
    return tokens * band.price_per_mtok / TOKENS_PER_MILLION


def period_amount(plan: PlanVersion, token_class: TokenClass, tokens: int) -> Decimal:
    """What `tokens` charged tokens of `token_class` in one period cost under `plan`, unrounded."""
    assert tokens >= 0, tokens
    bands = plan.bands[token_class]
    if plan.tiers_mode == "graduated":
        return graduated_amount(bands, tokens)
    return volume_amount(bands, tokens)


def charged_part(counts: TokenCounts, included_left: int) -> TokenCounts:
    """`counts` less what the included quota still covers, used up input first, then cached
    input, then output."""
    if included_left <= 0:
        return counts
    input_covered = min(included_left, counts.input)
    cached_covered = min(included_left - input_covered, counts.cached_input)
    output_covered = min(included_left - input_covered - cached_covered, counts.output)
    return TokenCounts(
        counts.input - input_covered,
        counts.cached_input - cached_covered,
        counts.output - output_covered,
    )


@dataclass(frozen=True)
class PeriodPosition:
    """Where a customer's billing period stands before a request: all tokens so far (for the
    included quota) and the charged tokens of each class (for the bands)."""

    tokens: int = 0
    charged: TokenCounts = TokenCounts()


@dataclass(frozen=True)
class RequestCharge:
    charged: TokenCounts
    amounts: Mapping[TokenClass, Decimal]
    after: PeriodPosition

    @cached_property  # A booking reads it several times: summed once.
    def total(self) -> Decimal:
        return sum(self.amounts.values(), Decimal(0))


_ZERO_AMOUNT = quantize_amount(Decimal(0))


def graduated_between(bands: tuple[Band, ...], low: int, high: int) -> Decimal:
    """graduated_amount(high) - graduated_amount(low), exactly, in one pass over the bands."""
    amount, floor = Decimal(0), 0
    for band in bands:
        ceiling = high if band.up_to_tokens is None else min(high, band.up_to_tokens)
        start = max(floor, low)
        if ceiling > start:
            amount += (ceiling - start) * band.price_per_mtok
        floor = max(floor, ceiling)
        if floor >= high:
            break
    return amount / TOKENS_PER_MILLION


def class_charge(plan: PlanVersion, token_class: TokenClass, before: int, charged: int) -> Decimal:
    """What `charged` more tokens of `token_class` add to a period's amount at `before`."""
    if charged == 0:
        return _ZERO_AMOUNT  # Neither mode moves a period's amount without new tokens.
    if plan.tiers_mode == "graduated":
        return quantize_amount(graduated_between(plan.bands[token_class], before, before + charged))
    after_amount = period_amount(plan, token_class, before + charged)
    return quantize_amount(after_amount - period_amount(plan, token_class, before))


def rate_request(plan: PlanVersion, before: PeriodPosition, counts: TokenCounts) -> RequestCharge:
    """What one request's `counts` are charged, given where its period stood `before` it."""
    charged = charged_part(counts, plan.included_tokens_monthly - before.tokens)
    amounts = {c: class_charge(plan, c, before.charged.of(c), charged.of(c)) for c in TOKEN_CLASSES}
    after = PeriodPosition(before.tokens + counts.total, before.charged + charged)
    return RequestCharge(charged, amounts, after)
