"""Invoice arithmetic: periods, the one rounding rule, lines, numbers."""

import io
from datetime import UTC, date, datetime
from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tokenmill.ledger.billing import (
    CreditGroup,
    Period,
    UsageGroup,
    document_number,
    figures,
    parse_day,
    round_line,
)
from tokenmill.ledger.commands import Progress
from tokenmill.ledger.rating import TokenCounts


def test_a_period_is_a_calendar_month_in_utc():
    period = Period.parse("2026-12")
    assert (period.start, period.end) == (date(2026, 12, 1), date(2027, 1, 1))
    assert str(period) == "2026-12"
    # 23:30 on Nov 30 in New York is already December in UTC.
    assert Period.of(datetime(2026, 12, 1, 4, 30, tzinfo=UTC)) == period


@pytest.mark.parametrize("text", ["2026-13", "2026-00", "2026-1", "26-11", "2026/11", "", "x"])
def test_a_malformed_period_is_refused_with_the_expected_form(text: str):
    with pytest.raises(ValueError, match="YYYY-MM"):
        Period.parse(text)


@pytest.mark.parametrize("text", ["2026-02-30", "2026-1-01", "20261101", "2026-11-01T00:00"])
def test_a_malformed_day_is_refused(text: str):
    with pytest.raises(ValueError, match="YYYY-MM-DD"):
        parse_day(text)


def test_lines_round_half_to_even_to_the_cent():
    assert round_line(Decimal("0.125")) == Decimal("0.12")
    assert round_line(Decimal("0.135")) == Decimal("0.14")
    assert round_line(Decimal("-0.125")) == Decimal("-0.12")
    assert round_line(Decimal("0.1250000001")) == Decimal("0.13")


def group(model: str, input_amount: str, output_amount: str, version: str = "v1") -> UsageGroup:
    return UsageGroup(
        model=model,
        tier="standard",
        plan_id="tier:standard",
        plan_version=version,
        requests=3,
        tokens=TokenCounts(1000, 0, 500),
        charged=TokenCounts(900, 0, 500),
        revenue={
            "input": Decimal(input_amount),
            "cached_input": Decimal(0),
            "output": Decimal(output_amount),
        },
    )


def test_the_total_is_the_sum_of_the_rounded_lines_never_a_rounded_total():
    # Three lines of 0.005 each (and one of 0 for tokens the quota covered): each rounded to
    # 0.00 (half to even), total 0.00, where rounding the exact total (0.015) would say 0.02.
    fig = figures([group("a", "0.005", "0.005"), group("b", "0.005", "0")], [], 0)
    assert [line.amount for line in fig.lines] == [Decimal("0.00")] * 4
    assert fig.total == Decimal("0.00")


def test_credits_are_negative_lines_by_reason_and_the_quota_is_shown():
    fig = figures(
        [group("a", "1.004", "2.006")],
        [CreditGroup("slo_ttft", 2, Decimal("0.105")), CreditGroup("defective", 1, Decimal("1"))],
        included_tokens=100,
    )
    credits = [(line.reason, line.amount) for line in fig.lines if line.kind == "credit"]
    assert credits == [("defective", Decimal("-1.00")), ("slo_ttft", Decimal("-0.10"))]
    assert fig.subtotal == Decimal("3.01") and fig.credits_total == Decimal("-1.10")
    assert fig.total == Decimal("1.91")
    assert (fig.included_tokens, fig.used_tokens, fig.quota_used_tokens) == (100, 1500, 100)


def test_a_class_with_no_tokens_and_no_amount_gets_no_line():
    fig = figures([group("a", "1", "0")], [], 0)
    assert {line.token_class for line in fig.lines} == {"input", "output"}


amounts = st.decimals(min_value=0, max_value=10_000, places=12, allow_nan=False)


@given(st.lists(st.tuples(amounts, amounts), min_size=1, max_size=20))
def test_any_invoice_total_equals_the_sum_of_its_lines_to_the_cent(pairs):
    groups = [group(f"m{i}", str(a), str(b)) for i, (a, b) in enumerate(pairs)]
    fig = figures(groups, [CreditGroup("goodwill", 1, Decimal("0.015"))], 0)
    assert fig.total == sum(line.amount for line in fig.lines)
    assert all(line.amount == line.amount.quantize(Decimal("0.01")) for line in fig.lines)
    assert all(abs(line.amount - line.amount_exact) <= Decimal("0.005") for line in fig.lines)


def test_document_numbers_are_zero_padded_per_series_and_year():
    assert document_number("TM", 2026, 1) == "TM-2026-000001"
    assert document_number("CN", 2027, 123456) == "CN-2027-123456"


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_is_a_bar_on_a_terminal_and_plain_lines_in_a_log():
    terminal, log = Terminal(), io.StringIO()
    for stream in (terminal, log):
        progress = Progress(stream, "finalizing 2026-11")
        progress.start(4)
        progress.advance(2)
        progress.advance(2)
    assert terminal.getvalue().endswith(f"\rfinalizing 2026-11 [{'#' * 30}] 4/4\n")
    assert "[" + "#" * 15 + "-" * 15 + "] 2/4" in terminal.getvalue()
    assert log.getvalue().splitlines() == [f"finalizing 2026-11: {n}/4" for n in (0, 2, 4)]
