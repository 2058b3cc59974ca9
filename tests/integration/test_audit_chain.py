"""The hash chain over the ledger's log: sealed exactly once in seal order, and every kind of
tampering found at its position by `audit verify`."""

from __future__ import annotations

import asyncio
import hashlib

import asyncpg
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from tests.integration.audit_helpers import audit_db, audit_pool, log_events, tamper, template_db
from tokenmill.ledger import chain
from tokenmill.ledger import verify as verify_module
from tokenmill.ledger.verify import verify

__all__ = ["audit_db", "audit_pool", "template_db"]  # Fixtures, used by name.

KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
TRUSTED = chain.public_key_bytes(KEY)


async def _sealed_log(pool: asyncpg.Pool, count: int, batch_max: int = 7) -> asyncpg.Pool:
    async with pool.acquire() as conn:
        await log_events(conn, count)
    assert await chain.seal(pool, batch_max) == count
    return pool


async def test_every_event_is_sealed_once_with_its_hash(
    audit_db: str, audit_pool: asyncpg.Pool
) -> None:
    pool = await _sealed_log(audit_pool, 20)
    async with pool.acquire() as conn:
        # A redelivered event changes nothing: its insert does nothing, so nothing is queued.
        body = await conn.fetchval("SELECT body FROM ledger.events ORDER BY seq LIMIT 1")
        await conn.execute(
            "INSERT INTO ledger.events (event_id, event_type, stream, customer_id, request_id, "
            "occurred_at, body) SELECT event_id, event_type, stream, customer_id, request_id, "
            "occurred_at, body FROM ledger.events ORDER BY seq LIMIT 1 "
            "ON CONFLICT (event_id) DO NOTHING"
        )
        assert await chain.seal(pool, 5) == 0
        rows = await conn.fetch("SELECT position, event_seq, hash FROM ledger.event_chain")
    assert [r["position"] for r in rows] == list(range(1, 21))
    first = hashlib.sha256(chain.GENESIS_HASH + body.encode()).digest()
    assert rows[0]["hash"] == first
    report = await verify(audit_db, TRUSTED)
    assert report.ok and report.events_verified == 20, report.text()


async def test_a_late_commit_is_sealed_later_never_skipped(audit_db: str) -> None:
    async with (
        asyncpg.create_pool(audit_db, min_size=3, max_size=3) as pool,
        pool.acquire() as slow,
        pool.acquire() as fast,
    ):
        late = slow.transaction()
        await late.start()
        await log_events(slow, 1)  # Takes the lower seq, commits last.
        await log_events(fast, 2)
        assert await chain.seal(pool, 100) == 2
        await late.commit()
        assert await chain.seal(pool, 100) == 1
        order = await fast.fetch(
            "SELECT c.position, c.event_seq FROM ledger.event_chain c ORDER BY position"
        )
    seqs = [r["event_seq"] for r in order]
    assert seqs[2] < seqs[0] < seqs[1], "the late event is sealed at the end, in seal order"
    assert (await verify(audit_db, TRUSTED)).ok


async def test_late_commits_are_paired_by_seq_across_groups(
    audit_db: str, audit_pool: asyncpg.Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Verify reads a chunk's events in groups of consecutive seqs; one seq a group puts the late
    # events' bodies in other groups than their chain rows' neighbours.
    monkeypatch.setattr(verify_module, "_GROUP_SEQS", 1)
    await test_a_late_commit_is_sealed_later_never_skipped(audit_db)
    async with audit_pool.acquire() as conn:
        seq = await conn.fetchval("SELECT event_seq FROM ledger.event_chain WHERE position = 3")
        await tamper(conn, "ledger.events", "DELETE FROM ledger.events WHERE seq = $1", seq)
    report = await verify(audit_db, TRUSTED)
    assert (report.problem, report.position, report.seq) == ("rows missing", 3, seq)


async def test_concurrent_sealers_never_fork_the_chain(
    audit_db: str, audit_pool: asyncpg.Pool
) -> None:
    pool = audit_pool
    async with pool.acquire() as conn:
        await log_events(conn, 500)
    counts = await asyncio.gather(*(chain.seal(pool, 13) for _ in range(3)))
    assert sum(counts) == 500
    async with pool.acquire() as conn:
        positions = await conn.fetchval("SELECT count(DISTINCT position) FROM ledger.event_chain")
        assert positions == 500
    report = await verify(audit_db, TRUSTED, fetch_rows=64)
    assert report.ok and report.events_verified == 500, report.text()


async def test_a_changed_payload_is_found_at_its_position(
    audit_db: str, audit_pool: asyncpg.Pool
) -> None:
    pool = await _sealed_log(audit_pool, 30)
    async with pool.acquire() as conn:
        seq = await conn.fetchval("SELECT event_seq FROM ledger.event_chain WHERE position = 17")
        await tamper(
            conn,
            "ledger.events",
            "UPDATE ledger.events SET body = replace(body, '\"queue_ms\":0.0', "
            "'\"queue_ms\":1.0') WHERE seq = $1",
            seq,
        )
    report = await verify(audit_db, TRUSTED, fetch_rows=8)
    assert (report.problem, report.position, report.seq) == ("payload changed", 17, seq)
    assert report.events_verified == 16


async def test_a_break_is_found_at_its_position_when_read_in_small_groups(
    audit_db: str, audit_pool: asyncpg.Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(verify_module, "_GROUP_SEQS", 3)
    pool = await _sealed_log(audit_pool, 30)
    assert (await verify(audit_db, TRUSTED, fetch_rows=8)).events_verified == 30
    async with pool.acquire() as conn:
        seq = await conn.fetchval("SELECT event_seq FROM ledger.event_chain WHERE position = 17")
        await tamper(
            conn, "ledger.events", "UPDATE ledger.events SET body = body || ' ' WHERE seq = $1", seq
        )
    report = await verify(audit_db, TRUSTED, fetch_rows=8)
    assert (report.problem, report.position, report.seq) == ("payload changed", 17, seq)
    assert report.events_verified == 16


async def test_a_body_made_to_hold_the_next_one_is_found_at_its_position(
    audit_db: str, audit_pool: asyncpg.Pool
) -> None:
    # Verify reads bodies as lines: a body that holds a newline and the next body, with the next
    # event deleted, must not pass for the two bodies that were sealed.
    pool = await _sealed_log(audit_pool, 30)
    async with pool.acquire() as conn:
        here, after = await conn.fetchval(
            "SELECT array_agg(event_seq ORDER BY position) FROM ledger.event_chain "
            "WHERE position IN (5, 6)"
        )
        await tamper(
            conn,
            "ledger.events",
            "UPDATE ledger.events e SET body = e.body || E'\\n' || o.body FROM ledger.events o "
            "WHERE e.seq = $1 AND o.seq = $2",
            here,
            after,
        )
        await tamper(conn, "ledger.events", "DELETE FROM ledger.events WHERE seq = $1", after)
    report = await verify(audit_db, TRUSTED)
    assert (report.problem, report.position, report.seq) == ("payload changed", 5, here)
    assert report.events_verified == 4


async def test_a_hash_cut_short_is_found_at_its_position(
    audit_db: str, audit_pool: asyncpg.Pool
) -> None:
    # Verify reads a chunk's hashes packed 32 bytes apiece: one of another length must not shift
    # the others.
    pool = await _sealed_log(audit_pool, 30)
    async with pool.acquire() as conn:
        await conn.execute("ALTER TABLE ledger.event_chain DROP CONSTRAINT event_chain_hash_check")
        await tamper(
            conn,
            "ledger.event_chain",
            "UPDATE ledger.event_chain SET hash = substring(hash FROM 2) WHERE position = 11",
        )
    report = await verify(audit_db, TRUSTED)
    assert (report.problem, report.position) == ("payload changed", 11), report.text()
    assert report.events_verified == 10


async def test_a_deleted_row_is_found_at_its_position(
    audit_db: str, audit_pool: asyncpg.Pool
) -> None:
    pool = await _sealed_log(audit_pool, 30)
    async with pool.acquire() as conn:
        seq = await conn.fetchval("SELECT event_seq FROM ledger.event_chain WHERE position = 9")
        await tamper(conn, "ledger.events", "DELETE FROM ledger.events WHERE seq = $1", seq)
    report = await verify(audit_db, TRUSTED, fetch_rows=8)
    assert (report.problem, report.position, report.seq) == ("rows missing", 9, seq)


async def test_a_deleted_chain_row_is_found_at_its_position(
    audit_db: str, audit_pool: asyncpg.Pool
) -> None:
    pool = await _sealed_log(audit_pool, 30)
    async with pool.acquire() as conn:
        await tamper(
            conn, "ledger.event_chain", "DELETE FROM ledger.event_chain WHERE position = 12"
        )
    report = await verify(audit_db, TRUSTED, fetch_rows=8)
    assert (report.problem, report.position) == ("rows missing", 12)


async def test_swapped_rows_are_reported_as_reordered(
    audit_db: str, audit_pool: asyncpg.Pool
) -> None:
    pool = await _sealed_log(audit_pool, 30)
    async with pool.acquire() as conn:
        a, b = await conn.fetchval(
            "SELECT array_agg(event_seq ORDER BY position) FROM ledger.event_chain "
            "WHERE position IN (5, 6)"
        )
        await tamper(
            conn,
            "ledger.events",
            "UPDATE ledger.events e SET body = o.body FROM ledger.events o "
            "WHERE (e.seq, o.seq) IN (($1, $2), ($2, $1))",
            a,
            b,
        )
    report = await verify(audit_db, TRUSTED)
    assert (report.problem, report.position, report.seq) == ("rows reordered", 5, a)
    assert f"seq {b}" in report.detail


async def test_a_rewritten_chain_no_longer_matches_its_checkpoint(
    audit_db: str, audit_pool: asyncpg.Pool
) -> None:
    pool = await _sealed_log(audit_pool, 30)
    async with pool.acquire() as conn:
        checkpoint = await chain.write_checkpoint(conn, KEY)
        assert checkpoint is not None and checkpoint.position == 30
        # The intruder changes an event and recomputes every hash after it: the chain itself
        # is consistent again, but it no longer ends where the signed checkpoint says.
        seq = await conn.fetchval("SELECT event_seq FROM ledger.event_chain WHERE position = 20")
        await tamper(
            conn,
            "ledger.events",
            "UPDATE ledger.events SET body = replace(body, 'cus_1', 'cus_2') WHERE seq = $1",
            seq,
        )
        await _rehash_from(conn, 20)
    report = await verify(audit_db, TRUSTED)
    assert (report.problem, report.position) == ("checkpoint mismatch", 30), report.text()
    assert report.events_verified == 30


async def _rehash_from(conn: asyncpg.Connection, position: int) -> None:
    rows = await conn.fetch(
        "SELECT c.position, e.body FROM ledger.event_chain c "
        "JOIN ledger.events e ON e.seq = c.event_seq WHERE c.position >= $1 ORDER BY position",
        position,
    )
    prev = await conn.fetchval(
        "SELECT hash FROM ledger.event_chain WHERE position = $1", position - 1
    )
    for row in rows:
        prev = chain.link(prev, row["body"].encode())
        await tamper(
            conn,
            "ledger.event_chain",
            "UPDATE ledger.event_chain SET hash = $1 WHERE position = $2",
            prev,
            row["position"],
        )


async def test_a_cut_off_tail_is_found_by_the_checkpoint(
    audit_db: str, audit_pool: asyncpg.Pool
) -> None:
    pool = await _sealed_log(audit_pool, 30)
    async with pool.acquire() as conn:
        await chain.write_checkpoint(conn, KEY)
        await tamper(
            conn, "ledger.event_chain", "DELETE FROM ledger.event_chain WHERE position > 25"
        )
    report = await verify(audit_db, TRUSTED)
    assert (report.problem, report.position) == ("rows missing", 26), report.text()


async def test_a_checkpoint_by_another_key_is_refused(
    audit_db: str, audit_pool: asyncpg.Pool
) -> None:
    pool = await _sealed_log(audit_pool, 10)
    async with pool.acquire() as conn:
        await chain.write_checkpoint(conn, Ed25519PrivateKey.generate())
    report = await verify(audit_db, TRUSTED)
    assert (report.problem, report.position) == ("bad signature", 10)
    async with pool.acquire() as conn:
        await tamper(
            conn,
            "ledger.checkpoints",
            "UPDATE ledger.checkpoints SET public_key = $1",
            TRUSTED,
        )
    report = await verify(audit_db, TRUSTED)
    assert (report.problem, report.position) == ("bad signature", 10)
    assert "bad signature" in report.detail


async def test_verify_walks_a_range(audit_db: str, audit_pool: asyncpg.Pool) -> None:
    pool = await _sealed_log(audit_pool, 40)
    async with pool.acquire() as conn:
        await chain.write_checkpoint(conn, KEY)
        seq = await conn.fetchval("SELECT event_seq FROM ledger.event_chain WHERE position = 5")
        await tamper(
            conn,
            "ledger.events",
            "UPDATE ledger.events SET body = body || ' ' WHERE seq = $1",
            seq,
        )
    inside = await verify(audit_db, TRUSTED, 10, 40, fetch_rows=7)
    assert inside.ok and inside.events_verified == 31 and inside.checkpoints_verified == 1
    assert (await verify(audit_db, TRUSTED, 1, 20)).position == 5
