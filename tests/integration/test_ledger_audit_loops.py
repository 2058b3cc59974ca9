"""The ledger's audit loops on live streams: every event it logs is sealed exactly once, with
two ledger processes and redeliveries, and a stream is trimmed once the ledger archived it."""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path

import asyncpg
from redis.asyncio import Redis as RedisClient

from tests.integration.helpers import eventually, publish_signed, started
from tokenmill import service
from tokenmill.ledger import chain
from tokenmill.ledger.main import wire as ledger_wire
from tokenmill.settings import Settings
from tokenmill.streams import Streams


async def _sealed(pool: asyncpg.Pool, request_id: str) -> list[int]:
    rows = await pool.fetch(
        "SELECT c.position FROM ledger.events e JOIN ledger.event_chain c "
        "ON c.event_seq = e.seq WHERE e.request_id = $1",
        request_id,
    )
    return [row["position"] for row in rows]


async def test_two_ledgers_seal_every_event_once_and_trim_what_they_archived(
    test_settings: Settings, redis: RedisClient, pool: asyncpg.Pool, tmp_path: Path
) -> None:
    key_file = tmp_path / "audit.key"
    key_file.write_text(chain.new_seed_hex())
    settings = dataclasses.replace(
        test_settings,
        audit_seal_interval_s=0.05,
        audit_seal_batch_max=3,
        audit_checkpoint_interval_s=0.2,
        audit_key_file=str(key_file),
        retention_interval_s=0.2,
        stream_keep_entries_min=0,
        stream_keep_s=0,
    )
    stream = Streams(settings.stream_prefix).power  # read by the ledger alone
    events = [started(f"job_sealed_{n}_{settings.stream_prefix}") for n in range(12)]
    async with contextlib.AsyncExitStack() as stack:
        for name in ("ledger-a", "ledger-b"):
            await stack.enter_async_context(
                service.running("ledger", dataclasses.replace(settings, consumer=name), ledger_wire)
            )
        for event in events + events[:4]:  # the first four published twice: redeliveries
            await publish_signed(settings, stream, event)

        async def all_sealed() -> bool:
            return all([len(await _sealed(pool, e.request_id)) == 1 for e in events])

        await eventually(all_sealed)
        await eventually(lambda: _length_is(redis, stream, 0))
        await eventually(lambda: _checkpoint_covers(pool, events[-1].request_id))
    positions = [p for e in events for p in await _sealed(pool, e.request_id)]
    assert len(set(positions)) == len(events)


async def _length_is(redis: RedisClient, stream: str, length: int) -> bool:
    return await redis.xlen(stream) == length


async def _checkpoint_covers(pool: asyncpg.Pool, request_id: str) -> bool:
    return bool(
        await pool.fetchval(
            "SELECT max(k.position) >= max(c.position) FROM ledger.checkpoints k, "
            "ledger.events e JOIN ledger.event_chain c ON c.event_seq = e.seq "
            "WHERE e.request_id = $1",
            request_id,
        )
    )
