"""`tokenmill dlq` on real Redis: a dead letter replayed is handled once and leaves the dead
letters; a forged one is only replayed when the operator vouches for it."""

from __future__ import annotations

import json

from redis.asyncio import Redis as RedisClient

from tests.integration.helpers import eventually, publish_signed, started
from tests.integration.test_streams import consumer_of
from tokenmill import deadletters, service
from tokenmill.cli import parser
from tokenmill.events import Event
from tokenmill.settings import Settings
from tokenmill.streams import Delivery, Streams


async def dlq(settings: Settings, *argv: str) -> tuple[object, bool]:
    output, done = await deadletters.command(
        settings, parser().parse_args(["dlq", *argv, "--json"])
    )
    return json.loads(output), done


async def dead_letter_count(redis: RedisClient, stream: str) -> int:
    return await redis.xlen(Streams.dead_letters(stream))


async def test_a_replayed_dead_letter_is_handled_once_and_leaves_the_dead_letters(
    test_settings: Settings, redis: RedisClient
):
    stream = Streams(test_settings.stream_prefix).progress
    broken = True
    handled: list[str] = []

    async def fails_until_fixed(event: Event, delivery: Delivery) -> None:
        if broken:
            raise ValueError("a bug, fixed by the next release")
        handled.append(event.event_id)

    event = started("job_replayed")
    async with service.running("t", test_settings, consumer_of(stream, fails_until_fixed)):
        await publish_signed(test_settings, stream, event)

        async def dead_lettered() -> bool:
            return await dead_letter_count(redis, stream) == 1

        await eventually(dead_lettered, timeout_s=30)
        listing, _ = await dlq(test_settings, "list", "--stream", stream)
        ((only,),) = [s["entries"] for s in listing]
        assert listing[0]["count"] == 1 and only["group"] == "intake"
        assert only["stream"] == stream and "delivered" in only["reason"]
        shown, _ = await dlq(test_settings, "show", only["id"])
        assert json.loads(shown["data"])["event_id"] == event.event_id

        broken = False
        outcomes, done = await dlq(test_settings, "replay", "--all")
        assert done and outcomes == [{"id": only["id"], "stream": stream, "outcome": "replayed"}]

        async def handled_once() -> bool:
            return handled == [event.event_id]

        await eventually(handled_once)
        again, _ = await dlq(test_settings, "replay", "--all")
        assert again == []
    assert handled == [event.event_id]
    assert await dead_letter_count(redis, stream) == 0


async def test_a_forged_dead_letter_is_replayed_only_when_the_operator_vouches_for_it(
    test_settings: Settings, redis: RedisClient
):
    stream = Streams(test_settings.stream_prefix).progress
    handled: list[str] = []

    async def record(event: Event, delivery: Delivery) -> None:
        handled.append(event.request_id)

    async with service.running("t", test_settings, consumer_of(stream, record)):
        await redis.xadd(stream, {"__data__": started("job_unsigned").canonical_json()})

        async def dead_lettered() -> bool:
            return await dead_letter_count(redis, stream) == 1

        await eventually(dead_lettered)
        ((listed,),) = [s["entries"] for s in (await dlq(test_settings, "list"))[0] if s["count"]]
        refused, done = await dlq(test_settings, "replay", listed["id"])
        assert not done and refused[0]["outcome"].startswith("refused: unsigned event")
        assert await dead_letter_count(redis, stream) == 1 and handled == []

        vouched, done = await dlq(test_settings, "replay", listed["id"], "--resign")
        assert done and vouched[0]["outcome"] == "replayed"

        async def handled_once() -> bool:
            return handled == ["job_unsigned"]

        await eventually(handled_once)
    assert await dead_letter_count(redis, stream) == 0
