"""Ledger service: logs every event it consumes and books each request's cost and revenue.

Completions, the bulk of the traffic, are booked in batches (tokenmill.batches): a batch of
entries is logged, rated and posted in one transaction. Every other stream is consumed one
event per transaction.
"""

from __future__ import annotations

from tokenmill import service
from tokenmill.batches import Entry, consume_batches
from tokenmill.events import (
    EnergyInterval,
    Event,
    JobCompleted,
    PowerSample,
    PrepaidCreditAdded,
    QualityVerdict,
)
from tokenmill.ledger import audit, books
from tokenmill.streams import Delivery, consume


async def wire(rt: service.Runtime):
    slo = books.SloPolicy.from_settings(rt.settings)

    async def on_event(event: Event, delivery: Delivery) -> None:
        # The log append is the duplicate check: one transaction applies an event once.
        async with rt.db.acquire() as conn, conn.transaction():
            if not await books.append_event(conn, event, delivery.stream):
                return
            if isinstance(event, QualityVerdict):
                await books.record_verdict(conn, event)
            elif isinstance(event, PowerSample):
                await books.record_power(conn, event)
            elif isinstance(event, PrepaidCreditAdded):
                await books.record_prepaid(conn, event)
            elif isinstance(event, EnergyInterval):
                await books.record_energy(conn, event)

    async def on_completions(batch: list[Entry]) -> None:
        logged = [books.Logged(e.event, e.delivery.stream, e.body.decode()) for e in batch]
        completions = [x for x in logged if isinstance(x.event, JobCompleted)]
        others = [x for x in logged if not isinstance(x.event, JobCompleted)]
        async with rt.db.acquire() as conn, conn.transaction():
            # Failed jobs and other events of the completions stream are only logged.
            await books.append_events(conn, others)
            await books.book_completions(conn, completions, rt.streams.booked, slo)

    for stream in rt.streams.all(rt.settings.region):
        if stream != rt.streams.completions:
            consume(rt.broker, rt.settings, stream, "ledger", on_event)
    completions = consume_batches(
        rt.redis, rt.settings, rt.streams.completions, "ledger", on_completions,
        rt.settings.ledger_batch_max,
    )  # fmt: skip
    return [rt.outbox_relay(books.SCHEMA), completions, *audit.background(rt)]
