"""Retention never drops work: a stream keeps every entry some group still needs or the ledger
has not archived, and the outbox and inbox keep every row a relay or a redelivery needs."""

from __future__ import annotations

import dataclasses
import json
import time

import asyncpg
from redis.asyncio import Redis as RedisClient

from tests.integration.audit_helpers import audit_db, audit_pool, template_db
from tokenmill import retention
from tokenmill.settings import Settings
from tokenmill.streams import Streams

__all__ = ["audit_db", "audit_pool", "template_db"]  # Fixtures, used by name.


def _no_keep(settings: Settings, **overrides: object) -> Settings:
    return dataclasses.replace(settings, stream_keep_entries_min=0, stream_keep_s=0, **overrides)


async def _fill(redis: RedisClient, stream: str, count: int) -> list[str]:
    ids = [await redis.xadd(stream, {"n": str(n)}) for n in range(count)]
    return [i.decode() for i in ids]


async def _consume(redis: RedisClient, stream: str, group: str, read: int, ack: int) -> None:
    """`group` reads `read` new entries and acknowledges the first `ack` of them."""
    reply = await redis.xreadgroup(group, "c1", {stream: ">"}, count=read)
    ids = [entry_id for entry_id, _ in reply[0][1]] if reply else []
    assert len(ids) == read
    if ack:
        await redis.xack(stream, group, *ids[:ack])


async def _ids(redis: RedisClient, stream: str) -> list[str]:
    return [i.decode() for i, _ in await redis.xrange(stream)]


async def test_a_slow_group_keeps_its_pending_and_unread_entries(
    test_settings: Settings, redis: RedisClient
) -> None:
    settings = _no_keep(test_settings)
    stream = Streams(settings.stream_prefix).completions
    ids = await _fill(redis, stream, 10)
    await _consume(redis, stream, "ledger", read=10, ack=10)
    await _consume(redis, stream, "inspector", read=10, ack=3)  # 4th..10th pending
    await _consume(redis, stream, "intake", read=5, ack=5)  # 6th..10th unread

    dry = await retention.trim_streams(redis, settings, dry_run=True)
    planned = {t.stream: t for t in dry}[stream]
    assert (planned.floor_id, planned.trimmed) == (ids[3], 3)
    assert "inspector has 7 pending" in planned.reason
    assert await _ids(redis, stream) == ids, "a dry run changes nothing"

    done = {t.stream: t for t in await retention.trim_streams(redis, settings)}[stream]
    assert done.trimmed == 3
    assert await _ids(redis, stream) == ids[3:]


async def test_an_unarchived_entry_is_never_trimmed(
    test_settings: Settings, redis: RedisClient
) -> None:
    settings = _no_keep(test_settings)
    stream = Streams(settings.stream_prefix).completions
    ids = await _fill(redis, stream, 10)
    for group in ("intake", "inspector"):
        await _consume(redis, stream, group, read=10, ack=10)
    await _consume(redis, stream, "ledger", read=6, ack=6)  # the ledger archived six

    await retention.trim_streams(redis, settings)
    assert await _ids(redis, stream) == ids[6:]


async def test_retention_per_stream_keeps_entries_and_time(
    test_settings: Settings, redis: RedisClient
) -> None:
    settings = _no_keep(test_settings, stream_keep="completions=8:0")
    streams = Streams(settings.stream_prefix)
    ids = await _fill(redis, streams.completions, 10)
    for group in ("intake", "inspector", "ledger"):
        await _consume(redis, streams.completions, group, read=10, ack=10)
    await retention.trim_streams(redis, settings)
    assert await _ids(redis, streams.completions) == ids[2:]

    await _fill(redis, streams.quality, 4)
    await _consume(redis, streams.quality, "ledger", read=4, ack=4)
    kept = dataclasses.replace(settings, stream_keep_s=3600.0)
    await retention.trim_streams(redis, kept)
    assert await redis.xlen(streams.quality) == 4, "younger than an hour: kept"


def test_a_malformed_retention_setting_is_refused(settings: Settings) -> None:
    for bad in ("completions=8", "nosuch=1:1", "completions=a:1"):
        try:
            retention.keep_by_stream(dataclasses.replace(settings, stream_keep=bad), ["x"])
        except retention.RetentionConfigError as exc:
            assert bad.split("=")[0] in str(exc) or "unknown" in str(exc)
        else:
            raise AssertionError(f"{bad!r} was accepted")


async def test_outbox_and_inbox_pruning_keeps_what_may_still_be_needed(
    test_settings: Settings, redis: RedisClient, audit_pool: asyncpg.Pool
) -> None:
    settings = _no_keep(test_settings, outbox_keep_s=0, inbox_keep_s=0, reconcile_window_s=0)
    streams = Streams(settings.stream_prefix)
    async with audit_pool.acquire() as conn:
        await conn.execute(
            "INSERT INTO intake.customers (customer_id, name, tier, region) "
            "VALUES ('cus_1', 'c', 'standard', 'eu-west');"
            "INSERT INTO intake.requests (request_id, customer_id, tier, region, model, api, "
            "request_sha256, max_tokens) VALUES ('req_q', 'cus_1', 'standard', 'eu-west', 'm', "
            "'jobs', 'x', 8)"
        )
        rows = [
            ("e_unpublished", "job.started", None),
            ("e_published", "job.started", "now() - interval '1 hour'"),
            ("e_queued_job", "job.submitted", "now() - interval '1 hour'"),
        ]
        for event_id, event_type, published in rows:
            await conn.execute(
                "INSERT INTO intake.outbox (event_id, event_type, stream, body, published_at) "
                f"VALUES ($1, $2, 'x', $3, {published or 'NULL'})",
                event_id,
                event_type,
                json.dumps({"request_id": "req_q"}),
            )
        # The progress stream still holds an entry: inbox rows of events received after it
        # could come back with it and are kept; one received before it cannot.
        await conn.execute(
            "INSERT INTO intake.inbox (event_id, event_type, stream, received_at) VALUES "
            "('i_old', 't', $1, now() - interval '2 hours'), ('i_new', 't', $1, now())",
            streams.progress,
        )
        await redis.xadd(streams.progress, {"n": "1"}, id=f"{_ms_ago(3600)}-0")

        dry = await retention.prune_tables(audit_pool, redis, settings, dry_run=True)
        assert {p.schema: (p.outbox_rows, p.inbox_rows) for p in dry}["intake"] == (1, 1)
        await retention.prune_tables(audit_pool, redis, settings)
        outbox = await conn.fetch("SELECT event_id FROM intake.outbox ORDER BY event_id")
        inbox = await conn.fetch("SELECT event_id FROM intake.inbox")
    assert [r["event_id"] for r in outbox] == ["e_queued_job", "e_unpublished"]
    assert [r["event_id"] for r in inbox] == ["i_new"]


def _ms_ago(seconds: int) -> int:
    return int((time.time() - seconds) * 1000)
