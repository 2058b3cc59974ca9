"""What a request earned and what it cost to make. Pure functions over exact decimals."""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

from tokenmill.money import JOULES_PER_KWH, SECONDS_PER_HOUR, TOKENS_PER_MILLION, quantize_amount


@dataclass(frozen=True)
class TierPrices:
    """Prices per million tokens for one tier, from one version of the price book."""

    version: str
    currency: str
    input_per_mtok: Decimal
    output_per_mtok: Decimal


@dataclass(frozen=True)
class CostRates:
    """What energy and device time cost, for one device class, from one version of the rates."""

    version: str
    currency: str
    energy_price_per_kwh: Decimal
    pue: Decimal
    compute_price_per_hour: Decimal


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    energy_j: Decimal
    compute_s: Decimal


@dataclass(frozen=True)
class RequestBooks:
    revenue: Decimal
    energy_cost: Decimal
    compute_cost: Decimal
    currency: str
    price_version: str

    @property
    def cost(self) -> Decimal:
        return self.energy_cost + self.compute_cost

    @property
    def margin(self) -> Decimal:
        return self.revenue - self.cost


def revenue(usage: Usage, prices: TierPrices) -> Decimal:
    """Tier price x tokens, per token class."""
    earned = (
        usage.prompt_tokens * prices.input_per_mtok
        + usage.completion_tokens * prices.output_per_mtok
    ) / TOKENS_PER_MILLION
    return quantize_amount(earned)


def energy_cost(usage: Usage, rates: CostRates) -> Decimal:
    """Energy at the wall: the device's joules times the facility's PUE, at the tariff."""
    kwh = usage.energy_j / JOULES_PER_KWH
    return quantize_amount(kwh * rates.pue * rates.energy_price_per_kwh)


def compute_cost(usage: Usage, rates: CostRates) -> Decimal:
    """Device time at its amortised hourly rate."""
    return quantize_amount(usage.compute_s / SECONDS_PER_HOUR * rates.compute_price_per_hour)


def book_request(usage: Usage, prices: TierPrices, rates: CostRates) -> RequestBooks:
    assert usage.prompt_tokens >= 0 and usage.completion_tokens >= 0, usage
    assert usage.energy_j >= 0 and usage.compute_s >= 0, usage
    if prices.currency != rates.currency:
        raise ValueError(f"price book in {prices.currency} but cost rates in {rates.currency}")
    books = RequestBooks(
        revenue=revenue(usage, prices),
        energy_cost=energy_cost(usage, rates),
        compute_cost=compute_cost(usage, rates),
        currency=prices.currency,
        price_version=f"prices {prices.version}; rates {rates.version}",
    )
    assert books.revenue >= 0 and books.cost >= 0, books
    return books


def device_class(device: str) -> str:
    """'cuda:0' → 'cuda'; any other device is priced as CPU time."""
    return "cuda" if device.startswith("cuda") else "cpu"
