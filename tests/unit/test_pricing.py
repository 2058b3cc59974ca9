from decimal import Decimal

from tokenmill.ledger.pricing import (
    CostRates,
    Usage,
    compute_cost,
    device_class,
    energy_cost,
)

CPU = CostRates("2026-01", "USD", Decimal("0.12"), Decimal("1.2"), Decimal("0.04"))


def usage(prompt=1000, completion=500, energy_j="3600", compute_s="36") -> Usage:
    return Usage(prompt, completion, Decimal(energy_j), Decimal(compute_s))


def test_energy_cost_applies_pue_and_tariff_to_kwh():
    # 3600 J = 0.001 kWh; x 1.2 PUE x $0.12 = $0.000144
    assert energy_cost(usage(), CPU) == Decimal("0.000144")


def test_compute_cost_is_device_hours_at_rate():
    # 36 s = 0.01 h x $0.04 = $0.0004
    assert compute_cost(usage(), CPU) == Decimal("0.0004")


def test_amounts_are_exact_at_twelve_places_no_float_drift():
    tiny = usage(prompt=1, completion=1, energy_j="0.1", compute_s="0.1")
    assert energy_cost(tiny, CPU) == Decimal("0.000000004")


def test_device_class():
    assert device_class("cuda:0") == "cuda"
    assert device_class("cpu") == "cpu"
