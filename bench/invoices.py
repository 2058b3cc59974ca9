"""How long `tokenmill invoices issue` takes to finalize a month: N customers, M requests.

In a throwaway database (TOKENMILL_BENCH_DATABASE_URL: one to CREATE DATABASE from), the
month's ledger.request_usage rows are loaded with COPY (spread over the customers, two models
and every hour of the month; 1% of requests credited), then the real command runs as an
operator would run it, in its own process, and is timed; then once more (nothing left to do).
The invoices are checked: one per customer, gapless numbers, each total the sum of its lines.

    python -m bench.invoices [--customers 1000] [--requests 1000000] [--period 2026-11]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from datetime import timedelta
from urllib.parse import urlsplit, urlunsplit

import asyncpg
from redis.asyncio import Redis as RedisClient

from tests.integration.usage_rows import USAGE_COLUMNS, usage_record
from tokenmill.db import migrate
from tokenmill.events import new_id
from tokenmill.ledger.billing import Period

ADMIN_DATABASE_URL = os.environ.get(
    "TOKENMILL_BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
REDIS_URL = os.environ.get("TOKENMILL_BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
COPY_CHUNK_ROWS = 20_000
MODELS = ("tm-small", "tm-large")


def _csv_value(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "t" if value else "f"
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return str(value)


async def usage_csv(customers: int, requests: int, period: Period) -> AsyncIterator[bytes]:
    """The month's rows as CSV, in chunks: request i is customer i % N's, at an even spread."""
    month_s = (period.end_at - period.start_at).total_seconds()
    chunk = []
    for i in range(requests):
        record = usage_record(
            f"cus_bench_{i % customers:05d}",
            period.start_at + timedelta(seconds=month_s * i / requests),
            input_tokens=200 + i % 800,
            cached_tokens=(i % 4) * 50,
            output_tokens=50 + i % 300,
            model=MODELS[i % len(MODELS)],
            request_id=f"job_bench_{i:08d}",
        )
        chunk.append(",".join(map(_csv_value, record)))
        if len(chunk) == COPY_CHUNK_ROWS:
            yield ("\n".join(chunk) + "\n").encode()
            chunk = []
            await asyncio.sleep(0)
    if chunk:
        yield ("\n".join(chunk) + "\n").encode()


def database_url(name: str) -> str:
    return urlunsplit(urlsplit(ADMIN_DATABASE_URL)._replace(path=f"/{name}"))


def tokenmill(url: str, prefix: str, *argv: str) -> tuple[float, dict | list]:
    """Run `tokenmill ARGV --json` in its own process, as an operator would; (seconds, output)."""
    env = {**os.environ, "TOKENMILL_DATABASE_URL": url, "TOKENMILL_REDIS_URL": REDIS_URL}
    env["TOKENMILL_STREAM_PREFIX"] = prefix
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "tokenmill.cli", *argv, "--json"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return time.perf_counter() - started, json.loads(done.stdout)


async def delete_streams(prefix: str) -> None:
    redis = RedisClient.from_url(REDIS_URL)
    try:
        async for key in redis.scan_iter(match=f"{prefix}.*", count=500):
            await redis.delete(key)
    finally:
        await redis.aclose()


async def check(conn: asyncpg.Connection, customers: int) -> dict:
    numbers = await conn.fetch("SELECT number FROM ledger.invoices WHERE number IS NOT NULL")
    taken = sorted(int(row["number"][-6:]) for row in numbers)
    assert taken == list(range(1, customers + 1)), "numbers are not gapless"
    mismatched = await conn.fetchval(
        "SELECT count(*) FROM ledger.invoices i WHERE total <> (SELECT sum(amount) FROM "
        "ledger.invoice_lines l WHERE l.invoice_id = i.invoice_id)"
    )
    assert mismatched == 0
    return {
        "invoices": len(numbers),
        "lines": await conn.fetchval("SELECT count(*) FROM ledger.invoice_lines"),
        "invoiced_total": str(await conn.fetchval("SELECT sum(total) FROM ledger.invoices")),
    }


async def run(customers: int, requests: int, period: Period) -> dict:
    name = f"tm_bench_invoices_{new_id().lower()}"
    # The commands create the stream groups of this prefix (as every command bootstraps).
    prefix = f"tmbench.{name}"
    admin = await asyncpg.connect(ADMIN_DATABASE_URL)
    await admin.execute(f'CREATE DATABASE "{name}"')
    url = database_url(name)
    try:
        await migrate(url)
        conn = await asyncpg.connect(url)
        try:
            started = time.perf_counter()
            await conn.copy_to_table(
                "request_usage",
                schema_name="ledger",
                source=usage_csv(customers, requests, period),
                columns=USAGE_COLUMNS,
                format="csv",
            )
            copy_s = time.perf_counter() - started
            credits = await conn.fetchval(
                "WITH c AS (INSERT INTO ledger.credits (credit_id, customer_id, request_id, "
                "reason, amount, currency, event_id) SELECT 'cr_' || request_id, customer_id, "
                "request_id, 'slo_ttft', revenue / 10, currency, 'evt_cr_' || request_id "
                "FROM ledger.request_usage WHERE right(request_id, 2) = '00' AND revenue > 0 "
                "RETURNING 1) SELECT count(*) FROM c"
            )
            await conn.execute("ANALYZE")
            # What any command costs before it does anything: start-up, connect, migrations.
            startup_s, _ = tokenmill(url, prefix, "invoices", "list", "--period", "1999-01")
            issue_s, first = tokenmill(url, prefix, "invoices", "issue", "--period", str(period))
            rerun_s, again = tokenmill(url, prefix, "invoices", "issue", "--period", str(period))
            assert len(first["finalized"]) == customers and again["finalized"] == []
            checked = await check(conn, customers)
        finally:
            await conn.close()
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()
        await delete_streams(prefix)
    return {
        "customers": customers,
        "requests": requests,
        "period": str(period),
        "copy_rows_per_s": round(requests / copy_s),
        "command_startup_s": round(startup_s, 2),
        "issue_s": round(issue_s, 2),
        # The command's own work: its wall time less what any command takes to start.
        "finalize_s": round(issue_s - startup_s, 2),
        "rerun_s": round(rerun_s, 2),
        "credits": credits,
        **checked,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--customers", type=int, default=1000)
    parser.add_argument("--requests", type=int, default=1_000_000)
    parser.add_argument("--period", type=Period.parse, default=Period.parse("2026-11"))
    args = parser.parse_args()
    print(json.dumps(asyncio.run(run(args.customers, args.requests, args.period)), indent=2))


if __name__ == "__main__":
    main()
