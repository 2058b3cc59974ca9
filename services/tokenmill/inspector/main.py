"""Inspector service: one verdict per completed output, published for the books.

A re-run job can complete more than once with different outputs; each completion is judged
on its own, keyed by its event id, and the ledger counts the verdict on the completion it
booked.
"""

from __future__ import annotations

import asyncpg

from tokenmill import service
from tokenmill.db import first_delivery
from tokenmill.events import Event, JobCompleted, QualitySignal, QualityVerdict
from tokenmill.inspector.checks import inspect_output, verdict
from tokenmill.outbox import enqueue
from tokenmill.streams import Delivery, consume

SCHEMA = "inspector"


def judge(event: JobCompleted) -> QualityVerdict:
    signals = inspect_output(
        event.text, event.finish_reason, event.completion_tokens, event.max_tokens
    )
    return QualityVerdict(
        **event.envelope_for("inspector"),
        completion_event_id=event.event_id,
        verdict=verdict(signals),
        signals=tuple(
            QualitySignal(name=s.name, severity=s.severity, detail=s.detail) for s in signals
        ),
    )


async def record(conn: asyncpg.Connection, judged: QualityVerdict, quality_stream: str) -> None:
    """Store the verdict and queue its event, once per completion."""
    inserted = await conn.fetchval(
        "INSERT INTO inspector.verdicts (request_id, completion_event_id, verdict, signals, "
        "event_id) VALUES ($1, $2, $3, $4, $5) "
        "ON CONFLICT (completion_event_id) DO NOTHING RETURNING true",
        judged.request_id,
        judged.completion_event_id,
        judged.verdict,
        [s.model_dump() for s in judged.signals],
        judged.event_id,
    )
    if inserted:
        await enqueue(conn, SCHEMA, quality_stream, judged)


async def wire(rt: service.Runtime):
    async def on_completion(event: Event, delivery: Delivery) -> None:
        if not isinstance(event, JobCompleted):
            return
        judged = judge(event)
        async with rt.db.acquire() as conn, conn.transaction():
            if await first_delivery(conn, SCHEMA, event, delivery.stream):
                await record(conn, judged, rt.streams.quality)

    consume(rt.broker, rt.settings, rt.streams.completions, "inspector", on_completion)

    return [rt.outbox_relay(SCHEMA)]
