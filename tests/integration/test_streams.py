"""At-least-once consumption on real Redis: redelivery, reclaim, dead letters."""

from __future__ import annotations

import asyncpg
from redis.asyncio import Redis as RedisClient

from tests.e2e.factory import free_port
from tests.integration.helpers import eventually, publish_body, publish_signed, started
from tokenmill import service
from tokenmill.events import Event, parse_event
from tokenmill.settings import Settings
from tokenmill.streams import Delivery, Streams, consume, prune_consumers


def consumer_of(stream: str, handler) -> service.Wiring:
    async def wire(rt: service.Runtime):
        consume(rt.broker, rt.settings, stream, "intake", handler)
        return []

    return wire


async def test_handler_failure_is_redelivered_until_it_succeeds(
    test_settings: Settings, redis: RedisClient
):
    stream = Streams(test_settings.stream_prefix).progress
    seen: list[str] = []

    async def flaky(event: Event, delivery: Delivery) -> None:
        seen.append(event.event_id)
        if len(seen) == 1:
            raise RuntimeError("first delivery fails")

    event = started("job_a")
    async with service.running("t", test_settings, consumer_of(stream, flaky), needs_db=False):
        await publish_signed(test_settings, stream, event)
        await eventually(lambda: _done(redis, stream, "intake", seen, 2))
    assert seen == [event.event_id, event.event_id]
    assert await redis.xlen(Streams.dead_letters(stream)) == 0


async def _done(redis: RedisClient, stream: str, group: str, seen: list, count: int) -> bool:
    pending = await redis.xpending(stream, group)
    return len(seen) >= count and pending["pending"] == 0


async def test_entry_of_a_dead_consumer_is_claimed_and_handled(
    test_settings: Settings, redis: RedisClient
):
    stream = Streams(test_settings.stream_prefix).progress
    event = started("job_b")
    await publish_signed(test_settings, stream, event)
    # A consumer reads the entry and dies before acknowledging it.
    await redis.xreadgroup("intake", "dead-consumer", {stream: ">"}, count=1)
    assert (await redis.xpending(stream, "intake"))["pending"] == 1

    handled: list[str] = []

    async def record(event: Event, delivery: Delivery) -> None:
        handled.append(event.event_id)

    async with service.running("t", test_settings, consumer_of(stream, record), needs_db=False):
        await eventually(lambda: _done(redis, stream, "intake", handled, 1))
    assert handled == [event.event_id]


async def test_malformed_entry_goes_to_dead_letters_and_consumer_goes_on(
    test_settings: Settings, redis: RedisClient
):
    stream = Streams(test_settings.stream_prefix).progress
    handled: list[str] = []

    async def record(event: Event, delivery: Delivery) -> None:
        handled.append(event.request_id)

    async with service.running("t", test_settings, consumer_of(stream, record), needs_db=False):
        await publish_body(test_settings, stream, "{not json")
        await publish_body(test_settings, stream, '{"type": "job.started", "request_id": 7}')
        await publish_signed(test_settings, stream, started("job_ok"))
        await eventually(lambda: _done(redis, stream, "intake", handled, 1))
        dlq = Streams.dead_letters(stream)
        await eventually(lambda: _length_is(redis, dlq, 2))
    entries = await redis.xrange(dlq)
    reasons = [fields[b"reason"].decode() for _, fields in entries]
    assert all(reason.startswith("malformed event") for reason in reasons), reasons
    assert entries[0][1][b"data"] == b"{not json"
    assert handled == ["job_ok"]


async def _length_is(redis: RedisClient, stream: str, length: int) -> bool:
    return await redis.xlen(stream) == length


async def test_entry_that_always_fails_is_dead_lettered_after_max_deliveries(
    test_settings: Settings, redis: RedisClient
):
    stream = Streams(test_settings.stream_prefix).progress
    attempts: list[str] = []

    async def always_fails(event: Event, delivery: Delivery) -> None:
        attempts.append(event.event_id)
        raise RuntimeError("poison")

    given_up: list[tuple[bytes, str]] = []

    async def give_up(raw: bytes, reason: str) -> None:
        given_up.append((raw, reason))

    async def wire(rt: service.Runtime):
        consume(rt.broker, rt.settings, stream, "intake", always_fails, on_give_up=give_up)
        return []

    async with service.running("t", test_settings, wire, needs_db=False):
        await publish_signed(test_settings, stream, started("job_poison"))
        dlq = Streams.dead_letters(stream)
        await eventually(lambda: _length_is(redis, dlq, 1), timeout_s=30)
    ((_, fields),) = await redis.xrange(dlq)
    assert b"delivered" in fields[b"reason"]
    assert len(attempts) == test_settings.max_deliveries
    ((raw, reason),) = given_up
    assert parse_event(raw).request_id == "job_poison" and "delivered" in reason
    assert (await redis.xpending(stream, "intake"))["pending"] == 0


async def test_idle_consumers_with_nothing_pending_are_pruned_and_busy_ones_kept(
    test_settings: Settings, redis: RedisClient
):
    stream = Streams(test_settings.stream_prefix).progress
    for request_id in ("job_1", "job_2"):
        await redis.xadd(stream, {"__data__": started(request_id).canonical_json()})
    ((_, [(done_id, _)]),) = await redis.xreadgroup("intake", "gone", {stream: ">"}, count=1)
    await redis.xack(stream, "intake", done_id)
    await redis.xreadgroup("intake", "crashed", {stream: ">"}, count=1)

    deleted = await prune_consumers(redis, [(stream, "intake")], idle_ms_min=0)

    names = {c["name"] for c in await redis.xinfo_consumers(stream, "intake")}
    assert deleted == 1 and names == {b"crashed"}, names


async def test_an_outage_of_the_handlers_storage_never_dead_letters_and_heals_once(
    test_settings: Settings, redis: RedisClient
):
    """Postgres unreachable for more than max_deliveries deliveries: nothing is dead-lettered,
    and once it answers again the entry is handled exactly once."""
    stream = Streams(test_settings.stream_prefix).progress
    storage = {"url": f"postgresql://postgres@127.0.0.1:{free_port()}/nothing_listens_here"}
    attempts: list[str] = []
    handled: list[str] = []

    async def needs_postgres(event: Event, delivery: Delivery) -> None:
        attempts.append(event.event_id)
        conn = await asyncpg.connect(storage["url"], timeout=2)
        try:
            await conn.fetchval("SELECT 1")
        finally:
            await conn.close()
        handled.append(event.event_id)

    event = started("job_outage")
    async with service.running("t", test_settings, consumer_of(stream, needs_postgres)):
        await publish_signed(test_settings, stream, event)

        async def delivered_past_the_limit() -> bool:
            return len(attempts) > test_settings.max_deliveries + 1

        await eventually(delivered_past_the_limit, timeout_s=60)
        assert handled == [] and await redis.xlen(Streams.dead_letters(stream)) == 0
        storage["url"] = test_settings.database_url
        await eventually(lambda: _done(redis, stream, "intake", handled, 1), timeout_s=60)
    assert handled == [event.event_id]
    assert await redis.xlen(Streams.dead_letters(stream)) == 0
