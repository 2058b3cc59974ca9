"""Signed events on real Redis and Postgres: the ledger books only what a key holder published,
and a newer producer's event reaches today's consumers."""

from __future__ import annotations

import json
from dataclasses import replace

import asyncpg
from redis.asyncio import Redis as RedisClient

from tests.integration.helpers import eventually, publish_body, publish_signed, started
from tests.unit.test_events import completed
from tokenmill import service
from tokenmill.events import canonical_json
from tokenmill.ledger.main import wire as ledger_wire
from tokenmill.settings import Settings
from tokenmill.signing import SigningKeys
from tokenmill.streams import Streams


async def dead_letters(redis: RedisClient, stream: str) -> list[dict[bytes, bytes]]:
    return [fields for _, fields in await redis.xrange(Streams.dead_letters(stream))]


async def logged_bodies(pool: asyncpg.Pool, request_id: str) -> list[str]:
    """The bodies the ledger logged for `request_id`, leaving out its own usage.booked."""
    rows = await pool.fetch(
        "SELECT body FROM ledger.events WHERE request_id = $1 AND event_type <> 'usage.booked'",
        request_id,
    )
    return [row["body"] for row in rows]


async def test_forged_and_badly_signed_completions_are_dead_lettered_never_booked(
    test_settings: Settings, redis: RedisClient, pool: asyncpg.Pool
):
    stream = Streams(test_settings.stream_prefix).completions
    forged = completed(request_id="job_forged")
    wrong_secret = SigningKeys.parse("test:a-secret-the-forger-guessed")
    unknown_kid = SigningKeys.parse("nokey:a-secret-the-forger-guessed")
    async with service.running("ledger", test_settings, ledger_wire):
        await redis.xadd(stream, {"__data__": forged.canonical_json()})
        await publish_body(test_settings, stream, forged.canonical_json(), wrong_secret)
        await publish_body(test_settings, stream, forged.canonical_json(), unknown_kid)
        await publish_signed(test_settings, stream, completed(request_id="job_genuine"))

        async def genuine_logged() -> bool:
            return len(await logged_bodies(pool, "job_genuine")) == 1

        await eventually(genuine_logged)
        await eventually(lambda: _dead_letter_count_is(redis, stream, 3))
    reasons = [fields[b"reason"].decode() for fields in await dead_letters(redis, stream)]
    assert reasons == ["unsigned event", "bad signature (key id test)", "unknown key id nokey"]
    assert await logged_bodies(pool, "job_forged") == []
    booked = "SELECT count(*) FROM ledger.request_usage WHERE request_id = 'job_forged'"
    assert await pool.fetchval(booked) == 0


async def _dead_letter_count_is(redis: RedisClient, stream: str, count: int) -> bool:
    return await redis.xlen(Streams.dead_letters(stream)) == count


async def test_after_rotation_events_signed_with_the_old_key_still_verify(
    test_settings: Settings, redis: RedisClient, pool: asyncpg.Pool
):
    stream = Streams(test_settings.stream_prefix).progress
    new_key = "new:the-new-deployment-secret"
    rotated = replace(test_settings, signing_keys=f"{new_key},{test_settings.signing_keys}")
    async with service.running("ledger", rotated, ledger_wire) as runtime:
        assert runtime.signing_keys.signing_key_id == "new"
        await publish_signed(test_settings, stream, started("job_old_key"))
        await publish_signed(rotated, stream, started("job_new_key"))

        async def both_logged() -> bool:
            logged = [await logged_bodies(pool, r) for r in ("job_old_key", "job_new_key")]
            return [len(bodies) for bodies in logged] == [1, 1]

        await eventually(both_logged)
    assert await redis.xlen(Streams.dead_letters(stream)) == 0


async def test_an_event_with_a_field_from_a_newer_version_is_handled_and_logged_as_sent(
    test_settings: Settings, redis: RedisClient, pool: asyncpg.Pool
):
    stream = Streams(test_settings.stream_prefix).completions
    newer = completed(request_id="job_newer").model_dump(mode="json")
    newer["carbon_g"] = "0.42"
    newer["energy"]["meter_serial"] = "A-1"
    body = canonical_json(newer)
    async with service.running("ledger", test_settings, ledger_wire):
        await publish_body(test_settings, stream, body)

        async def booked() -> bool:
            usage = "SELECT count(*) FROM ledger.request_usage WHERE request_id = 'job_newer'"
            return await pool.fetchval(usage) == 1

        await eventually(booked)
    assert await logged_bodies(pool, "job_newer") == [body]
    assert json.loads(body)["carbon_g"] == "0.42"
    assert await redis.xlen(Streams.dead_letters(stream)) == 0
