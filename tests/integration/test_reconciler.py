"""The reconciler on real Postgres and Redis: an event whose stream entry Redis lost is
republished with the same event id; one whose entry is still there, or whose consumers have
all recorded it, is left alone."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator

import asyncpg
import httpx
import pytest
from redis.asyncio import Redis as RedisClient

from tests.integration.helpers import eventually, started
from tests.integration.test_intake_api import auth, new_key
from tokenmill.events import Event, QualityVerdict, parse_event
from tokenmill.intake.api import create_app
from tokenmill.intake.main import wire
from tokenmill.ledger.books import append_event
from tokenmill.outbox import enqueue, mark_published
from tokenmill.reconciler import Reconciler
from tokenmill.settings import Settings
from tokenmill.streams import Streams


@pytest.fixture
def eager(test_settings: Settings) -> Settings:
    """Reconcile every fifth of a second, rows published any time ago."""
    return dataclasses.replace(
        test_settings,
        reconcile_interval_s=0.2,
        reconcile_after_s=0.0,
        reconcile_batch_max=1000,
    )


@pytest.fixture
async def client(eager: Settings) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(eager, wire)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://intake") as http:
            yield http


def event_of(fields: dict[bytes, bytes]) -> Event:
    data = fields[b"__data__"]
    return parse_event(data[data.index(b"{") :])


async def accept_two_jobs(client: httpx.AsyncClient, pool: asyncpg.Pool) -> list[asyncpg.Record]:
    """Two accepted jobs, once both are relayed: their outbox rows."""
    key = await new_key(pool)
    ids = []
    for prompt in ("first", "second"):
        response = await client.post(
            "/v1/jobs", json={"prompt": prompt, "max_tokens": 4}, headers=auth(key)
        )
        assert response.status_code == 202, response.text
        ids.append(response.json()["id"])
    query = (
        "SELECT o.* FROM intake.outbox o WHERE o.body::jsonb ->> 'request_id' = ANY($1) "
        "ORDER BY o.seq"
    )

    async def relayed() -> bool:
        return all(r["entry_id"] for r in await pool.fetch(query, ids))

    await eventually(relayed)
    return await pool.fetch(query, ids)


async def test_a_job_whose_entry_was_lost_is_republished_and_a_present_one_is_not(
    client: httpx.AsyncClient, pool: asyncpg.Pool, redis: RedisClient, eager: Settings
):
    stream = Streams(eager.stream_prefix).jobs("eu-west")
    lost, kept = await accept_two_jobs(client, pool)
    # Redis loses the first entry, as a machine crash before its fsync would.
    assert await redis.xdel(stream, lost["entry_id"]) == 1

    async def republished() -> bool:
        entry_id = await pool.fetchval(
            "SELECT entry_id FROM intake.outbox WHERE seq = $1", lost["seq"]
        )
        return entry_id != lost["entry_id"]

    await eventually(republished)
    await asyncio.sleep(1.0)  # Several more rounds: a wrong republish would show up.
    # A worker reading the stream gets each job once, the lost one with its own event id.
    ((_, entries),) = await redis.xreadgroup("worker", "w", {stream: ">"}, count=10)
    assert sorted(event_of(f).event_id for _, f in entries) == sorted(
        [lost["event_id"], kept["event_id"]]
    )
    assert (
        await pool.fetchval("SELECT entry_id FROM intake.outbox WHERE seq = $1", kept["seq"])
        == kept["entry_id"]
    )


async def test_a_lost_stream_is_recreated_with_its_groups(
    client: httpx.AsyncClient, pool: asyncpg.Pool, redis: RedisClient, eager: Settings
):
    stream = Streams(eager.stream_prefix).jobs("eu-west")
    rows = await accept_two_jobs(client, pool)
    assert await redis.delete(stream) == 1

    async def both_back() -> bool:
        return await redis.xlen(stream) == 2

    await eventually(both_back)
    ((_, entries),) = await redis.xreadgroup("worker", "w", {stream: ">"}, count=10)
    assert sorted(event_of(f).event_id for _, f in entries) == sorted(r["event_id"] for r in rows)


async def test_a_verdict_is_republished_only_while_the_ledger_lacks_it(
    pool: asyncpg.Pool, redis: RedisClient, eager: Settings
):
    stream = Streams(eager.stream_prefix).quality

    async def publish(rows: list[tuple[str, str, dict[str, str]]]) -> list[str]:
        return [(await redis.xadd(s, {"__data__": body})).decode() for s, body, _ in rows]

    verdicts = [verdict_for(f"job_v{i}") for i in range(2)]
    async with pool.acquire() as conn, conn.transaction():
        for verdict in verdicts:
            await enqueue(conn, "inspector", stream, verdict)
        seqs = await conn.fetch(
            "SELECT seq, stream, body FROM inspector.outbox WHERE event_id = ANY($1) ORDER BY seq",
            [v.event_id for v in verdicts],
        )
        entry_ids = await publish([(r["stream"], r["body"], {}) for r in seqs])
        await mark_published(conn, "inspector", [r["seq"] for r in seqs], entry_ids)
    # Both entries vanish; the ledger had logged the second before (it was consumed, then
    # trimmed), so only the first is a loss.
    await redis.xdel(stream, *entry_ids)
    async with pool.acquire() as conn, conn.transaction():
        await append_event(conn, verdicts[1], stream)

    reconciler = Reconciler(pool, redis, "inspector", publish, eager, [(stream, "ledger")])
    assert await reconciler.reconcile_once() == [verdicts[0].event_id]
    assert await reconciler.reconcile_once() == []  # Its new entry is there now.
    ((_, fields),) = await redis.xrange(stream)
    assert event_of(fields).event_id == verdicts[0].event_id


def verdict_for(request_id: str) -> QualityVerdict:
    return QualityVerdict(
        **started(request_id).envelope_for("inspector"),
        completion_event_id=f"cmp_{request_id}",
        verdict="pass",
        signals=(),
    )
