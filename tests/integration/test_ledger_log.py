"""The ledger's event log is append-only on real Postgres: no statement can rewrite it."""

from __future__ import annotations

import asyncpg
import pytest

from tests.integration.helpers import started
from tokenmill.ledger.books import append_event


@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE ledger.events SET body = '{}'",
        "DELETE FROM ledger.events",
        "TRUNCATE ledger.events",
        "TRUNCATE ledger.events CASCADE",
    ],
)
async def test_the_event_log_refuses_every_rewrite(pool: asyncpg.Pool, statement: str):
    async with pool.acquire() as conn, conn.transaction():
        await append_event(conn, started("job_log"), "tm.progress")
    before = await pool.fetchval("SELECT count(*) FROM ledger.events")
    with pytest.raises(asyncpg.RaiseError, match="append-only"):
        await pool.execute(statement)
    assert await pool.fetchval("SELECT count(*) FROM ledger.events") == before >= 1
