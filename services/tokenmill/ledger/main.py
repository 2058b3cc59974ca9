"""Ledger service: logs every event it consumes and books each request's cost and revenue.

Every stream is consumed in batches (tokenmill.batches): a batch of entries is logged and
applied in one transaction, up to `ledger_batch_max` entries, so the ledger keeps up with a
busy factory's four or five events a request. Completions are rated and posted a batch at a
time; the other streams' events are applied kind by kind (`books.apply_logged`).
"""

from __future__ import annotations

from tokenmill import service
from tokenmill.batches import Entry, consume_batches
from tokenmill.ledger import audit, books


async def wire(rt: service.Runtime):
    slo = books.SloPolicy.from_settings(rt.settings)
    async with rt.db.acquire() as conn:
        await books.log_slo_policy(conn, slo, rt.streams.ledger, rt.settings.region)

    async def on_events(batch: list[Entry]) -> None:
        # The log append is the duplicate check: one transaction applies an event once.
        async with rt.db.acquire() as conn, conn.transaction():
            await books.apply_events(conn, _logged(batch))

    async def on_completions(batch: list[Entry]) -> None:
        async with rt.db.acquire() as conn, conn.transaction():
            await books.apply_completions(conn, _logged(batch), rt.streams.booked, slo)

    consumers = [
        consume_batches(
            rt.redis,
            rt.settings,
            stream,
            "ledger",
            on_completions if stream == rt.streams.completions else on_events,
            rt.settings.ledger_batch_max,
        )
        for stream in rt.streams.all(rt.settings.region)
    ]
    return [rt.outbox_relay(books.SCHEMA), *consumers, *audit.background(rt)]


def _logged(batch: list[Entry]) -> list[books.Logged]:
    """The batch's events as the log keeps them: with the text their producers signed."""
    return [books.Logged(e.event, e.delivery.stream, e.body.decode()) for e in batch]
