"""ledger.request_usage rows made directly, rated at flat prices, for invoice tests and the
invoice benchmark: invoices read these rows, whatever booked them."""

from __future__ import annotations

from datetime import datetime, timedelta
from decimal import Decimal

import asyncpg

from tokenmill.events import new_id

USAGE_COLUMNS = (
    "request_id",
    "completion_event_id",
    "customer_id",
    "tier",
    "region",
    "model",
    "device",
    "prompt_tokens",
    "cached_prompt_tokens",
    "completion_tokens",
    "energy_j",
    "meter",
    "energy_estimated",
    "compute_s",
    "energy_cost",
    "compute_cost",
    "cost",
    "revenue",
    "margin",
    "currency",
    "price_version",
    "submitted_at",
    "completed_at",
    "plan_id",
    "plan_version",
    "charged_input_tokens",
    "charged_cached_input_tokens",
    "charged_output_tokens",
    "revenue_input",
    "revenue_cached_input",
    "revenue_output",
)
# tier:standard's 2026-01 prices per million tokens: input, cached input, output.
STANDARD = (Decimal("0.50"), Decimal("0.25"), Decimal("1.50"))
MILLION = Decimal(1_000_000)
ENERGY_COST = Decimal("0.000010")
COMPUTE_COST = Decimal("0.000020")


def usage_record(
    customer_id: str,
    submitted_at: datetime,
    *,
    input_tokens: int = 1000,
    cached_tokens: int = 0,
    output_tokens: int = 500,
    prices: tuple[Decimal, Decimal, Decimal] = STANDARD,
    model: str = "tm-test",
    tier: str = "standard",
    plan_id: str = "tier:standard",
    plan_version: str = "2026-01",
    currency: str = "USD",
    request_id: str | None = None,
) -> tuple:
    """One booked request, every token charged at flat `prices` (no quota, one band)."""
    amounts = [
        (tokens * price / MILLION).quantize(Decimal("0.000000000001"))
        for tokens, price in zip((input_tokens, cached_tokens, output_tokens), prices, strict=True)
    ]
    revenue = sum(amounts, Decimal(0))
    cost = ENERGY_COST + COMPUTE_COST
    request_id = request_id or f"job_{new_id()}"
    return (
        request_id,
        f"evt_{request_id}",
        customer_id,
        tier,
        "eu-west",
        model,
        "cpu",
        input_tokens + cached_tokens,
        cached_tokens,
        output_tokens,
        Decimal("3.6"),
        "scripted",
        True,
        Decimal("0.036"),
        ENERGY_COST,
        COMPUTE_COST,
        cost,
        revenue,
        revenue - cost,
        currency,
        plan_version,
        submitted_at,
        submitted_at + timedelta(seconds=1),
        plan_id,
        plan_version,
        input_tokens,
        cached_tokens,
        output_tokens,
        *amounts,
    )


async def book(conn: asyncpg.Connection | asyncpg.Pool, records: list[tuple]) -> None:
    """Insert the rows with COPY, as one statement: the drafts trigger runs once for them."""
    if isinstance(conn, asyncpg.Pool):
        async with conn.acquire() as one:
            await book(one, records)
            return
    await conn.copy_records_to_table(
        "request_usage", schema_name="ledger", records=records, columns=USAGE_COLUMNS
    )
