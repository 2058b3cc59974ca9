from datetime import UTC, datetime
from decimal import Decimal

import pytest

from tests.integration.test_journal import completion
from tokenmill.ledger import journal
from tokenmill.ledger.books import SloPolicy, token_counts
from tokenmill.ledger.journal import Leg, Posting, UnbalancedPosting
from tokenmill.ledger.prices import PriceError, parse_bands, parse_price
from tokenmill.ledger.rating import Band

NOW = datetime(2026, 12, 1, tzinfo=UTC)


def posting(*legs: Leg) -> Posting:
    return Posting("evt", "usage", "test", NOW, legs)


def test_a_posting_must_balance_per_currency():
    posting(Leg("cash", Decimal("1.5"), "USD"), Leg("customer:c:prepaid", Decimal("-1.5"), "USD"))
    with pytest.raises(UnbalancedPosting, match="do not sum to zero"):
        posting(Leg("cash", Decimal(1), "USD"), Leg("customer:c:prepaid", Decimal(-1), "EUR"))
    with pytest.raises(UnbalancedPosting, match=f"2 to {journal.LEGS_MAX} legs"):
        posting(Leg("cash", Decimal(1), "USD"))
    with pytest.raises(UnbalancedPosting, match="zero"):
        posting(Leg("cash", Decimal(0), "USD"), Leg("customer:c:prepaid", Decimal(0), "USD"))


def test_legs_leave_out_zero_amounts():
    built = journal.legs("USD", ("a", Decimal(1)), ("b", Decimal(0)), ("c", Decimal(-1)))
    assert [leg.account_id for leg in built] == ["a", "c"]


@pytest.mark.parametrize(
    ("account", "kind"),
    [
        ("customer:cus_1:receivable", "asset"),
        ("customer:cus_1:prepaid", "liability"),
        ("revenue:premium:cached_input", "revenue"),
        ("credits:defective", "contra_revenue"),
        ("expense:energy", "expense"),
        ("accrued:compute", "liability"),
        ("cash", "asset"),
    ],
)
def test_account_types_follow_the_naming(account, kind):
    assert journal.account_type(account) == kind


def test_an_unknown_account_has_no_type():
    with pytest.raises(ValueError):
        journal.account_type("customer:cus_1:wallet")


def test_ttft_credit_only_past_the_tiers_objective():
    slo = SloPolicy({"premium": 500.0, "standard": 0.0}, {"premium": Decimal("0.1")})
    charge = Decimal("0.002")
    assert slo.ttft_credit(completion("c", tier="premium", ttft_ms=501), charge) == Decimal(
        "0.0002"
    )
    assert slo.ttft_credit(completion("c", tier="premium", ttft_ms=500), charge) == 0
    assert slo.ttft_credit(completion("c", tier="standard", ttft_ms=99_999), charge) == 0
    assert slo.ttft_credit(completion("c", tier="premium", ttft_ms=900), Decimal(-1)) == 0


def test_cached_tokens_are_part_of_the_prompt():
    counts = token_counts(completion("c", prompt_tokens=100, cached=30, completion_tokens=7))
    assert (counts.input, counts.cached_input, counts.output) == (70, 30, 7)
    with pytest.raises(ValueError, match="cached_prompt_tokens"):
        token_counts(completion("c", prompt_tokens=10, cached=11))


def test_band_specs_parse_and_bad_ones_say_why():
    assert parse_bands("1_000_000:1.50, :1.00", "x") == (
        Band(1_000_000, Decimal("1.50")),
        Band(None, Decimal("1.00")),
    )
    for bad, message in (("1000", "UP_TO:PRICE"), ("ten:1", "token count"), ("10:x", "decimal")):
        with pytest.raises(PriceError, match=message):
            parse_bands(bad, "x")
    with pytest.raises(PriceError, match="not a price below"):
        parse_price("NaN", "x")
