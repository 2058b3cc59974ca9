"""A database of its own for each audit test: the chain spans the whole log, so a test that
tampers with it must not share it with other tests."""

from __future__ import annotations

from collections.abc import AsyncIterator

import asyncpg
import pytest

from tests.conftest import ADMIN_DATABASE_URL, database_url_for
from tests.integration.helpers import started
from tokenmill.db import migrate
from tokenmill.events import new_id


@pytest.fixture(scope="module")
async def template_db(run_id: str) -> AsyncIterator[str]:
    """A migrated database that each test's database is copied from (copying is fast)."""
    name = f"tm_test_{run_id}_audit_{new_id().lower()[-6:]}"
    admin = await asyncpg.connect(ADMIN_DATABASE_URL)
    await admin.execute(f'CREATE DATABASE "{name}"')
    await migrate(database_url_for(name))
    try:
        yield name
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


@pytest.fixture
async def audit_db(template_db: str) -> AsyncIterator[str]:
    """The URL of a fresh migrated database for one test."""
    name = f"{template_db}_{new_id().lower()[-6:]}"
    admin = await asyncpg.connect(ADMIN_DATABASE_URL)
    await admin.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template_db}"')
    try:
        yield database_url_for(name)
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


@pytest.fixture
async def audit_pool(audit_db: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await asyncpg.create_pool(audit_db, min_size=1, max_size=4)
    yield pool
    await pool.close()


async def log_events(conn: asyncpg.Connection, count: int, request_id: str = "") -> list[str]:
    """Log `count` events as one multi-row insert, the way a batching consumer might; return
    their event ids. The chain must not care how rows get into ledger.events."""
    events = [started(request_id or f"req_{new_id()}") for _ in range(count)]
    await conn.execute(
        "INSERT INTO ledger.events (event_id, event_type, stream, customer_id, request_id, "
        "occurred_at, body) SELECT * FROM unnest($1::text[], $2::text[], $3::text[], "
        "$4::text[], $5::text[], $6::timestamptz[], $7::text[]) "
        "ON CONFLICT (event_id) DO NOTHING",
        [e.event_id for e in events],
        [e.type for e in events],
        ["tm.progress"] * count,
        [e.customer_id for e in events],
        [e.request_id for e in events],
        [e.occurred_at for e in events],
        [e.canonical_json() for e in events],
    )
    return [e.event_id for e in events]


async def tamper(conn: asyncpg.Connection, table: str, sql: str, *args: object) -> None:
    """Run `sql` as the database superuser with `table`'s append-only triggers off, as an
    intruder with database rights would."""
    await conn.execute(f"ALTER TABLE {table} DISABLE TRIGGER USER")
    try:
        await conn.execute(sql, *args)
    finally:
        await conn.execute(f"ALTER TABLE {table} ENABLE TRIGGER USER")
