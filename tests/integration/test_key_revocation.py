"""API keys are refused within a second of their revocation on every intake process, and a
flood of unknown keys does not cost a Postgres lookup per request."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import secrets
import time
from collections.abc import AsyncIterator

import asyncpg

from tests.integration.helpers import eventually
from tokenmill.events import new_id
from tokenmill.intake.keys import (
    KEY_PREFIX,
    KEY_RANDOM_BYTES,
    KeyCache,
    create_customer,
    digest,
    issue_key,
)
from tokenmill.settings import Settings


async def new_key(pool: asyncpg.Pool) -> tuple[str, str]:
    async with pool.acquire() as conn, conn.transaction():
        customer = await create_customer(conn, "test", "standard", "eu-west")
        return customer.customer_id, await issue_key(conn, customer.customer_id)


@contextlib.asynccontextmanager
async def listening_cache(pool: asyncpg.Pool, settings: Settings) -> AsyncIterator[KeyCache]:
    cache = KeyCache(pool, settings)
    async with cache.listening():
        await eventually(lambda: _true(cache.listener_up))
        yield cache


async def _true(value: bool) -> bool:
    return value


async def revoke(pool: asyncpg.Pool, key: str) -> None:
    await pool.execute(
        "UPDATE intake.api_keys SET revoked_at = now() WHERE key_sha256 = $1", digest(key)
    )


async def seconds_until_refused(caches: list[KeyCache], key: str) -> float:
    """Poll every cache as requests would until each refuses `key`; the slowest one's time."""
    started_s = time.monotonic()
    waiting = list(caches)
    while waiting:
        waiting = [cache for cache in waiting if await cache.customer(key) is not None]
        assert time.monotonic() - started_s < 5, "a revoked key was still accepted after 5 s"
        await asyncio.sleep(0.01)
    return time.monotonic() - started_s


async def test_a_revoked_key_is_refused_within_a_second_by_every_intake_process(
    pool: asyncpg.Pool, settings: Settings
):
    _, key = await new_key(pool)
    async with listening_cache(pool, settings) as one, listening_cache(pool, settings) as two:
        for cache in (one, two):
            assert (await cache.customer(key)) is not None
        await revoke(pool, key)
        # Notified, not timed out: the TTL alone would take up to a second.
        assert await seconds_until_refused([one, two], key) < 0.5


async def test_a_tier_change_reaches_the_cache_at_once(pool: asyncpg.Pool, settings: Settings):
    customer_id, key = await new_key(pool)
    async with listening_cache(pool, settings) as cache:
        assert (await cache.customer(key)).tier == "standard"
        await pool.execute(
            "UPDATE intake.customers SET tier = 'premium' WHERE customer_id = $1", customer_id
        )

        async def premium() -> bool:
            return (await cache.customer(key)).tier == "premium"

        await eventually(premium, timeout_s=1.0)


async def test_without_its_listener_the_cache_still_forgets_within_a_second(
    pool: asyncpg.Pool, settings: Settings
):
    _, key = await new_key(pool)
    async with listening_cache(pool, settings) as listening:
        # Its listener connection dies; until it is back, the short TTL holds the guarantee.
        await pool.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE query = 'SELECT 1' AND pid <> pg_backend_pid() AND datname = current_database()"
        )
        unheard = KeyCache(pool, settings)  # One that never listened at all.
        for cache in (listening, unheard):
            assert (await cache.customer(key)) is not None
        await revoke(pool, key)
        # Committed by now: a request a second later is refused by both.
        await asyncio.sleep(settings.key_revocation_s_max)
        assert await listening.customer(key) is None
        assert await unheard.customer(key) is None
        await eventually(lambda: _true(listening.listener_up))


async def insert_key(pool: asyncpg.Pool, key: str, customer_id: str) -> None:
    """Store `key` for the customer as `issue_key` would, but with a key the test chose."""
    await pool.execute(
        "INSERT INTO intake.api_keys (key_id, key_sha256, key_prefix, customer_id) "
        "VALUES ($1, $2, $3, $4)",
        f"key_{new_id()}",
        digest(key),
        key[:10],
        customer_id,
    )


async def test_unknown_keys_are_remembered_briefly_and_a_new_key_works_within_a_second(
    pool: asyncpg.Pool, settings: Settings
):
    customer_id, _ = await new_key(pool)
    key = KEY_PREFIX + secrets.token_urlsafe(KEY_RANDOM_BYTES)
    cache = KeyCache(pool, settings)  # No listener: only the TTL can end what it remembers.
    assert await cache.customer(key) is None
    await insert_key(pool, key, customer_id)
    assert await cache.customer(key) is None, "the miss was looked up again, not remembered"
    created_s = time.monotonic()

    async def accepted() -> bool:
        return await cache.customer(key) is not None

    await eventually(accepted, timeout_s=1.0)
    assert time.monotonic() - created_s <= settings.key_unknown_ttl_s + 0.1


async def test_a_new_key_works_at_once_where_the_cache_listens(
    pool: asyncpg.Pool, settings: Settings
):
    async with listening_cache(pool, settings) as cache:
        customer_id, _ = await new_key(pool)
        key = KEY_PREFIX + secrets.token_urlsafe(KEY_RANDOM_BYTES)
        assert await cache.customer(key) is None
        await insert_key(pool, key, customer_id)

        async def accepted() -> bool:
            return await cache.customer(key) is not None

        await eventually(accepted, timeout_s=0.2)


async def test_a_flood_of_unknown_keys_stays_within_the_cache_bound(
    pool: asyncpg.Pool, settings: Settings
):
    cache = KeyCache(pool, dataclasses.replace(settings, key_cache_size_max=3))
    flood = [KEY_PREFIX + secrets.token_urlsafe(KEY_RANDOM_BYTES) for _ in range(10)]
    for key in flood:
        assert await cache.customer(key) is None
    assert len(cache._unknown) == 3
    assert await cache.customer("tm_not-a-key") is None
    assert await cache.customer("sk-" + "x" * 48) is None
