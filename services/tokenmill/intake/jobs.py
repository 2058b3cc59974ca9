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
from tokenmill.intake import admission
from tokenmill.intake.keys import Customer
from tokenmill.intake.requests import Api, GenerationRequest, fingerprint, model_input
from tokenmill.outbox import OUTBOX_COLUMNS, outbox_values
from tokenmill.streams import Streams

SCHEMA = "intake"
JOB_DONE_CHANNEL = "intake_job_done"


class IdempotencyConflict(Exception):
    """The idempotency key was used before with a different request body."""


class AlreadyFinished(Exception):
    """The job to cancel completed or failed already."""

    def __init__(self, row: asyncpg.Record):
        super().__init__(row["request_id"])
        self.row = row


async def key_used(pool: asyncpg.Pool, customer: Customer, idempotency_key: str) -> bool:
    """Whether the customer has made a request with this Idempotency-Key."""
    return await pool.fetchval(
        "SELECT EXISTS (SELECT FROM intake.requests WHERE customer_id = $1 "
        "AND idempotency_key = $2)",
        customer.customer_id,
        idempotency_key,
    )


# Why a job cancelled while queued never ran (its record's error).
CANCELLED_QUEUED = "cancelled before it started"


async def submit(
    pool: asyncpg.Pool,
    streams: Streams,
    customer: Customer,
    request: GenerationRequest,
    api: Api,
    model: str,
    idempotency_key: str | None,
    prompt_tokens: int,
) -> tuple[asyncpg.Record, bool]:
    """Record the request, hold its worst case and queue its job event atomically.

    Returns the request row and whether it was created now. A repeated idempotency key returns
    the first request's row and queues and holds nothing, so a retried POST is never run,
    held or billed twice. Raises admission.Refused, having written nothing, when the worst
    case does not fit the customer's budget, prepaid credit or included quota.
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
        try:
            row = await _accept(
                conn, event, request, api, idempotency_key, request_sha256, streams, prompt_tokens
            )
        except asyncpg.PostgresError as exc:
            if exc.sqlstate != admission.REFUSED_SQLSTATE:
                raise
            hold = await _hold_of(conn, event, prompt_tokens)
            raise admission.Refused(
                await admission.explain_refusal(
                    conn, customer.customer_id, customer.tier, event.occurred_at, hold
                )
            ) from exc
        if row is not None:
            return row, True
        existing = await conn.fetchrow(
            "SELECT * FROM intake.requests WHERE customer_id = $1 AND idempotency_key = $2",
            customer.customer_id,
            idempotency_key,
        )
    assert existing is not None, "no price plan in force for the customer, or a conflicting row"
    if existing["request_sha256"] != request_sha256:
        raise IdempotencyConflict(idempotency_key)
    return existing, False


# The worst case a request can cost: its prompt at the highest input price (cached input is
# never dearer, but a plan could say otherwise) and max_tokens at the highest output price,
# from the plan in force when it is submitted (contract: ledger.plan_at). Exact: prices are
# per million tokens, and multiplying by 0.000001 keeps every digit.
def _worst_case_sql(prompt_tokens: str, max_tokens: str, customer: str, tier: str, at: str):
    """The plan query, with the statement's own placeholders for its five inputs."""
    return f"""
SELECT p.quota_policy, p.included_tokens_monthly,
    ({prompt_tokens}::bigint * greatest(coalesce(p.input_per_mtok_max, 0),
                                       coalesce(p.cached_input_per_mtok_max, 0))
     + {max_tokens}::bigint * coalesce(p.output_per_mtok_max, 0)) * 0.000001 AS hold_amount
FROM ledger.plan_at(ledger.plan_for({customer}, {tier}, {at}), {at}) p"""


async def _hold_of(
    conn: asyncpg.Connection, event: JobSubmitted, prompt_tokens: int
) -> admission.Hold:
    """What the admission statement held (or tried to hold) for `event`."""
    plan = await conn.fetchrow(
        _worst_case_sql("$1", "$2", "$3", "$4", "$5"),
        prompt_tokens,
        event.max_tokens,
        event.customer_id,
        event.tier,
        event.occurred_at,
    )
    return admission.Hold(plan["hold_amount"], prompt_tokens + event.max_tokens)


# One statement, so one round trip and one implicit transaction: the request row, its outbox
# row and its hold are written together or not at all. A repeated idempotency key writes none
# of them (the hold and the outbox insert select from the request insert, which then returns
# nothing). The hold is one UPDATE whose WHERE is the check, re-evaluated on the row's latest
# version under its lock, so concurrent requests cannot both take the last of a budget. When
# it takes nothing, intake.refuse_admission raises and the whole statement is undone.
_ACCEPT_SQL = f"""
WITH plan AS ({_worst_case_sql("$18", "$11", "$2", "$3", "$12")}
), hold AS (
    SELECT p.*, (b.monthly_budget IS NOT NULL OR b.prepaid_balance IS NOT NULL
                 OR p.quota_policy = 'refuse') AS held
    FROM plan p JOIN intake.admission_balances b ON b.customer_id = $2
), request AS (
    INSERT INTO intake.requests (request_id, customer_id, tier, region, model, api,
        idempotency_key, request_sha256, prompt, messages, max_tokens, submitted_at,
        hold_amount, hold_tokens, hold_state)
    SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12,
        CASE WHEN h.held THEN h.hold_amount END,
        CASE WHEN h.held THEN $18::bigint + $11 END,
        CASE WHEN h.held THEN 'held' END
    FROM hold h
    ON CONFLICT (customer_id, idempotency_key) DO NOTHING
    RETURNING *
), taken AS (
    UPDATE intake.admission_balances b SET
        period = greatest(b.period, $19),
        held = b.held + r.hold_amount,
        period_held = CASE WHEN b.period < $19 THEN 0 ELSE b.period_held END + r.hold_amount,
        period_settled = CASE WHEN b.period < $19 THEN 0 ELSE b.period_settled END,
        period_tokens_held = CASE WHEN b.period < $19 THEN 0 ELSE b.period_tokens_held END
            + r.hold_tokens,
        period_tokens_used = CASE WHEN b.period < $19 THEN 0 ELSE b.period_tokens_used END,
        updated_at = now()
    FROM request r, plan p
    WHERE b.customer_id = $2 AND r.hold_state = 'held'
      AND (b.monthly_budget IS NULL OR r.hold_amount
           + CASE WHEN b.period < $19 THEN 0 ELSE b.period_held + b.period_settled END
           <= b.monthly_budget)
      AND (b.prepaid_balance IS NULL OR b.held + r.hold_amount <= b.prepaid_balance)
      AND (p.quota_policy <> 'refuse' OR r.hold_tokens
           + CASE WHEN b.period < $19 THEN 0 ELSE b.period_tokens_used + b.period_tokens_held END
           <= p.included_tokens_monthly)
    RETURNING b.customer_id
), queued AS (
    INSERT INTO intake.outbox {OUTBOX_COLUMNS}
    SELECT $13, $14, $15, $16, $17 FROM request
)
SELECT r.* FROM request r
WHERE CASE WHEN r.hold_state IS NULL OR EXISTS (SELECT FROM taken) THEN true
           ELSE intake.refuse_admission(r.customer_id) END"""


async def _accept(
    conn: asyncpg.Connection,
    event: JobSubmitted,
    request: GenerationRequest,
    api: Api,
    idempotency_key: str | None,
    request_sha256: str,
    streams: Streams,
    prompt_tokens: int,
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
        prompt_tokens,
        admission.period_of(event.occurred_at),
    )


async def find(pool: asyncpg.Pool, customer: Customer, request_id: str) -> asyncpg.Record | None:
    # Scoped by customer: another tenant's job is indistinguishable from a missing one.
    return await pool.fetchrow(
        "SELECT * FROM intake.requests WHERE request_id = $1 AND customer_id = $2",
        request_id,
        customer.customer_id,
    )


async def events(pool: asyncpg.Pool, customer: Customer, request_id: str) -> list[dict]:
    """The request's events in the ledger's log, through the view the ledger publishes for
    other services (ledger.request_events, migrations/0010), never its tables."""
    rows = await pool.fetch(
        "SELECT seq, event_id, event_type, occurred_at, position, hash "
        "FROM ledger.request_events WHERE request_id = $1 AND customer_id = $2 ORDER BY seq",
        request_id,
        customer.customer_id,
    )
    return [
        {
            "seq": row["seq"],
            "event_id": row["event_id"],
            "type": row["event_type"],
            "occurred_at": row["occurred_at"],
            "position": row["position"],
            "hash": row["hash"].hex() if row["hash"] is not None else None,
        }
        for row in rows
    ]


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
UPDATE intake.requests r SET
    status = CASE WHEN c.finish_reason = 'cancelled' THEN 'cancelled' ELSE 'completed' END,
    started_at = coalesce(r.started_at, r.submitted_at), completion_event_id = $1,
    completed_at = c.completed_at, output_text = c.output_text,
    finish_reason = c.finish_reason, prompt_tokens = c.prompt_tokens,
    completion_tokens = c.completion_tokens, queue_ms = c.queue_ms, ttft_ms = c.ttft_ms,
    e2e_ms = c.e2e_ms, energy_j = c.energy_j, meter = c.meter,
    energy_estimated = c.energy_estimated, cached_prompt_tokens = c.cached_prompt_tokens,
    error = NULL
FROM intake.completions c
WHERE c.completion_event_id = $1 AND r.request_id = c.request_id
  AND r.completion_event_id IS DISTINCT FROM $1
  AND (r.status IN ('queued', 'running') OR r.booked_completion_event_id = $1)"""


async def mark_completed(conn: asyncpg.Connection, event: JobCompleted) -> None:
    await conn.execute(
        "INSERT INTO intake.completions (completion_event_id, request_id, completed_at, "
        "output_text, finish_reason, prompt_tokens, completion_tokens, queue_ms, ttft_ms, "
        "e2e_ms, energy_j, meter, energy_estimated, cached_prompt_tokens) "
        "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14) "
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
        event.cached_prompt_tokens,
    )
    await _show_completion(conn, event.request_id, event.event_id)


async def _show_completion(conn: asyncpg.Connection, request_id: str, event_id: str) -> None:
    """Show completion `event_id` if it is the first one or the booked one."""
    if await conn.execute(_SHOW_COMPLETION_SQL, event_id) != "UPDATE 0":
        await _notify_done(conn, request_id)


async def mark_failed(conn: asyncpg.Connection, event: JobFailed) -> None:
    # A job whose customer cancelled it ends cancelled, whatever its worker then said.
    await conn.execute(
        "UPDATE intake.requests SET completed_at = $2, error = $3, status = CASE "
        "WHEN cancel_requested_at IS NULL THEN 'failed' ELSE 'cancelled' END "
        "WHERE request_id = $1 AND status IN ('queued', 'running')",
        event.request_id,
        event.occurred_at,
        event.reason,
    )
    # A failed job is never billed: give its hold back, once (the state moves only from held).
    released = await conn.fetchrow(
        "UPDATE intake.requests SET hold_state = 'released' "
        "WHERE request_id = $1 AND hold_state = 'held' "
        "RETURNING customer_id, submitted_at, hold_amount, hold_tokens, hold_state",
        event.request_id,
    )
    if released is not None:
        await admission.release(conn, released)
    await _notify_done(conn, event.request_id)


async def mark_booked(conn: asyncpg.Connection, event: UsageBooked) -> None:
    # Once per request (booked_at IS NULL), whatever the inbox let through: the charge is
    # settled and the hold, if the request still had one, released in this same transaction.
    booked = await conn.fetchrow(
        "UPDATE intake.requests SET booked_at = $2, revenue = $3, currency = $4, "
        "booked_completion_event_id = $5, "
        "hold_state = CASE WHEN hold_state = 'held' THEN 'settled' ELSE hold_state END "
        "WHERE request_id = $1 AND booked_at IS NULL "
        "RETURNING customer_id, submitted_at, hold_amount, hold_tokens, hold_state",
        event.request_id,
        event.occurred_at,
        event.revenue,
        event.currency,
        event.completion_event_id,
    )
    if booked is not None:
        tokens_used = event.prompt_tokens + event.completion_tokens
        await admission.settle(conn, booked, event.revenue, tokens_used)
    # The booked completion may not have reached the intake yet; then mark_completed shows it
    # when it does.
    if event.completion_event_id is not None:
        await _show_completion(conn, event.request_id, event.completion_event_id)


async def cancel(pool: asyncpg.Pool, customer: Customer, request_id: str) -> asyncpg.Record | None:
    """Record the customer's cancel of a job; its row, or None when it has no such job.

    A queued job is settled here at once: status cancelled, its hold released, never billed
    (the worker that picks it up skips it). A running one is marked, and its worker ends it
    (see `tokenstream.request_cancel`). Cancelling again changes nothing. Raises
    AlreadyFinished for a job that completed or failed.
    """
    async with pool.acquire() as conn, conn.transaction():
        row = await conn.fetchrow(
            "SELECT * FROM intake.requests WHERE request_id = $1 AND customer_id = $2 FOR UPDATE",
            request_id,
            customer.customer_id,
        )
        if row is None or row["status"] == "cancelled" or row["cancel_requested_at"]:
            return row
        if row["status"] in ("completed", "failed"):
            raise AlreadyFinished(row)
        if row["status"] == "running":
            return await conn.fetchrow(
                "UPDATE intake.requests SET cancel_requested_at = now() "
                "WHERE request_id = $1 RETURNING *",
                request_id,
            )
        cancelled = await conn.fetchrow(
            "UPDATE intake.requests SET status = 'cancelled', cancel_requested_at = now(), "
            "completed_at = now(), error = $2, "
            "hold_state = CASE WHEN hold_state = 'held' THEN 'released' ELSE hold_state END "
            "WHERE request_id = $1 RETURNING *",
            request_id,
            CANCELLED_QUEUED,
        )
        if row["hold_state"] == "held":
            await admission.release(conn, cancelled)
        await _notify_done(conn, request_id)
        return cancelled


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
                if row["status"] in ("completed", "failed", "cancelled") or remaining_s <= 0:
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
