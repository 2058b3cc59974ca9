"""The ledger's writes: every event into the append-only log, and each request's books."""

from __future__ import annotations

from datetime import datetime

import asyncpg

from tokenmill.events import Event, JobCompleted, PowerSample, QualityVerdict, UsageBooked
from tokenmill.ledger.pricing import (
    CostRates,
    TierPrices,
    Usage,
    book_request,
    device_class,
    revenue,
)
from tokenmill.outbox import enqueue

SCHEMA = "ledger"


async def append_event(conn: asyncpg.Connection, event: Event, stream: str) -> bool:
    """Append `event` to the log; False if it is already there (a redelivery)."""
    seq = await conn.fetchval(
        "INSERT INTO ledger.events (event_id, event_type, stream, customer_id, request_id, "
        "occurred_at, body) VALUES ($1, $2, $3, $4, $5, $6, $7) "
        "ON CONFLICT (event_id) DO NOTHING RETURNING seq",
        event.event_id,
        event.type,
        stream,
        event.customer_id,
        event.request_id,
        event.occurred_at,
        event.canonical_json(),
    )
    return seq is not None


async def prices_at(conn: asyncpg.Connection, tier: str, at: datetime) -> TierPrices:
    rows = await conn.fetch(
        "SELECT DISTINCT ON (token_class) token_class, price_per_mtok, currency, version "
        "FROM ledger.price_book WHERE tier = $1 AND effective_from <= $2 "
        "ORDER BY token_class, effective_from DESC",
        tier,
        at,
    )
    by_class = {r["token_class"]: r for r in rows}
    if set(by_class) != {"input", "output"}:
        raise LookupError(f"no complete price for tier {tier!r} at {at.isoformat()}")
    return TierPrices(
        version=by_class["output"]["version"],
        currency=by_class["output"]["currency"],
        input_per_mtok=by_class["input"]["price_per_mtok"],
        output_per_mtok=by_class["output"]["price_per_mtok"],
    )


async def rates_at(conn: asyncpg.Connection, device: str, at: datetime) -> CostRates:
    row = await conn.fetchrow(
        "SELECT version, currency, energy_price_per_kwh, pue, compute_price_per_hour "
        "FROM ledger.cost_rates WHERE device_class = $1 AND effective_from <= $2 "
        "ORDER BY effective_from DESC LIMIT 1",
        device_class(device),
        at,
    )
    if row is None:
        raise LookupError(f"no cost rates for {device!r} at {at.isoformat()}")
    return CostRates(**dict(row))


async def book_completion(
    conn: asyncpg.Connection, event: JobCompleted, booked_stream: str
) -> bool:
    """Book one completed request once; later completions of the same request are ignored.

    A worker that died after publishing but before acknowledging runs the job again and
    publishes a second completion with a new event id. The request id is the business key, so
    only the first completion the ledger sees is ever billed, and that completion is the
    request's canonical one: UsageBooked names it, the intake shows its output, and only its
    verdict counts for the request.
    """
    usage = Usage(
        event.prompt_tokens, event.completion_tokens, event.energy.energy_j, event.compute_s
    )
    prices = await prices_at(conn, event.tier, event.submitted_at)
    rates = await rates_at(conn, event.device, event.submitted_at)
    books = book_request(usage, prices, rates)
    inserted = await conn.fetchval(
        "INSERT INTO ledger.request_usage (request_id, completion_event_id, customer_id, tier, "
        "region, model, device, prompt_tokens, completion_tokens, energy_j, meter, "
        "energy_estimated, compute_s, energy_cost, compute_cost, cost, revenue, margin, "
        "currency, price_version, submitted_at, completed_at, plan_id, plan_version, "
        "charged_input_tokens, charged_output_tokens, revenue_input, revenue_output) "
        "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, "
        "$18, $19, $20, $21, $22, 'tier:' || $4, $23, $8, $9, $24::numeric, $17::numeric - $24) "
        "ON CONFLICT (request_id) DO NOTHING RETURNING true",
        event.request_id,
        event.event_id,
        event.customer_id,
        event.tier,
        event.region,
        event.model,
        event.device,
        event.prompt_tokens,
        event.completion_tokens,
        event.energy.energy_j,
        event.energy.meter,
        event.energy.estimated,
        event.compute_s,
        books.energy_cost,
        books.compute_cost,
        books.cost,
        books.revenue,
        books.margin,
        books.currency,
        books.price_version,
        event.submitted_at,
        event.occurred_at,
        prices.version,
        revenue(Usage(event.prompt_tokens, 0, usage.energy_j, usage.compute_s), prices),
    )
    if not inserted:
        return False
    booked = UsageBooked(
        **event.envelope_for("ledger"),
        tier=event.tier,
        prompt_tokens=event.prompt_tokens,
        completion_tokens=event.completion_tokens,
        energy_j=event.energy.energy_j,
        cost=books.cost,
        revenue=books.revenue,
        currency=books.currency,
        price_version=books.price_version,
        completion_event_id=event.event_id,
    )
    await enqueue(conn, SCHEMA, booked_stream, booked)
    return True


async def record_verdict(conn: asyncpg.Connection, event: QualityVerdict) -> None:
    """Keep the verdict on one completion; the request's is its booked completion's
    (the ledger.request_quality view)."""
    await conn.execute(
        "INSERT INTO ledger.quality (completion_event_id, request_id, verdict, signals, event_id) "
        "VALUES ($1, $2, $3, $4, $5) ON CONFLICT (completion_event_id) DO NOTHING",
        event.completion_event_id,
        event.request_id,
        event.verdict,
        [s.model_dump() for s in event.signals],
        event.event_id,
    )


async def record_power(conn: asyncpg.Connection, event: PowerSample) -> None:
    await conn.execute(
        "INSERT INTO ledger.power_samples (event_id, meter, device, estimated, window_start, "
        "window_end, energy_j, power_w) VALUES ($1, $2, $3, $4, $5, $6, $7, $8) "
        "ON CONFLICT (event_id) DO NOTHING",
        event.event_id,
        event.meter,
        event.device,
        event.estimated,
        event.window_start,
        event.window_end,
        event.energy_j,
        event.power_w,
    )
