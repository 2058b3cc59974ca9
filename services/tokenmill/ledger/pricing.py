"""What a request cost to make (what it earned is rating's). Pure functions over exact decimals."""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

from tokenmill.money import JOULES_PER_KWH, SECONDS_PER_HOUR, quantize_amount


@dataclass(frozen=True)
class CostRates:
    """What energy and device time cost, for one device class, from one version of the rates."""

    version: str
    currency: str
    energy_price_per_kwh: Decimal  # The time-of-use price of the hour, where one is set.
    pue: Decimal
    compute_price_per_hour: Decimal
    carbon_g_per_kwh: Decimal | None = None  # Grams CO2e per kWh at the wall, where known.


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    energy_j: Decimal
    compute_s: Decimal


def energy_cost(usage: Usage, rates: CostRates) -> Decimal:
    """Energy at the wall: the device's joules times the facility's PUE, at the tariff."""
    return joules_cost(usage.energy_j, rates)


def joules_cost(energy_j: Decimal, rates: CostRates) -> Decimal:
    return quantize_amount(energy_j / JOULES_PER_KWH * rates.pue * rates.energy_price_per_kwh)


def carbon_g(energy_j: Decimal, rates: CostRates) -> Decimal | None:
    """Grams CO2e of `energy_j` device joules at the wall (times PUE); None where unknown."""
    if rates.carbon_g_per_kwh is None:
        return None
    return quantize_amount(energy_j / JOULES_PER_KWH * rates.pue * rates.carbon_g_per_kwh)


def compute_cost(usage: Usage, rates: CostRates) -> Decimal:
    """Device time at its amortised hourly rate."""
    return quantize_amount(usage.compute_s / SECONDS_PER_HOUR * rates.compute_price_per_hour)


def device_class(device: str) -> str:
    """'cuda:0' → 'cuda'; any other device is priced as CPU time."""
    return "cuda" if device.startswith("cuda") else "cpu"
