"""`make bench-ledger-streams`: events per second the real ledger service logs and applies from
the streams other than completions (jobs, quality), batched as it runs, beside the same service
taking one event per transaction (`ledger_batch_max=1`) in the same run.

What it does, on the machine's PostgreSQL and Redis (TOKENMILL_BENCH_DATABASE_URL, a database
to CREATE DATABASE from, and TOKENMILL_BENCH_REDIS_URL), in a throwaway database and prefix
per pass:
1. publishes N signed job.submitted events to the jobs stream and N quality.verdict events
   (one per completion of 1,000 customers) to the quality stream, as the intake and the
   inspector would;
2. starts `tokenmill serve ledger` (its own process) and times it from the first logged event
   to the 2N-th;
3. checks exactly once: 2N events logged, N verdicts recorded; then publishes a slice again
   and checks that nothing more was logged or recorded.
"""

from __future__ import annotations

import argparse
import asyncio
import time

import asyncpg

from bench.books import (
    REDELIVERED,
    WAIT_S_MAX,
    completions,
    deployment,
    ledger_process,
    publish_all,
)
from bench.replay import submitted
from tokenmill.db import create_pool
from tokenmill.events import JobCompleted, QualitySignal, QualityVerdict
from tokenmill.signing import SigningKeys
from tokenmill.streams import Streams

POLL_S = 0.25


def verdicts(done: list[JobCompleted]) -> list[QualityVerdict]:
    return [
        QualityVerdict(
            **e.envelope_for("inspector"),
            completion_event_id=e.event_id,
            verdict="pass",
            signals=(QualitySignal(name="empty", severity="ok"),),
        )  # fmt: skip
        for e in done
    ]


async def counts(pool: asyncpg.Pool) -> tuple[int, int]:
    row = await pool.fetchrow(
        "SELECT (SELECT count(*) FROM ledger.events "
        "WHERE event_type IN ('job.submitted', 'quality.verdict')) AS events, "
        "(SELECT count(*) FROM ledger.quality) AS verdicts"
    )
    return row["events"], row["verdicts"]


async def wait_for(pool: asyncpg.Pool, events: int) -> float:
    """Events per second from the first logged event to the `events`-th."""
    deadline = time.perf_counter() + WAIT_S_MAX
    first = None
    while True:
        logged, _ = await counts(pool)
        now = time.perf_counter()
        if logged and first is None:
            first = (now, logged)
        if logged >= events:
            assert first is not None
            return (logged - first[1]) / (now - first[0]) if now > first[0] else float("nan")
        if now > deadline:
            raise SystemExit(f"only {logged} of {events} logged in {WAIT_S_MAX}s")
        await asyncio.sleep(POLL_S)


async def one_pass(n: int, batch: int) -> float:
    """The ledger's rate over 2N events with batches of `batch`, checked exactly once."""
    async with deployment("streams", batch) as (settings, redis):
        streams = Streams(settings.stream_prefix)
        keys = SigningKeys.parse(settings.signing_keys)
        done = completions(n, settings.stream_prefix[-6:])
        jobs, judged = submitted(done), verdicts(done)
        await publish_all(redis, streams.jobs(settings.region), jobs, keys)  # type: ignore[arg-type]
        await publish_all(redis, streams.quality, judged, keys)  # type: ignore[arg-type]
        pool = await create_pool(settings)
        async with ledger_process(settings):
            rate = await wait_for(pool, 2 * n)
            assert await counts(pool) == (2 * n, n), await counts(pool)
            await publish_all(redis, streams.quality, judged[:REDELIVERED], keys)  # type: ignore[arg-type]
            await asyncio.sleep(2)  # Long enough for the batched ledger to read them again.
            assert await counts(pool) == (2 * n, n), "a redelivery was logged or applied again"
        await pool.close()
        return rate


async def run(n: int, batch: int) -> None:
    one = await one_pass(n, 1)
    print(f"ledger, one event per transaction: {one:,.0f} events/s (2 x {n:,}, exactly once)")
    batched = await one_pass(n, batch)
    print(f"ledger, batches of {batch}:        {batched:,.0f} events/s (2 x {n:,}, exactly once)")
    print(f"ratio:                             {batched / one:.1f} times")


def main() -> None:
    args = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    args.add_argument(
        "-n", type=int, default=20_000, help="requests (a submission and a verdict each)"
    )
    args.add_argument("--batch", type=int, default=1000, help="entries per ledger transaction")
    parsed = args.parse_args()
    asyncio.run(run(parsed.n, parsed.batch))


if __name__ == "__main__":
    main()
