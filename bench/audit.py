"""`make bench-audit`: how fast the ledger seals its event log into the hash chain, and how fast
`tokenmill audit verify` walks it, on a log of a million events.

The events are written with COPY into a throwaway database (the sealing queue fills through the
same trigger as the ledger's inserts), with bodies shaped and sized like the ledger's real mix:
job.submitted, job.started, job.completed, quality.verdict and usage.booked per request.
Runs against the machine's PostgreSQL (TOKENMILL_BENCH_DATABASE_URL, a database to CREATE
DATABASE from).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from tokenmill.db import migrate
from tokenmill.events import canonical_json, new_id
from tokenmill.ledger import chain, verify

ADMIN_URL = os.environ.get(
    "TOKENMILL_BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
COPY_ROWS = 100_000
EVENTS_PER_REQUEST = 5
# How many events the append rate is measured over, with the chain's queue and without.
APPEND_EVENTS = 5_000


def _database_url(name: str) -> str:
    return urlunsplit(urlsplit(ADMIN_URL)._replace(path=f"/{name}"))


def _bodies(request_no: int, at: datetime) -> Iterator[tuple[str, str, str]]:
    """(event type, customer, body) of one request's five events, as canonical JSON."""
    customer, request = f"cus_{request_no % 50:04d}", f"req_{new_id()}"
    envelope = {"customer_id": customer, "request_id": request, "region": "eu-west"}
    envelope |= {"schema_version": 1, "occurred_at": at.isoformat()}
    kinds = (
        ("job.submitted", {"producer": "intake", "tier": "standard", "model": "smollm2",
                           "prompt": "Name three colours, and say why each one matters. " * 2,
                           "max_tokens": 64, "temperature": 0.0, "top_p": 1.0, "stop": [],
                           "seed": None, "messages": None}),
        ("job.started", {"producer": "worker", "worker": "host-1234", "queue_ms": 12.5}),
        ("job.completed", {"producer": "worker", "tier": "standard", "model": "smollm2",
                           "device": "cpu", "prompt_tokens": 21, "completion_tokens": 64,
                           "output_text": "Red, green and blue: the primaries of light. " * 3,
                           "finish_reason": "length", "compute_s": "1.25", "energy":
                           {"energy_j": "81.3", "meter": "modelled", "estimated": True},
                           "submitted_at": at.isoformat(), "queue_ms": 12.5, "ttft_ms": 40.0,
                           "e2e_ms": 1250.0}),
        ("quality.verdict", {"producer": "inspector", "completion_event_id": new_id(),
                             "verdict": "pass", "signals": [{"name": "truncated",
                             "value": 0.0, "flagged": False}]}),
        ("usage.booked", {"producer": "ledger", "tier": "standard", "prompt_tokens": 21,
                          "completion_tokens": 64, "energy_j": "81.3", "cost": "0.0000731",
                          "revenue": "0.0000425", "currency": "USD", "price_version": "v1",
                          "completion_event_id": new_id()}),
    )  # fmt: skip
    for event_type, payload in kinds:
        body = {**envelope, **payload, "type": event_type, "event_id": new_id()}
        yield event_type, customer, canonical_json(body)


def _records(count: int, start_no: int) -> list[tuple]:
    at = datetime(2026, 11, 1, tzinfo=UTC) + timedelta(seconds=start_no)
    records = []
    for request_no in range(start_no, start_no + count // EVENTS_PER_REQUEST):
        for event_type, customer, body in _bodies(request_no, at):
            parsed = json.loads(body)
            records.append(
                (parsed["event_id"], event_type, "tm.bench", customer, parsed["request_id"],
                 at, body)
            )  # fmt: skip
    return records


async def fill(conn: asyncpg.Connection, events: int) -> float:
    """COPY `events` events into the log; return the seconds it took."""
    started_s = time.perf_counter()
    for start in range(0, events, COPY_ROWS):
        await conn.copy_records_to_table(
            "events",
            schema_name="ledger",
            columns=["event_id", "event_type", "stream", "customer_id", "request_id",
                     "occurred_at", "body"],
            records=_records(min(COPY_ROWS, events - start), start // EVENTS_PER_REQUEST),
        )  # fmt: skip
    return time.perf_counter() - started_s


_APPEND = (
    "INSERT INTO ledger.events (event_id, event_type, stream, customer_id, request_id, "
    "occurred_at, body) VALUES ($1, $2, $3, $4, $5, $6, $7) "
    "ON CONFLICT (event_id) DO NOTHING RETURNING seq"
)


async def append_rate(conn: asyncpg.Connection, events: int, *, queued: bool) -> float:
    """Events per second logged the way the ledger logs one (an INSERT in its own transaction),
    with the sealing queue's trigger on or off: the chain's cost on the ledger's booking path."""
    action = "ENABLE" if queued else "DISABLE"
    await conn.execute(f"ALTER TABLE ledger.events {action} TRIGGER events_queue_for_sealing")
    records = _records(events, 10_000_000 + (0 if queued else events))
    started_s = time.perf_counter()
    for record in records:
        async with conn.transaction():
            await conn.fetchval(_APPEND, *record)
    rate = len(records) / (time.perf_counter() - started_s)
    await conn.execute("ALTER TABLE ledger.events ENABLE TRIGGER events_queue_for_sealing")
    return rate


async def run(events: int, batch_max: int) -> dict[str, object]:
    database = f"tm_bench_audit_{new_id().lower()}"
    admin = await asyncpg.connect(ADMIN_URL)
    await admin.execute(f'CREATE DATABASE "{database}"')
    url = _database_url(database)
    try:
        await migrate(url)
        conn = await asyncpg.connect(url)
        pool = await asyncpg.create_pool(url, min_size=1, max_size=2)
        try:
            fill_s = await fill(conn, events)
            await conn.execute("VACUUM ANALYZE ledger.events, ledger.unsealed")
            started_s = time.perf_counter()
            sealed = await chain.seal(pool, batch_max)
            seal_s = time.perf_counter() - started_s
            await conn.execute("VACUUM ANALYZE ledger.event_chain")
            # The verifier's own CPU time beside its wall time: on a machine whose cores
            # Postgres and others share, the wall time says as much about them as about verify.
            cpu_started_s = time.process_time()
            report = await verify.verify(url, None)
            verify_cpu_s = time.process_time() - cpu_started_s
            size_mb = await conn.fetchval(
                "SELECT pg_total_relation_size('ledger.events') / 1e6::float"
            )
            without_chain = await append_rate(conn, APPEND_EVENTS, queued=False)
            with_chain = await append_rate(conn, APPEND_EVENTS, queued=True)
        finally:
            await pool.close()
            await conn.close()
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        await admin.close()
    assert report.ok and report.events_verified == sealed == events, report.as_json()
    return {
        "events": events,
        "log_mb": round(size_mb),
        "fill_events_per_s": round(events / fill_s),
        "seal_batch_max": batch_max,
        "seal_s": round(seal_s, 2),
        "sealed_events_per_s": round(sealed / seal_s),
        "verify_s": round(report.elapsed_s, 2),
        "verified_events_per_s": round(report.events_verified / report.elapsed_s),
        "verify_cpu_s": round(verify_cpu_s, 2),
        "verified_events_per_cpu_s": round(report.events_verified / verify_cpu_s),
        "append_events_per_s_without_chain": round(without_chain),
        "append_events_per_s_with_chain": round(with_chain),
        "chain_overhead_on_append_pct": round(100 * (without_chain / with_chain - 1), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--seal-batch", type=int, default=5000)
    args = parser.parse_args()
    assert args.events % EVENTS_PER_REQUEST == 0, "events must be a multiple of 5"
    print(json.dumps(asyncio.run(run(args.events, args.seal_batch)), indent=2))


if __name__ == "__main__":
    main()
