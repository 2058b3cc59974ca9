"""The intake's records: accepting a job with its outbox event, and following it to the books."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import asyncpg

from tokenmill.db import listening
from tokenmill.events import (
    JobCompleted,
    JobFailed,
    JobStarted,
    JobSubmitted,
    UsageBooked,
    new_id,
)
from tokenmill.intake.keys import Customer
from tokenmill.intake.requests import Api, GenerationRequest, fingerprint, model_input
from tokenmill.outbox import OUTBOX_COLUMNS, outbox_values
from tokenmill.streams import Streams

SCHEMA = "intake"
JOB_DONE_CHANNEL = "intake_job_done"


class IdempotencyConflict(Exception):
    """The idempotency key was used before with a different request body."""


async def submit(
    pool: asyncpg.Pool,
    streams: Streams,
    customer: Customer,
    request: GenerationRequest,
    api: Api,
    model: str,
    idempotency_key: str | None,
) -> tuple[asyncpg.Record, bool]:
    """Record the request and queue its job event atomically.

    Returns the request row and whether it was created now. A repeated idempotency key returns
    the first request's row and queues nothing, so a retried POST is never run or billed twice.
    """
    request_sha256 = fingerprint(request, api)
    prompt, messages = model_input(request, api)
    event = JobSubmitted(
        producer="intake",
        customer_id=customer.customer_id,
        request_id=f"job_{new_id()}",
        region=customer.region,
        tier=customer.tier,
        model=model,
        prompt=prompt,
        messages=messages,
        max_tokens=request.max_tokens,
        temperature=request.temperature,
        top_p=request.top_p,
        stop=tuple(request.stop or ()),
        seed=request.seed,
    )
    async with pool.acquire() as conn:
        row = await _accept(conn, event, request, api, idempotency_key, request_sha256, streams)
        if row is not None:
            return row, True
        existing = await conn.fetchrow(
            "SELECT * FROM intake.requests WHERE customer_id = $1 AND idempotency_key = $2",
            customer.customer_id,
            idempotency_key,
        )
    assert existing is not None, "a conflicting row must exist"
    if existing["request_sha256"] != request_sha256:
        raise IdempotencyConflict(idempotency_key)
    return existing, False


# One statement, so one round trip and one implicit transaction: the request row and its
# outbox row are written together or not at all, and a repeated idempotency key writes
# neither (the outbox insert selects from the request insert, which then returns nothing).
_ACCEPT_SQL = f"""
WITH request AS (
    INSERT INTO intake.requests (request_id, customer_id, tier, region, model, api,
        idempotency_key, request_sha256, prompt, messages, max_tokens, submitted_at)
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)
    ON CONFLICT (customer_id, idempotency_key) DO NOTHING
    RETURNING *
), queued AS (
    INSERT INTO intake.outbox {OUTBOX_COLUMNS}
    SELECT $13, $14, $15, $16, $17 FROM request
)
SELECT * FROM request"""


async def _accept(
    conn: asyncpg.Connection,
    event: JobSubmitted,
    request: GenerationRequest,
    api: Api,
    idempotency_key: str | None,
    request_sha256: str,
    streams: Streams,
) -> asyncpg.Record | None:
    # The row keeps what the client sent; the event carries what the model is given.
    return await conn.fetchrow(
        _ACCEPT_SQL,
        event.request_id,
        event.customer_id,
        event.tier,
        event.region,
        event.model,
        api,
        idempotency_key,
        request_sha256,
        request.prompt,
        [m.model_dump() for m in request.messages] if request.messages else None,
        event.max_tokens,
        event.occurred_at,
        *outbox_values(streams.jobs(event.region), event),
    )


async def find(pool: asyncpg.Pool, customer: Customer, request_id: str) -> asyncpg.Record | None:
    # Scoped by customer: another tenant's job is indistinguishable from a missing one.
    return await pool.fetchrow(
        "SELECT * FROM intake.requests WHERE request_id = $1 AND customer_id = $2",
        request_id,
        customer.customer_id,
    )


async def mark_started(conn: asyncpg.Connection, event: JobStarted) -> None:
    await conn.execute(
        "UPDATE intake.requests SET status = 'running', started_at = $2 "
        "WHERE request_id = $1 AND status = 'queued'",
        event.request_id,
        event.occurred_at,
    )


# A re-run job can complete twice with different outputs, and the ledger decides which one is
# canonical: the one it booked, named by UsageBooked. Waiting for the booking before answering
# would add the ledger's round trip to every chat request, so the intake keeps every
# completion it sees (intake.completions) and shows the first one at once, provisionally; once
# the booking names another, the request switches to that one. The switch happens only for a
# re-run that the streams delivered in a different order to the intake and the ledger, and
# afterwards output, usage and bill all refer to the same completion.
_SHOW_COMPLETION_SQL = """
UPDATE intake.requests r SET status = 'completed',
    started_at = coalesce(r.started_at, r.submitted_at), completion_event_id = $1,
    completed_at = c.completed_at, output_text = c.output_text,
    finish_reason = c.finish_reason, prompt_tokens = c.prompt_tokens,
    completion_tokens = c.completion_tokens, queue_ms = c.queue_ms, ttft_ms = c.ttft_ms,
    e2e_ms = c.e2e_ms, energy_j = c.energy_j, meter = c.meter,
    energy_estimated = c.energy_estimated, error = NULL
FROM intake.completions c
WHERE c.completion_event_id = $1 AND r.request_id = c.request_id
  AND r.completion_event_id IS DISTINCT FROM $1
  AND (r.status IN ('queued', 'running') OR r.booked_completion_event_id = $1)"""


async def mark_completed(conn: asyncpg.Connection, event: JobCompleted) -> None:
    await conn.execute(
        "INSERT INTO intake.completions (completion_event_id, request_id, completed_at, "
        "output_text, finish_reason, prompt_tokens, completion_tokens, queue_ms, ttft_ms, "
        "e2e_ms, energy_j, meter, energy_estimated) "
        "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13) "
        "ON CONFLICT (completion_event_id) DO NOTHING",
        event.event_id,
        event.request_id,
        event.occurred_at,
        event.text,
        event.finish_reason,
        event.prompt_tokens,
        event.completion_tokens,
        event.queue_ms,
        event.ttft_ms,
        event.e2e_ms,
        event.energy.energy_j,
        event.energy.meter,
        event.energy.estimated,
    )
    await _show_completion(conn, event.request_id, event.event_id)


async def _show_completion(conn: asyncpg.Connection, request_id: str, event_id: str) -> None:
    """Show completion `event_id` if it is the first one or the booked one."""
    if await conn.execute(_SHOW_COMPLETION_SQL, event_id) != "UPDATE 0":
        await _notify_done(conn, request_id)


async def mark_failed(conn: asyncpg.Connection, event: JobFailed) -> None:
    await conn.execute(
        "UPDATE intake.requests SET status = 'failed', completed_at = $2, error = $3 "
        "WHERE request_id = $1 AND status IN ('queued', 'running')",
        event.request_id,
        event.occurred_at,
        event.reason,
    )
    await _notify_done(conn, event.request_id)


async def mark_booked(conn: asyncpg.Connection, event: UsageBooked) -> None:
    await conn.execute(
        "UPDATE intake.requests SET booked_at = $2, revenue = $3, currency = $4, "
        "booked_completion_event_id = $5 WHERE request_id = $1 AND booked_at IS NULL",
        event.request_id,
        event.occurred_at,
        event.revenue,
        event.currency,
        event.completion_event_id,
    )
    # The booked completion may not have reached the intake yet; then mark_completed shows it
    # when it does.
    if event.completion_event_id is not None:
        await _show_completion(conn, event.request_id, event.completion_event_id)


async def _notify_done(conn: asyncpg.Connection, request_id: str) -> None:
    await conn.execute("SELECT pg_notify($1, $2)", JOB_DONE_CHANNEL, request_id)


class CompletionWaiter:
    """Wakes HTTP handlers waiting for a job, whichever intake replica consumed its completion.

    The replica that records a completion sends NOTIFY; every replica listens and wakes its
    own waiters. A slow poll covers a notification missed during a reconnect.
    """

    POLL_S = 1.0

    def __init__(self, pool: asyncpg.Pool):
        self._pool = pool
        self._waiters: dict[str, set[asyncio.Event]] = {}

    def listening(self) -> contextlib.AbstractAsyncContextManager[None]:
        """Hear completions while the block runs; waits only wake up inside it."""
        return listening(self._pool, JOB_DONE_CHANNEL, self._on_notify)

    def _on_notify(self, _conn: Any, _pid: int, _channel: str, request_id: str) -> None:
        for event in self._waiters.get(request_id, ()):
            event.set()

    async def wait(self, customer: Customer, request_id: str, timeout_s: float) -> asyncpg.Record:
        """The request's row once it has finished, or the latest row when `timeout_s` ran out."""
        wake = asyncio.Event()
        self._waiters.setdefault(request_id, set()).add(wake)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        try:
            while True:
                row = await find(self._pool, customer, request_id)
                assert row is not None, request_id
                remaining_s = deadline - loop.time()
                if row["status"] in ("completed", "failed") or remaining_s <= 0:
                    return row
                wake.clear()
                # asyncio.timeout, not wait_for: on Python 3.11 wait_for swallows a cancellation
                # that arrives as the wake-up does, and a draining intake could not cut the wait
                # short.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(min(self.POLL_S, remaining_s)):
                        await wake.wait()
        finally:
            self._waiters[request_id].discard(wake)
            if not self._waiters[request_id]:
                del self._waiters[request_id]
