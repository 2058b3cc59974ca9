"""The transactional outbox on real Postgres and Redis: nothing committed is lost while Redis
is down, nothing rolled back is ever published, and order is kept."""

from __future__ import annotations

import asyncio
import contextlib

import asyncpg
import pytest
from redis.asyncio import Redis as RedisClient

from tests.integration.helpers import eventually, started
from tokenmill.events import parse_event
from tokenmill.outbox import OutboxRelay, enqueue
from tokenmill.settings import Settings
from tokenmill.streams import Streams


class FlakyRedis:
    """Publishes with XADD, but fails while `down` is set, as a Redis outage would."""

    def __init__(self, redis: RedisClient):
        self.redis = redis
        self.down = True
        self.failures = 0

    async def publish(self, rows: list[tuple[str, str, dict[str, str]]]) -> list[str]:
        if self.down:
            self.failures += 1
            raise ConnectionError("redis is down")
        return [
            (await self.redis.xadd(stream, {"__data__": body})).decode()
            for stream, body, _headers in rows
        ]


@pytest.fixture
async def relay_parts(pool: asyncpg.Pool, redis: RedisClient, test_settings: Settings):
    # Start from an empty intake outbox, so this test sees only its own rows.
    await pool.execute("UPDATE intake.outbox SET published_at = now() WHERE published_at IS NULL")
    flaky = FlakyRedis(redis)
    relay = OutboxRelay(pool, "intake", flaky.publish, test_settings)
    task = asyncio.create_task(relay.run())
    yield flaky, Streams(test_settings.stream_prefix).progress
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def test_events_committed_while_redis_is_down_are_published_in_order_when_it_is_back(
    relay_parts, pool: asyncpg.Pool, redis: RedisClient
):
    flaky, stream = relay_parts
    events = [started(f"job_{i}") for i in range(5)]
    for event in events:
        async with pool.acquire() as conn, conn.transaction():
            await enqueue(conn, "intake", stream, event)

    async def failed_twice() -> bool:
        return flaky.failures >= 2

    await eventually(failed_twice)
    unpublished = await pool.fetchval(
        "SELECT count(*) FROM intake.outbox WHERE published_at IS NULL"
    )
    assert unpublished == 5 and await redis.xlen(stream) == 0

    flaky.down = False

    async def all_published() -> bool:
        marked = "SELECT count(*) FROM intake.outbox WHERE published_at IS NULL"
        return await pool.fetchval(marked) == 0

    await eventually(all_published)
    entries = await redis.xrange(stream)
    published = [parse_event(f[b"__data__"]).event_id for _, f in entries]
    assert published == [e.event_id for e in events]
    # Each row records the entry it became, for the reconciler to look up.
    recorded = await pool.fetch(
        "SELECT entry_id FROM intake.outbox WHERE event_id = ANY($1) ORDER BY seq", published
    )
    assert [r["entry_id"] for r in recorded] == [entry_id.decode() for entry_id, _ in entries]


async def test_an_event_whose_transaction_rolled_back_is_never_published(
    relay_parts, pool: asyncpg.Pool, redis: RedisClient
):
    flaky, stream = relay_parts
    flaky.down = False
    rolled_back, committed = started("job_rolled_back"), started("job_committed")
    with contextlib.suppress(RuntimeError):
        async with pool.acquire() as conn, conn.transaction():
            await enqueue(conn, "intake", stream, rolled_back)
            raise RuntimeError("the business write failed")
    async with pool.acquire() as conn, conn.transaction():
        await enqueue(conn, "intake", stream, committed)

    async def one_published() -> bool:
        return await redis.xlen(stream) == 1

    await eventually(one_published)
    await asyncio.sleep(0.5)  # Give a wrongly queued second event time to show up.
    ((_, fields),) = await redis.xrange(stream)
    assert parse_event(fields[b"__data__"]).event_id == committed.event_id


async def test_enqueue_refuses_to_run_outside_a_transaction(pool: asyncpg.Pool):
    async with pool.acquire() as conn:
        with pytest.raises(AssertionError, match="outside a transaction"):
            await enqueue(conn, "intake", "tm.nowhere", started("job_x"))
