"""`make bench-replay`: how fast `tokenmill audit replay` folds the event log into scratch books,
and how long it takes to replay and diff a month of N requests end to end.

What it does, on the machine's PostgreSQL (TOKENMILL_BENCH_DATABASE_URL, a database to CREATE
DATABASE from), in a throwaway database:
1. logs and books a month (October 2026) of N requests of 1,000 customers (standard and
   premium, a prepaid top-up for 1 customer in 10) as the live ledger logs them: each request's
   job.submitted, job.started, job.completed, quality.verdict (defective for 1 in 200) and
   usage.booked, five events a request. Completions are booked through the ledger's own entry
   point (`books.apply_completions`, in batches of `--batch`), verdicts through the one its
   quality consumer uses (`books.apply_logged` after the log append, here a batch per
   transaction instead of one each, to make the month sooner); the events that change no books
   are only appended;
2. runs the replay (`replay.replay`: scratch database, fold, diff) over October, once in one
   lane (one process) and once in the default lanes (one more than the cores; `--lanes` to
   choose), and prints for each the events and requests folded per second, the fold and
   end-to-end times, the fold's speed against the first, and whether the books agreed.

The live logging and booking in step 1 is timed too, as the baseline of the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from bench.books import completions
from tokenmill.db import create_pool, migrate
from tokenmill.events import (
    JobCompleted,
    JobStarted,
    JobSubmitted,
    PrepaidCreditAdded,
    QualitySignal,
    QualityVerdict,
    new_id,
)
from tokenmill.ledger import books, invoices, refold, replay
from tokenmill.ledger.billing import Period
from tokenmill.settings import Settings
from tokenmill.streams import Streams

ADMIN_URL = os.environ.get(
    "TOKENMILL_BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
OCTOBER = Period.parse("2026-10")
CUSTOMERS = 1000
DEFECTIVE_EVERY = 200


def october_chunk(n: int, first: int, count: int) -> list:
    """Completions `first` .. `first + count` of the month's `n`, spread evenly over October
    in order, of 1,000 customers (made a chunk at a time: a million events do not fit in
    memory as models)."""
    step_ms = (OCTOBER.end_at - OCTOBER.start_at) / timedelta(milliseconds=1) / (n + 1)
    return [
        e.model_copy(
            update={
                "customer_id": f"cus_bench_replay_{(first + i) % CUSTOMERS}",
                "submitted_at": OCTOBER.start_at + timedelta(milliseconds=step_ms * (first + i)),
                "occurred_at": OCTOBER.start_at
                + timedelta(milliseconds=step_ms * (first + i) + 500),
            }
        )
        for i, e in enumerate(completions(count, f"replay{first}"))
    ]


async def book_month(pool: asyncpg.Pool, settings: Settings, n: int, batch: int) -> float:
    """Log and book October's events as the ledger's consumers do; return the seconds it took."""
    streams = Streams(settings.stream_prefix)
    slo = books.SloPolicy.from_settings(settings)
    started = time.perf_counter()
    making_s = 0.0  # Making the events is the bench's work, not the ledger's.
    async with pool.acquire() as conn:
        for i in range(0, CUSTOMERS, 10):
            top_up = PrepaidCreditAdded(
                producer="bench", customer_id=f"cus_bench_replay_{i}", request_id="",
                region="eu-west", amount=Decimal("0.5"), currency="USD", reference="bench",
                occurred_at=OCTOBER.start_at,
            )  # fmt: skip
            async with conn.transaction():
                await books.apply_event(conn, books.Logged(top_up, streams.billing))
        for first in range(0, n, batch):
            made = time.perf_counter()
            chunk = october_chunk(n, first, min(batch, n - first))
            making_s += time.perf_counter() - made
            async with conn.transaction():
                await _log_requests(conn, streams, slo, chunk)
    booked_s = time.perf_counter() - started - making_s
    async with pool.acquire() as conn:
        await invoices.issue_period(
            conn, OCTOBER, now=datetime.now(UTC), grace_s=0, batch_size=1000
        )
    return booked_s


async def _log_requests(
    conn: asyncpg.Connection, streams: Streams, slo: books.SloPolicy, done: list[JobCompleted]
) -> None:
    """Log a batch of requests' five events each, in the order the ledger would see them,
    and book their completions and verdicts."""
    jobs = streams.jobs("eu-west")
    await books.append_events(conn, [books.Logged(e, jobs) for e in submitted(done)])
    await books.append_events(conn, [books.Logged(e, streams.progress) for e in _started(done)])
    logged = [books.Logged(e, streams.completions, e.canonical_json()) for e in done]
    bookings = await books.apply_completions(conn, logged, None, slo)
    verdicts = [
        QualityVerdict(
            **e.envelope_for("inspector"),
            completion_event_id=e.event_id,
            verdict="defective" if i % DEFECTIVE_EVERY == 0 else "pass",
            signals=(
                QualitySignal(
                    name="empty", severity="defect" if i % DEFECTIVE_EVERY == 0 else "ok"
                ),
            ),
        )  # fmt: skip
        for i, e in enumerate(done)
    ]
    if await books.append_events(conn, [books.Logged(v, streams.quality) for v in verdicts]):
        await books.apply_logged(conn, verdicts)
    booked = [b.booked_event(new_id(), b.event.occurred_at) for b in bookings]
    await books.append_events(conn, [books.Logged(e, streams.booked) for e in booked])


def submitted(done: list[JobCompleted]) -> list[JobSubmitted]:
    return [
        JobSubmitted(
            **e.envelope_for("intake"),
            occurred_at=e.submitted_at,
            tier=e.tier,
            model=e.model,
            prompt="Name three colours, and say why each one matters.",
            max_tokens=e.max_tokens,
        )  # fmt: skip
        for e in done
    ]


def _started(done: list[JobCompleted]) -> list[JobStarted]:
    return [
        JobStarted(
            **e.envelope_for("worker"),
            occurred_at=e.submitted_at,
            worker="bench",
            queue_ms=e.queue_ms,
        )  # fmt: skip
        for e in done
    ]


async def run(n: int, batch: int, lanes: list[int]) -> dict[str, object]:
    database = f"tm_bench_replay_{os.getpid()}"
    admin = await asyncpg.connect(ADMIN_URL)
    await admin.execute(f'CREATE DATABASE "{database}"')
    url = urlunsplit(urlsplit(ADMIN_URL)._replace(path=f"/{database}"))
    settings = Settings.from_env({}, database_url=url, stream_prefix="tmbench.replay")
    try:
        await migrate(url)
        pool = await create_pool(settings)
        try:
            booked_s = await book_month(pool, settings, n, batch)
            logged = await pool.fetchval("SELECT count(*) FROM ledger.events")
            await pool.execute("VACUUM ANALYZE")
        finally:
            await pool.close()
        window = replay.Window(OCTOBER.start_at, OCTOBER.end_at)
        reports = {k: await replay.replay(settings, window, lanes=k) for k in lanes}
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        await admin.close()
    for report in reports.values():
        assert report.ok, report.text()
        assert sum(report.events.values()) == logged, (report.events, logged)
    first = reports[lanes[0]]
    return {
        "requests": n,
        "events_in_log": logged,
        "events_by_type": dict(first.events),
        "live_booking_s": round(booked_s, 1),
        "live_booked_events_per_s": round(logged / booked_s),
        "invoices_reissued": first.counts["invoice"]["rebuilt"],
        "replays": [
            _numbers(k, report, logged, n, reports[lanes[0]]) for k, report in reports.items()
        ],  # fmt: skip
    }


def _numbers(
    lanes: int, report: replay.Report, logged: int, n: int, baseline: replay.Report
) -> dict[str, object]:
    return {
        "lanes": lanes,
        "fold_s": round(report.fold_s, 1),
        "replayed_events_per_s": round(logged / report.fold_s),
        "replayed_requests_per_s": round(n / report.fold_s),
        "replay_and_diff_s": round(report.elapsed_s, 1),
        "fold_speed_vs_first": round(baseline.fold_s / report.fold_s, 2),
        "books_equal": report.ok,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=1_000_000, help="requests in the month")
    parser.add_argument("--batch", type=int, default=1000, help="completions per live batch")
    parser.add_argument(
        "--lanes",
        default=f"1,{refold.lanes_here()}",
        help="replay once per number of lanes given (comma-separated; default: 1, then "
        "the default, one more than the cores)",
    )
    args = parser.parse_args()
    lanes = list(dict.fromkeys(int(k) for k in args.lanes.split(",")))
    print(json.dumps(asyncio.run(run(args.n, args.batch, lanes)), indent=2))


if __name__ == "__main__":
    main()
