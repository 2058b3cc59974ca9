"""Shared fixtures. Every test run gets its own database and its own stream prefix, so two runs
(or CI beside a developer) can share one PostgreSQL and one Redis without colliding.

Servers: TOKENMILL_TEST_DATABASE_URL (a database to connect to for CREATE DATABASE) and
TOKENMILL_TEST_REDIS_URL; by default the machine's own PostgreSQL and Redis on 127.0.0.1.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import AsyncIterator
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
from redis.asyncio import Redis as RedisClient

from tokenmill.db import create_pool, migrate
from tokenmill.events import new_id
from tokenmill.settings import Settings
from tokenmill.streams import Streams, create_groups

ADMIN_DATABASE_URL = os.environ.get(
    "TOKENMILL_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
REDIS_URL = os.environ.get("TOKENMILL_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
# Every event a test publishes is signed with this, as a deployment's events are.
TEST_SIGNING_KEYS = "test:tokenmill-test-signing-secret"


def database_url_for(name: str) -> str:
    parts = urlsplit(ADMIN_DATABASE_URL)
    return urlunsplit(parts._replace(path=f"/{name}"))


@pytest.fixture(scope="session")
def run_id() -> str:
    return new_id().lower()


@pytest.fixture(scope="session")
async def settings(run_id: str) -> AsyncIterator[Settings]:
    """Settings for this test run, with a fresh migrated database and a private prefix."""
    database = f"tm_test_{run_id}"
    admin = await asyncpg.connect(ADMIN_DATABASE_URL)
    await admin.execute(f'CREATE DATABASE "{database}"')
    test_settings = Settings.from_env(
        {},
        database_url=database_url_for(database),
        redis_url=REDIS_URL,
        stream_prefix=f"tmtest.{run_id}",
        data_dir=os.environ.get("TOKENMILL_DATA_DIR", str(_cache_root())),
        model_cache_dir=os.environ.get("TOKENMILL_MODEL_CACHE_DIR", str(_cache_root() / "models")),
        claim_idle_ms=1500,
        max_deliveries=3,
        outbox_poll_s=0.2,
        signing_keys=TEST_SIGNING_KEYS,
    )
    await migrate(test_settings.database_url)
    redis = RedisClient.from_url(REDIS_URL)
    await create_groups(redis, Streams(test_settings.stream_prefix).groups(test_settings.region))
    try:
        yield test_settings
    finally:
        await _delete_keys(redis, f"{test_settings.stream_prefix}.*")
        await redis.aclose()
        await admin.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        await admin.close()


def _cache_root():
    from pathlib import Path

    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "tokenmill"


async def _delete_keys(redis: RedisClient, pattern: str) -> None:
    async for key in redis.scan_iter(match=pattern, count=500):
        await redis.delete(key)


@pytest.fixture(scope="session")
async def pool(settings: Settings) -> AsyncIterator[asyncpg.Pool]:
    db_pool = await create_pool(settings)
    yield db_pool
    await db_pool.close()


@pytest.fixture
async def redis(settings: Settings) -> AsyncIterator[RedisClient]:
    client = RedisClient.from_url(settings.redis_url)
    yield client
    await client.aclose()


@pytest.fixture
async def test_settings(settings: Settings, redis: RedisClient) -> Settings:
    """Per-test settings with a private stream prefix (groups created), for tests that watch
    whole streams."""
    prefix = f"{settings.stream_prefix}.{new_id().lower()[-8:]}"
    await create_groups(redis, Streams(prefix).groups(settings.region))
    return dataclasses.replace(settings, stream_prefix=prefix)
