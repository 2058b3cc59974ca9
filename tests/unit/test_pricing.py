from decimal import Decimal

import pytest

from tokenmill.ledger.pricing import (
    CostRates,
    TierPrices,
    Usage,
    book_request,
    compute_cost,
    device_class,
    energy_cost,
    revenue,
)

STANDARD = TierPrices("2026-01", "USD", Decimal("0.50"), Decimal("1.50"))
PREMIUM = TierPrices("2026-01", "USD", Decimal("250"), Decimal("1000"))
CPU = CostRates("2026-01", "USD", Decimal("0.12"), Decimal("1.2"), Decimal("0.04"))


def usage(prompt=1000, completion=500, energy_j="3600", compute_s="36") -> Usage:
    return Usage(prompt, completion, Decimal(energy_j), Decimal(compute_s))


def test_revenue_is_tier_price_times_tokens_per_class():
    # 1000 input at $0.50/M + 500 output at $1.50/M = 0.0005 + 0.00075
    assert revenue(usage(), STANDARD) == Decimal("0.00125")
    assert revenue(usage(), PREMIUM) == Decimal("0.75")


def test_energy_cost_applies_pue_and_tariff_to_kwh():
    # 3600 J = 0.001 kWh; x 1.2 PUE x $0.12 = $0.000144
    assert energy_cost(usage(), CPU) == Decimal("0.000144")


def test_compute_cost_is_device_hours_at_rate():
    # 36 s = 0.01 h x $0.04 = $0.0004
    assert compute_cost(usage(), CPU) == Decimal("0.0004")


def test_books_add_up_exactly():
    books = book_request(usage(), STANDARD, CPU)
    assert books.cost == books.energy_cost + books.compute_cost == Decimal("0.000544")
    assert books.margin == books.revenue - books.cost == Decimal("0.000706")
    assert all(isinstance(v, Decimal) for v in (books.revenue, books.cost, books.margin))


def test_free_tier_earns_nothing_but_still_costs():
    free = TierPrices("2026-01", "USD", Decimal(0), Decimal(0))
    books = book_request(usage(), free, CPU)
    assert books.revenue == 0 and books.cost > 0 and books.margin < 0


def test_amounts_are_exact_at_twelve_places_no_float_drift():
    books = book_request(
        usage(prompt=1, completion=1, energy_j="0.1", compute_s="0.1"), STANDARD, CPU
    )
    assert books.revenue == Decimal("0.000002")
    assert books.energy_cost == Decimal("0.000000004")


def test_currency_mismatch_is_refused():
    eur = CostRates("2026-01", "EUR", Decimal("0.12"), Decimal("1.2"), Decimal("0.04"))
    with pytest.raises(ValueError, match="EUR"):
        book_request(usage(), STANDARD, eur)


def test_device_class():
    assert device_class("cuda:0") == "cuda"
    assert device_class("cpu") == "cpu"
