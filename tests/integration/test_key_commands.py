"""`tokenmill keys list|revoke` against real Postgres: the operator never writes SQL by hand."""

from __future__ import annotations

import asyncio
import json

import asyncpg
import pytest

from tokenmill import cli
from tokenmill.intake.keys import KeyCache, create_customer, issue_key
from tokenmill.settings import Settings


@pytest.fixture
def keys_cli(settings: Settings, monkeypatch, capsys):
    """Run `tokenmill keys ...` on this test run's servers; return (exit message, stdout)."""
    for name, value in settings.to_env().items():
        monkeypatch.setenv(name, value)

    async def run(*argv: str) -> tuple[str | None, str]:
        try:
            # In a thread: the command runs its own event loop, as from a shell.
            await asyncio.to_thread(cli.main, ["keys", *argv])
            refusal = None
        except SystemExit as exc:
            refusal = str(exc)
        return refusal, capsys.readouterr().out

    return run


async def new_customer_key(pool: asyncpg.Pool, name: str) -> tuple[str, str]:
    async with pool.acquire() as conn, conn.transaction():
        customer = await create_customer(conn, name, "standard", "eu-west")
        return customer.customer_id, await issue_key(conn, customer.customer_id)


async def test_a_key_revoked_by_its_prefix_is_refused_and_listed_as_revoked(
    pool: asyncpg.Pool, settings: Settings, keys_cli
):
    customer_id, key = await new_customer_key(pool, "acme")
    assert await KeyCache(pool, settings).customer(key) is not None

    refusal, out = await keys_cli("revoke", key[:10], "--json")
    assert refusal is None
    revoked = json.loads(out)
    assert revoked["customer_id"] == customer_id and revoked["revoked_now"] is True

    refusal, out = await keys_cli("list", "--customer", customer_id, "--json")
    (listed,) = json.loads(out)
    assert listed["key_id"] == revoked["key_id"] and listed["revoked_at"] is not None
    assert key not in out, "a listing never shows the key itself"
    # A fresh cache asks Postgres (a warm one forgets within key_revocation_s_max, tested in
    # test_key_revocation.py).
    assert await KeyCache(pool, settings).customer(key) is None

    refusal, out = await keys_cli("revoke", revoked["key_id"])
    assert refusal is None and "already revoked" in out


async def test_a_key_is_revoked_only_when_named_unambiguously(
    pool: asyncpg.Pool, settings: Settings, keys_cli
):
    await new_customer_key(pool, "one")
    await new_customer_key(pool, "two")
    before = await pool.fetchval("SELECT count(*) FROM intake.api_keys WHERE revoked_at IS NULL")

    refusal, _ = await keys_cli("revoke", "tm_")
    assert refusal is not None and "keys match 'tm_'" in refusal and "give the key id" in refusal
    refusal, _ = await keys_cli("revoke", "key_nonesuch")
    assert refusal is not None and "no key matches 'key_nonesuch'" in refusal
    refusal, _ = await keys_cli("revoke", "tm_\x00")
    assert refusal is not None and "NUL" in refusal

    after = await pool.fetchval("SELECT count(*) FROM intake.api_keys WHERE revoked_at IS NULL")
    assert after == before
