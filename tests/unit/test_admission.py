"""Admission's pure parts: operator amounts, billing periods and why a hold did not fit."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta, timezone
from decimal import Decimal

import pytest

from tokenmill.intake.admission import Hold, parse_amount, period_of, refusal

PERIOD = date(2026, 12, 1)


def balance(**overrides) -> dict:
    row = {
        "currency": "USD",
        "period": PERIOD,
        "monthly_budget": None,
        "prepaid_balance": None,
        "held": Decimal(0),
        "period_held": Decimal(0),
        "period_settled": Decimal(0),
        "period_tokens_held": 0,
        "period_tokens_used": 0,
    }
    return {**row, **overrides}


CHARGE = {"quota_policy": "charge", "included_tokens_monthly": 0}
FREE = {"quota_policy": "refuse", "included_tokens_monthly": 100_000}


@pytest.mark.parametrize(
    ("text", "amount"),
    [("25", Decimal("25.00")), (" 10.5 ", Decimal("10.50")), ("1e1", Decimal("10.00"))],
)
def test_amounts_are_whole_cents(text, amount):
    parsed = parse_amount(text, "amount")
    assert parsed == amount and str(parsed) == str(amount)


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("0", "positive"),
        ("-1", "positive"),
        ("NaN", "positive"),
        ("Infinity", "positive"),
        ("1.001", "2 decimal places"),
        ("abc", "decimal amount"),
        ("", "decimal amount"),
        ("1000000000", "below"),
    ],
)
def test_bad_amounts_say_why(text, needle):
    with pytest.raises(ValueError, match=needle):
        parse_amount(text, "amount")


def test_the_period_is_the_utc_month():
    assert period_of(datetime(2026, 12, 31, 23, 59, tzinfo=UTC)) == PERIOD
    east = timezone(timedelta(hours=2))
    assert period_of(datetime(2027, 1, 1, 1, 0, tzinfo=east)) == PERIOD


def test_over_budget_says_by_how_much():
    row = balance(
        monthly_budget=Decimal("1.00"), period_held=Decimal("0.30"), period_settled=Decimal("0.60")
    )
    message = refusal(row, CHARGE, Hold(Decimal("0.25"), 10), PERIOD)
    assert message.startswith("over monthly budget")
    assert "0.10 USD of the 1.00 USD monthly budget is left (short by 0.15 USD)" in message


def test_a_new_month_starts_the_budget_again():
    last_month = balance(
        period=date(2026, 11, 1), monthly_budget=Decimal("1.00"), period_settled=Decimal("1.00")
    )
    message = refusal(last_month, CHARGE, Hold(Decimal("2.00"), 10), PERIOD)
    assert "1.00 USD of the 1.00 USD monthly budget is left (short by 1.00 USD)" in message


def test_out_of_prepaid_credit_counts_every_outstanding_hold():
    row = balance(prepaid_balance=Decimal("5"), held=Decimal("4.5"))
    message = refusal(row, CHARGE, Hold(Decimal("1"), 10), PERIOD)
    assert message.startswith("out of prepaid credit") and "(short by 0.50 USD)" in message


def test_free_quota_counts_tokens_used_and_held():
    row = balance(period_tokens_used=99_000, period_tokens_held=900)
    message = refusal(row, FREE, Hold(Decimal(0), 300), PERIOD)
    assert message.startswith("free quota used up")
    assert "100 of the plan's 100000 included tokens are left this month (short by 200)" in message
