"""`make bench-books`: requests booked per second by the real ledger consumer, from the real
completions stream, exactly once with their journal postings, beside a raw COPY of the same
number of usage rows in the same run.

What it does, on the machine's PostgreSQL and Redis (TOKENMILL_BENCH_DATABASE_URL, a database
to CREATE DATABASE from, and TOKENMILL_BENCH_REDIS_URL), in a throwaway database and prefix:
1. publishes N signed JobCompleted events (1,000 customers, standard and premium) to the
   completions stream, as workers would;
2. starts `tokenmill serve ledger` (its own process) and times it from its first booking to
   its N-th;
3. checks exactly once: N request_usage rows, each in a usage summary posting, the revenue
   legs equal to their revenue, every posting balanced; then
   redelivers a slice of the same entries and checks that nothing more was booked or posted;
4. COPYs the N booked usage rows into a scratch table, and times that;
5. books a further slice in this process, directly through `book_completions` in batches, with
   the time per phase, to show where a booking's time goes.

With `--no-chain` the hash chain's part on the booking path (the trigger that queues each
logged event for the sealer, and so the sealer's work beside the consumer) is switched off:
run it both ways to measure the chain's overhead on the booking rate.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import io
import os
import pstats
import sys
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from urllib.parse import urlsplit, urlunsplit

import asyncpg
from faststream.redis import BinaryMessageFormatV1
from redis.asyncio import Redis as RedisClient

from tokenmill.db import create_pool, migrate
from tokenmill.events import EnergyReading, JobCompleted, new_id
from tokenmill.ledger import books
from tokenmill.settings import Settings
from tokenmill.signing import SIGNATURE_HEADER, SigningKeys, new_key_spec
from tokenmill.streams import Streams, create_groups, event_headers

ADMIN_URL = os.environ.get(
    "TOKENMILL_BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
REDIS_URL = os.environ.get("TOKENMILL_BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
CUSTOMERS = 1000
PUBLISH_CHUNK = 5000
REDELIVERED = 5000
PROFILED = 20_000
WAIT_S_MAX = 1800.0


@contextlib.asynccontextmanager
async def deployment(name: str, batch: int) -> AsyncIterator[tuple[Settings, RedisClient]]:
    """A throwaway migrated database and stream prefix (its groups created) for one run, and a
    Redis client; both removed afterwards."""
    run_id = new_id().lower()
    database = f"tm_bench_{name}_{run_id}"
    admin = await asyncpg.connect(ADMIN_URL)
    await admin.execute(f'CREATE DATABASE "{database}"')
    database_url = urlunsplit(urlsplit(ADMIN_URL)._replace(path=f"/{database}"))
    settings = Settings.from_env(
        {}, database_url=database_url, redis_url=REDIS_URL, stream_prefix=f"tmbench.{run_id}",
        signing_keys=new_key_spec(), ledger_batch_max=batch,
    )  # fmt: skip
    redis = RedisClient.from_url(REDIS_URL)
    try:
        await migrate(database_url)
        await create_groups(redis, Streams(settings.stream_prefix).groups(settings.region))
        yield settings, redis
    finally:
        async for key in redis.scan_iter(match=f"{settings.stream_prefix}.*", count=500):
            await redis.delete(key)
        await redis.aclose()
        await admin.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        await admin.close()


@contextlib.asynccontextmanager
async def ledger_process(settings: Settings) -> AsyncIterator[asyncio.subprocess.Process]:
    """`tokenmill serve ledger` in a process of its own, on `settings`; killed on the way out."""
    env = {**os.environ, **settings.to_env()}
    del env["TOKENMILL_CONSUMER"]
    ledger = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tokenmill.cli", "serve", "ledger", env=env,
        stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    try:
        yield ledger
    finally:
        if ledger.returncode is None:
            ledger.kill()
            await ledger.wait()


def completions(n: int, seed: str) -> list[JobCompleted]:
    start = datetime.now(UTC) - timedelta(hours=1)
    return [
        JobCompleted(
            producer="bench",
            customer_id=f"cus_bench_{seed}_{i % CUSTOMERS}",
            request_id=f"req_{seed}_{i}",
            region="eu-west",
            tier="premium" if i % 10 == 0 else "standard",
            submitted_at=start + timedelta(milliseconds=i),
            occurred_at=start + timedelta(milliseconds=i + 500),
            worker="bench",
            model="smollm2",
            device="cpu",
            max_tokens=256,
            text="Red, green and blue.",
            finish_reason="stop",
            prompt_tokens=200 + i % 300,
            cached_prompt_tokens=(i % 4) * 40,
            completion_tokens=50 + i % 200,
            queue_ms=3.0,
            ttft_ms=80.0,
            generation_ms=900.0,
            e2e_ms=1000.0,
            compute_s=Decimal("0.9"),
            energy=EnergyReading(energy_j=Decimal("31.5"), meter="rapl", estimated=False),
        )
        for i in range(n)
    ]


async def publish_all(
    redis: RedisClient, stream: str, events: list[JobCompleted], keys: SigningKeys
) -> None:
    """XADD every event signed, in FastStream's wire format, a pipeline per chunk."""
    for first in range(0, len(events), PUBLISH_CHUNK):
        async with redis.pipeline(transaction=False) as pipe:
            for event in events[first : first + PUBLISH_CHUNK]:
                body = event.canonical_json()
                headers = {**event_headers(event), SIGNATURE_HEADER: keys.sign(body.encode())}
                data = await BinaryMessageFormatV1.encode(
                    message=body.encode(), reply_to=None, headers=headers, correlation_id=new_id()
                )
                pipe.xadd(stream, {"__data__": data})
            await pipe.execute()


async def wait_for_bookings(pool: asyncpg.Pool, n: int) -> float:
    """Seconds from the first booking seen to the n-th, scaled to all n."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT_S_MAX
    first_at, first_count = None, 0
    while True:
        count = await pool.fetchval("SELECT count(*) FROM ledger.request_usage")
        now = time.perf_counter()
        if count and first_at is None:
            first_at, first_count = now, count
        if count >= n:
            assert first_at is not None
            booked = n - first_count
            return (now - first_at) * n / booked if booked else float("nan")
        if loop.time() > deadline:
            raise SystemExit(f"only {count} of {n} booked in {WAIT_S_MAX}s")
        # Seldom: each count scans the table, and the machine has two cores.
        await asyncio.sleep(0.5)


async def settled(redis: RedisClient, stream: str) -> None:
    """Wait until the ledger group has read and acknowledged everything in `stream`."""
    while True:
        groups = {g["name"]: g for g in await redis.xinfo_groups(stream)}
        ledger = groups[b"ledger"]
        if ledger["pending"] == 0 and ledger["lag"] == 0:
            return
        await asyncio.sleep(0.1)


async def check_exactly_once(pool: asyncpg.Pool, n: int) -> dict[str, int]:
    """N sub-ledger rows, each in a usage summary posting that its revenue adds up to, and
    every posting balanced."""
    counts = await pool.fetchrow(
        "SELECT (SELECT count(*) FROM ledger.request_usage) AS usage, "
        "(SELECT count(*) FROM ledger.request_usage WHERE posting_id IS NOT NULL) AS posted, "
        "(SELECT count(*) FROM ledger.postings WHERE kind = 'usage') AS postings, "
        "(SELECT count(*) FROM ledger.posting_legs) AS legs, "
        "(SELECT count(*) FROM (SELECT 1 FROM ledger.posting_legs GROUP BY posting_id, currency "
        " HAVING sum(amount) <> 0) u) AS unbalanced, "
        "(SELECT sum(revenue) FROM ledger.request_usage) + (SELECT sum(amount) "
        " FROM ledger.posting_legs WHERE account_id LIKE 'revenue:%') AS revenue_unposted"
    )
    assert counts["usage"] == counts["posted"] == n, counts
    assert counts["unbalanced"] == 0 and counts["revenue_unposted"] == 0, counts
    return dict(counts)


async def copy_rate(pool: asyncpg.Pool) -> tuple[int, float]:
    """Rows per second of a raw COPY of every booked usage row into a scratch table."""
    async with pool.acquire() as conn:
        rows = await conn.fetch("SELECT * FROM ledger.request_usage")
        await conn.execute("CREATE TABLE scratch_usage (LIKE ledger.request_usage)")
        columns = list(rows[0].keys())
        records = [tuple(r.values()) for r in rows]
        started = time.perf_counter()
        await conn.copy_records_to_table("scratch_usage", columns=columns, records=records)
        return len(records), len(records) / (time.perf_counter() - started)


async def profile_direct(pool: asyncpg.Pool, events: list[JobCompleted], batch: int) -> str:
    """Book `events` in this process through book_completions (no Redis) under cProfile."""
    # As from the stream: each with the text its producer signed.
    logged = [books.Logged(e, "bench.completions", e.canonical_json()) for e in events]
    profiler = cProfile.Profile()
    started = time.perf_counter()
    for first in range(0, len(events), batch):
        chunk = logged[first : first + batch]
        async with pool.acquire() as conn, conn.transaction():
            profiler.enable()
            await books.book_completions(conn, chunk, "bench.booked", books.NO_SLO)
            profiler.disable()
    elapsed = time.perf_counter() - started
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(14)
    return f"direct book_completions: {len(events) / elapsed:,.0f}/s\n{out.getvalue()}"


async def run(n: int, batch: int, chain: bool) -> None:
    async with deployment("books", batch) as (settings, redis):
        if not chain:
            bench_db = await asyncpg.connect(settings.database_url)
            await bench_db.execute(
                "ALTER TABLE ledger.events DISABLE TRIGGER events_queue_for_sealing"
            )
            await bench_db.close()
        streams = Streams(settings.stream_prefix)
        keys = SigningKeys.parse(settings.signing_keys)
        seed = settings.stream_prefix[-6:]
        events = completions(n, seed)
        started = time.perf_counter()
        await publish_all(redis, streams.completions, events, keys)
        print(f"published {n:,} signed completions in {time.perf_counter() - started:.1f}s")
        pool = await create_pool(settings)
        # The ledger stops before the raw COPY and the profile: neither shares the cores with it.
        async with ledger_process(settings):
            elapsed_s = await wait_for_bookings(pool, n)
            await settled(redis, streams.completions)
            counts = await check_exactly_once(pool, n)
            await publish_all(redis, streams.completions, events[:REDELIVERED], keys)
            await settled(redis, streams.completions)
            assert await check_exactly_once(pool, n) == counts, "a redelivery posted again"
        booked_rate = n / elapsed_s
        rows, raw_rate = await copy_rate(pool)
        print(
            f"booked {n:,} completions exactly once ({counts['postings']:,} usage postings, "
            f"{counts['legs']:,} legs, 0 unbalanced; "
            f"{REDELIVERED:,} redelivered, nothing posted twice)"
        )
        print(
            f"ledger consumer:  {booked_rate:,.0f} requests booked/s (batches of {batch}; "
            f"hash chain {'on' if chain else 'off'})"
        )
        print(f"raw COPY:         {raw_rate:,.0f} usage rows/s ({rows:,} rows)")
        print(f"ratio:            booking runs at {booked_rate / raw_rate:.1%} of a raw COPY")
        print(await profile_direct(pool, completions(PROFILED, seed + "p"), batch))
        await pool.close()


def main() -> None:
    args = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    args.add_argument("-n", type=int, default=100_000, help="completions to book")
    args.add_argument("--batch", type=int, default=1000, help="entries per ledger transaction")
    args.add_argument(
        "--no-chain", action="store_true", help="switch the hash chain's queue trigger off"
    )
    parsed = args.parse_args()
    asyncio.run(run(parsed.n, parsed.batch, not parsed.no_chain))


if __name__ == "__main__":
    main()
