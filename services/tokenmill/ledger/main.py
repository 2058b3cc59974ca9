"""Ledger service: logs every event it consumes and books each request's cost and revenue."""

from __future__ import annotations

from tokenmill import service
from tokenmill.events import Event, JobCompleted, PowerSample, QualityVerdict
from tokenmill.ledger import audit, books
from tokenmill.streams import Delivery, consume


async def wire(rt: service.Runtime):
    async def on_event(event: Event, delivery: Delivery) -> None:
        # The log append is the duplicate check: one transaction applies an event once.
        async with rt.db.acquire() as conn, conn.transaction():
            if not await books.append_event(conn, event, delivery.stream):
                return
            if isinstance(event, JobCompleted):
                await books.book_completion(conn, event, rt.streams.booked)
            elif isinstance(event, QualityVerdict):
                await books.record_verdict(conn, event)
            elif isinstance(event, PowerSample):
                await books.record_power(conn, event)

    for stream in rt.streams.all(rt.settings.region):
        consume(rt.broker, rt.settings, stream, "ledger", on_event)

    return [rt.outbox_relay(books.SCHEMA), *audit.background(rt)]
