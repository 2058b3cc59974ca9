"""Admission: budgets, prepaid credit and the free quota, reserved before a job is queued.

Each customer has one admission balance (intake.admission_balances, migration 0008). At
admission the request's worst case is held in the same statement that records the request
(jobs._ACCEPT_SQL): prompt tokens at the plan's highest input price plus max_tokens at its
highest output price, and for a plan that refuses past its included quota, prompt tokens plus
max_tokens against that quota. One UPDATE both checks that the hold fits and takes it, so two
requests can never both take the last of a budget. The booking (UsageBooked) settles the
actual charge and releases the hold; a failed job releases it. Each happens once per request,
guarded by the request's hold_state.

A customer with neither a monthly budget nor prepaid credit, on a plan that charges past its
quota, is postpaid: never held, never refused for money. Its charges still count in the
period's settled amount, so a budget set mid-month starts from what was already spent.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime
from decimal import Decimal, InvalidOperation
from typing import Any

import asyncpg

from tokenmill.events import PrepaidCreditAdded
from tokenmill.outbox import enqueue

# A top-up or budget is money an operator types: whole cents, and below this, so that a typo
# of a few extra digits is refused rather than credited.
AMOUNT_PLACES_MAX = 2
AMOUNT_MAX = Decimal("1000000000")
CENT = Decimal("0.01")
REFERENCE_CHARS_MAX = 200
# `budgets reconcile` compares at most this many customer-periods per run.
RECONCILE_ROWS_MAX = 10_000
# The SQLSTATE intake.refuse_admission raises (migration 0008).
REFUSED_SQLSTATE = "TM402"


class Refused(Exception):
    """The request's worst case does not fit: the message says which limit and by how much."""


def period_of(at: datetime) -> date:
    """The billing period of `at`: the first day of its calendar month, UTC."""
    assert at.tzinfo is not None, "billing periods are UTC months of aware timestamps"
    utc = at.astimezone(UTC)
    return date(utc.year, utc.month, 1)


def parse_amount(text: str, what: str) -> Decimal:
    """An operator's amount: a positive decimal of at most two places; ValueError says why."""
    try:
        amount = Decimal(text.strip())
    except (InvalidOperation, AttributeError):
        raise ValueError(f"{what} must be a decimal amount such as 25.00, not {text!r}") from None
    if not amount.is_finite() or amount <= 0:
        raise ValueError(f"{what} must be a positive amount, not {text!r}")
    if amount.as_tuple().exponent < -AMOUNT_PLACES_MAX:  # type: ignore[operator]
        raise ValueError(f"{what} has at most {AMOUNT_PLACES_MAX} decimal places, not {text!r}")
    if amount >= AMOUNT_MAX:
        raise ValueError(f"{what} must be below {AMOUNT_MAX}, not {text!r}")
    # Whole cents, written out: "1e1" is stored and shown as 10.00.
    return amount.quantize(CENT)


@dataclass(frozen=True)
class Hold:
    """What one request holds, if its customer is held at all."""

    amount: Decimal
    tokens: int


def refusal(balance: asyncpg.Record, plan: asyncpg.Record, hold: Hold, period: date) -> str:
    """Why `hold` did not fit `balance` under `plan` in `period`, and by how much."""
    current = balance["period"] == period
    currency = balance["currency"]
    if plan["quota_policy"] == "refuse":
        used = balance["period_tokens_used"] + balance["period_tokens_held"] if current else 0
        left = max(plan["included_tokens_monthly"] - used, 0)
        if hold.tokens > left:
            return (
                f"free quota used up: this request may use up to {hold.tokens} tokens (its "
                f"prompt and max_tokens) and {left} of the plan's "
                f"{plan['included_tokens_monthly']} included tokens are left this month "
                f"(short by {hold.tokens - left}); lower max_tokens or change tier"
            )
    cost = f"this request may cost up to {_shown(hold.amount)} {currency}"
    if balance["prepaid_balance"] is not None:
        left = max(balance["prepaid_balance"] - balance["held"], Decimal(0))
        if hold.amount > left:
            return (
                f"out of prepaid credit: {cost} and {_shown(left)} {currency} of prepaid "
                f"credit is free (short by {_shown(hold.amount - left)} {currency}); top up "
                "or lower max_tokens"
            )
    if balance["monthly_budget"] is not None:
        spent = balance["period_held"] + balance["period_settled"] if current else Decimal(0)
        left = max(balance["monthly_budget"] - spent, Decimal(0))
        if hold.amount > left:
            budget = _shown(balance["monthly_budget"])
            return (
                f"over monthly budget: {cost} and {_shown(left)} {currency} of the {budget} "
                f"{currency} monthly budget is left (short by {_shown(hold.amount - left)} "
                f"{currency}); raise the budget or lower max_tokens"
            )
    # The balance moved between the refusal and this read: the request may fit now.
    return "the request did not fit the balance at admission; send it again"


def _shown(amount: Decimal) -> str:
    """An amount for people: whole cents at least, and no trailing zeros past them."""
    shown = amount.normalize()
    if shown.as_tuple().exponent > -2:  # type: ignore[operator]
        shown = shown.quantize(CENT)
    return format(shown, "f")


async def explain_refusal(
    conn: asyncpg.Connection, customer_id: str, tier: str, at: datetime, hold: Hold
) -> str:
    balance = await conn.fetchrow(
        "SELECT * FROM intake.admission_balances WHERE customer_id = $1", customer_id
    )
    plan = await conn.fetchrow(
        "SELECT * FROM ledger.plan_at(ledger.plan_for($1, $2, $3), $3)", customer_id, tier, at
    )
    return refusal(balance, plan, hold, period_of(at))


# Applies a hold's end to the balance: $3 money and $4 tokens released, $5 charged and $6
# tokens used, for a request of period $2. A request of a later period than the balance's
# starts the period counters again; one of an earlier period leaves them (they count the
# current month) and touches only what spans periods: the outstanding holds and prepaid credit.
_APPLY_SQL = """
UPDATE intake.admission_balances SET
    period = greatest(period, $2),
    held = held - $3,
    period_held = CASE WHEN period = $2 THEN period_held - $3
                       WHEN period < $2 THEN 0 ELSE period_held END,
    period_settled = CASE WHEN period = $2 THEN period_settled + $5
                          WHEN period < $2 THEN $5 ELSE period_settled END,
    period_tokens_held = CASE WHEN period = $2 THEN period_tokens_held - $4
                              WHEN period < $2 THEN 0 ELSE period_tokens_held END,
    period_tokens_used = CASE WHEN period = $2 THEN period_tokens_used + $6
                              WHEN period < $2 THEN $6 ELSE period_tokens_used END,
    prepaid_balance = prepaid_balance - $5,
    updated_at = now()
WHERE customer_id = $1"""


async def settle(
    conn: asyncpg.Connection,
    request: asyncpg.Record,
    charge: Decimal,
    tokens_used: int,
) -> None:
    """Book `charge` for `request` (a row with customer_id, submitted_at, hold_amount,
    hold_tokens, hold_state after the booking), releasing its hold if it still had one."""
    settled = request["hold_state"] == "settled"
    await _apply(conn, request, settled, charge, tokens_used)


async def release(conn: asyncpg.Connection, request: asyncpg.Record) -> None:
    """Give back the hold of `request`, which failed: nothing is charged."""
    await _apply(conn, request, True, Decimal(0), 0)


async def _apply(
    conn: asyncpg.Connection,
    request: asyncpg.Record,
    releasing: bool,
    charge: Decimal,
    tokens_used: int,
) -> None:
    await conn.execute(
        _APPLY_SQL,
        request["customer_id"],
        period_of(request["submitted_at"]),
        request["hold_amount"] if releasing else Decimal(0),
        request["hold_tokens"] if releasing else 0,
        charge,
        tokens_used,
    )


async def set_budget(
    conn: asyncpg.Connection, customer_id: str, monthly: Decimal | None
) -> asyncpg.Record:
    """Set (or with None clear) the customer's monthly budget; LookupError if no customer."""
    row = await conn.fetchrow(
        "UPDATE intake.admission_balances SET monthly_budget = $2, updated_at = now() "
        "WHERE customer_id = $1 RETURNING *",
        customer_id,
        monthly,
    )
    if row is None:
        raise LookupError(f"no customer {customer_id!r}")
    return row


async def add_credit(
    conn: asyncpg.Connection, billing_stream: str, customer_id: str, amount: Decimal, reference: str
) -> tuple[PrepaidCreditAdded, asyncpg.Record]:
    """Raise the customer's prepaid credit by `amount` and queue PrepaidCreditAdded for the
    ledger, in one transaction: both happen or neither. Returns the event and the balance."""
    assert amount > 0, amount
    if len(reference) > REFERENCE_CHARS_MAX or "\x00" in reference:
        raise ValueError(f"the reference is at most {REFERENCE_CHARS_MAX} characters, no NUL")
    async with conn.transaction():
        customer = await conn.fetchrow(
            "SELECT c.region, b.currency FROM intake.customers c "
            "JOIN intake.admission_balances b USING (customer_id) WHERE customer_id = $1",
            customer_id,
        )
        if customer is None:
            raise LookupError(f"no customer {customer_id!r}")
        event = PrepaidCreditAdded(
            producer="intake",
            customer_id=customer_id,
            request_id="",
            region=customer["region"],
            amount=amount,
            currency=customer["currency"],
            reference=reference,
        )
        balance = await conn.fetchrow(
            "UPDATE intake.admission_balances SET updated_at = now(), "
            "prepaid_balance = coalesce(prepaid_balance, 0) + $2 "
            "WHERE customer_id = $1 RETURNING *",
            customer_id,
            amount,
        )
        await conn.execute(
            "INSERT INTO intake.prepaid_topups (event_id, customer_id, amount, currency, "
            "reference, created_at) VALUES ($1, $2, $3, $4, $5, $6)",
            event.event_id,
            customer_id,
            amount,
            event.currency,
            reference,
            event.occurred_at,
        )
        await enqueue(conn, "intake", billing_stream, event)
    return event, balance


def balance_view(balance: asyncpg.Record, today: date) -> dict[str, Any]:
    """A balance as the CLI and the admin API show it, for the current period `today`'s."""
    current = balance["period"] == period_of_date(today)
    zero = Decimal(0)
    return {
        "currency": balance["currency"],
        "period": period_of_date(today).isoformat()[:7],
        "monthly_budget": _money(balance["monthly_budget"]),
        "prepaid_balance": _money(balance["prepaid_balance"]),
        "held": _money(balance["period_held"] if current else zero),
        "held_all_periods": _money(balance["held"]),
        "settled": _money(balance["period_settled"] if current else zero),
        "tokens_held": balance["period_tokens_held"] if current else 0,
        "tokens_used": balance["period_tokens_used"] if current else 0,
        # Never held: no budget, no prepaid credit, a plan that charges past its quota.
        "postpaid": balance["monthly_budget"] is None
        and balance["prepaid_balance"] is None
        and balance.get("quota_policy", "charge") == "charge",
    }


def period_of_date(day: date) -> date:
    return date(day.year, day.month, 1)


def _money(amount: Decimal | None) -> str | None:
    # Positional, never "1E-7": exact decimals travel as plain strings.
    return None if amount is None else format(amount, "f")


# Per customer and period (month of submission, UTC): the intake's settled charges beside the
# ledger's booked revenue, and the prepaid top-ups the intake queued beside those the ledger
# logged. A request booked by the ledger whose UsageBooked the intake has not consumed yet
# shows as a difference until it has.
_RECONCILE_SQL = """
WITH intake_settled AS (
    SELECT customer_id, date_trunc('month', submitted_at AT TIME ZONE 'UTC')::date AS period,
           sum(revenue) AS amount
    FROM intake.requests WHERE booked_at IS NOT NULL GROUP BY 1, 2
), ledger_booked AS (
    SELECT customer_id, date_trunc('month', submitted_at AT TIME ZONE 'UTC')::date AS period,
           sum(revenue) AS amount
    FROM ledger.request_usage GROUP BY 1, 2
), intake_topups AS (
    SELECT customer_id, date_trunc('month', created_at AT TIME ZONE 'UTC')::date AS period,
           sum(amount) AS amount
    FROM intake.prepaid_topups GROUP BY 1, 2
), ledger_topups AS (
    SELECT customer_id, date_trunc('month', occurred_at AT TIME ZONE 'UTC')::date AS period,
           sum((body::jsonb ->> 'amount')::numeric) AS amount
    FROM ledger.events WHERE event_type = 'credit.prepaid_added' GROUP BY 1, 2
)
SELECT customer_id, period,
       coalesce(s.amount, 0) AS intake_settled, coalesce(b.amount, 0) AS ledger_revenue,
       coalesce(ti.amount, 0) AS intake_topups, coalesce(tl.amount, 0) AS ledger_topups
FROM intake_settled s
FULL JOIN ledger_booked b USING (customer_id, period)
FULL JOIN intake_topups ti USING (customer_id, period)
FULL JOIN ledger_topups tl USING (customer_id, period)
WHERE $2::text IS NULL OR customer_id = $2
ORDER BY customer_id, period
LIMIT $1"""


async def reconcile(
    conn: asyncpg.Connection, customer_id: str | None = None
) -> list[dict[str, Any]]:
    """Every customer-period (of one customer, or all) with what each side recorded and
    whether they differ."""
    rows = await conn.fetch(_RECONCILE_SQL, RECONCILE_ROWS_MAX, customer_id)
    return [
        {
            "customer_id": r["customer_id"],
            "period": r["period"].isoformat()[:7],
            "intake_settled": _money(r["intake_settled"]),
            "ledger_revenue": _money(r["ledger_revenue"]),
            "revenue_difference": _money(r["intake_settled"] - r["ledger_revenue"]),
            "intake_topups": _money(r["intake_topups"]),
            "ledger_topups": _money(r["ledger_topups"]),
            "topups_difference": _money(r["intake_topups"] - r["ledger_topups"]),
            "matches": r["intake_settled"] == r["ledger_revenue"]
            and r["intake_topups"] == r["ledger_topups"],
        }
        for r in rows
    ]
