"""`make bench`: accepted jobs per second at POST /v1/jobs beside a bare FastAPI endpoint measured
in the same run, what event signing costs beside that, what admission holds cost (a customer with
a monthly budget beside a postpaid one), and the latency of single jobs from submit to booked.
`make bench-admission` measures only the admission holds.

Signing cannot be turned off (an unsigned deployment would book forged events), so its share is
measured directly: the HMAC of one job.submitted body, signed once by the intake's outbox relay
and verified once by each consumer group, beside the intake's time per accepted job.

Runs against the machine's PostgreSQL and Redis (TOKENMILL_BENCH_DATABASE_URL, a database to
CREATE DATABASE from, and TOKENMILL_BENCH_REDIS_URL), in a throwaway database and stream prefix.
Both servers run as one uvicorn process each; the load comes from this process.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import timeit
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import httpx
from redis.asyncio import Redis as RedisClient

from tests.e2e.factory import SERVICES, Factory, free_port
from tokenmill.cli import bootstrap, create_key
from tokenmill.events import JobSubmitted, new_id
from tokenmill.intake import admission
from tokenmill.settings import Settings
from tokenmill.signing import SIGNATURE_HEADER, SigningKeys, new_key_spec

ADMIN_URL = os.environ.get(
    "TOKENMILL_BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
REDIS_URL = os.environ.get("TOKENMILL_BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
BODY = {"prompt": "Name three colours.", "max_tokens": 8}
JSON = {"Content-Type": "application/json"}
JOB_S_MAX = 120.0
SIGNING_ROUNDS = 20_000
# Far above what any run can hold, so that no request is refused (wrk counts a 402 as a failure).
BENCH_BUDGET = Decimal(100_000_000)


def load(url: str, headers: dict[str, str], duration_s: int, concurrency: int) -> float:
    """Drive POST /v1/jobs with wrk for `duration_s`; return accepted (2xx) requests per second.

    wrk, not a Python client: on two cores an asyncio HTTP client tops out far below what
    either server can take, and the ratio would measure the client.
    """
    script = Path(tempfile.mkdtemp(prefix="tokenmill-wrk-")) / "post.lua"
    lines = ['wrk.method = "POST"', f"wrk.body = '{json.dumps(BODY)}'"]
    lines += [f'wrk.headers["{k}"] = "{v}"' for k, v in {**headers, **JSON}.items()]
    script.write_text("\n".join(lines) + "\n")
    command = ["wrk", "-t1", f"-c{concurrency}", f"-d{duration_s}s", "-s", str(script), url]
    output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    assert "Non-2xx" not in output and "Socket errors" not in output, output
    return float(re.search(r"Requests/sec:\s+([\d.]+)", output)[1])


def start_bare(port: int) -> subprocess.Popen:
    command = [
        sys.executable,
        "-m",
        "uvicorn",
        "bench.bare_app:app",
        "--port",
        str(port),
        "--log-level",
        "warning",
        "--no-access-log",
    ]
    return subprocess.Popen(command)


async def wait_healthy(base_url: str) -> None:
    async with httpx.AsyncClient(base_url=base_url) as http:
        for _ in range(600):
            try:
                if (await http.get("/healthz")).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.1)
    raise RuntimeError(f"{base_url} never became healthy")


async def job_latency(base_url: str, headers: dict[str, str]) -> tuple[float, float, float]:
    """One job: (client-observed submit→booked, server submit→completed, submit→booked) in ms."""
    async with httpx.AsyncClient(base_url=base_url, headers=headers) as http:
        started_s = time.perf_counter()
        job = (await http.post("/v1/jobs", json=BODY)).json()
        deadline_s = started_s + JOB_S_MAX
        while job["booked_at"] is None:
            assert time.perf_counter() < deadline_s, "job not booked in time"
            await asyncio.sleep(0.01)
            job = (await http.get(f"/v1/jobs/{job['id']}")).json()
        observed_ms = (time.perf_counter() - started_s) * 1000
    created = datetime.fromisoformat(job["created_at"])
    completed = datetime.fromisoformat(job["completed_at"])
    booked = datetime.fromisoformat(job["booked_at"])
    return (
        observed_ms,
        (completed - created).total_seconds() * 1000,
        (booked - created).total_seconds() * 1000,
    )


def factory_settings(database: str, **overrides: object) -> Settings:
    """A bench factory's settings: `database`, a stream prefix and port of its own, its own
    signing key, and the modelled CPU meter."""
    return Settings.from_env(
        {},
        database_url=urlunsplit(urlsplit(ADMIN_URL)._replace(path=f"/{database}")),
        redis_url=REDIS_URL,
        stream_prefix=f"tmbench.{database}",
        http_port=free_port(),
        meter="modelled-cpu",
        device="cpu",
        signing_keys=new_key_spec(),
        **overrides,
    )


async def main(args: argparse.Namespace) -> None:
    if shutil.which("wrk") is None:
        raise SystemExit("make bench needs wrk: apt-get install wrk")
    database = f"tm_bench_{new_id().lower()}"
    admin = await asyncpg.connect(ADMIN_URL)
    await admin.execute(f'CREATE DATABASE "{database}"')
    settings = factory_settings(database)
    factory = Factory(settings, Path(tempfile.mkdtemp(prefix="tokenmill-bench-")))
    bare_port = free_port()
    bare = start_bare(bare_port)
    try:
        await bootstrap(settings)
        _, key = await create_key(settings, "bench", "standard", settings.region)
        headers = {"Authorization": f"Bearer {key}"}
        factory.start("intake")
        await wait_healthy(factory.base_url)
        await wait_healthy(f"http://127.0.0.1:{bare_port}")
        # Load-test jobs go to a region no worker serves, so they never queue ahead of the
        # latency probes, which a separate customer sends to the worker's region.
        _, load_key = await create_key(settings, "bench-load", "standard", "bench-load")
        bare_url = f"http://127.0.0.1:{bare_port}"
        load_headers = {"Authorization": f"Bearer {load_key}"}
        budget_headers = await budget_customer(settings)
        if args.admission_only:
            report_admission(args, factory.base_url, load_headers, budget_headers)
            return
        intake_rps = report_throughput(args, factory.base_url, bare_url, load_headers)
        report_signing(settings, intake_rps)
        report_admission(args, factory.base_url, load_headers, budget_headers)
        await report_latency(args, factory, headers)
    finally:
        bare.terminate()
        factory.stop()
        await drop_bench_data(settings, admin, database)


def report_throughput(args, intake_url: str, bare_url: str, headers) -> float:
    load(f"{bare_url}/v1/jobs", headers, 2, args.concurrency)
    load(f"{intake_url}/v1/jobs", headers, 2, args.concurrency)
    bare_rps = load(f"{bare_url}/v1/jobs", headers, args.seconds, args.concurrency)
    intake_rps = load(f"{intake_url}/v1/jobs", headers, args.seconds, args.concurrency)
    print(f"POST /v1/jobs for {args.seconds}s each, {args.concurrency} connections (wrk):")
    print(f"  bare FastAPI endpoint    {bare_rps:8.0f} accepted/s")
    print(f"  tokenmill intake         {intake_rps:8.0f} accepted/s")
    print(f"  ratio intake / bare      {intake_rps / bare_rps:8.2f}")
    return intake_rps


async def budget_customer(settings: Settings) -> dict[str, str]:
    """A customer of the load region with a monthly budget: every request it sends is held."""
    customer_id, key = await create_key(settings, "bench-budget", "standard", "bench-load")
    conn = await asyncpg.connect(settings.database_url)
    try:
        await admission.set_budget(conn, customer_id, BENCH_BUDGET)
    finally:
        await conn.close()
    return {"Authorization": f"Bearer {key}"}


def report_admission(args, intake_url: str, postpaid, budgeted) -> None:
    """Accepted jobs/s for a customer whose every request is held against its budget, beside
    a postpaid customer's (never held), in the same run on the same intake."""
    url = f"{intake_url}/v1/jobs"
    load(url, postpaid, 2, args.concurrency)
    load(url, budgeted, 2, args.concurrency)
    postpaid_rps = load(url, postpaid, args.seconds, args.concurrency)
    held_rps = load(url, budgeted, args.seconds, args.concurrency)
    print(f"admission holds, POST /v1/jobs for {args.seconds}s each, {args.concurrency} conns:")
    print(f"  postpaid customer (no hold)         {postpaid_rps:8.0f} accepted/s")
    print(f"  customer with a budget (held)       {held_rps:8.0f} accepted/s")
    print(f"  ratio held / not held               {held_rps / postpaid_rps:8.2f}")


def report_signing(settings: Settings, intake_rps: float) -> None:
    """Print the signing cost per accepted job beside the intake's time per accepted job."""
    keys = SigningKeys.parse(settings.signing_keys)
    body = submitted_body().encode()
    signature = keys.sign(body)
    assert keys.refusal(body, signature) is None
    sign_us = timeit.timeit(lambda: keys.sign(body), number=SIGNING_ROUNDS) / SIGNING_ROUNDS * 1e6
    verify_s = timeit.timeit(lambda: keys.refusal(body, signature), number=SIGNING_ROUNDS)
    verify_us = verify_s / SIGNING_ROUNDS * 1e6
    job_us = 1e6 / intake_rps
    # The intake process signs each job.submitted once (its outbox relay); the worker and the
    # ledger verify it in their own processes. The estimate takes the whole signing time off
    # the intake's time per job, as if it were all on the critical path: an upper bound.
    unsigned_rps = 1e6 / (job_us - sign_us)
    print(f"event signing ({SIGNATURE_HEADER}, HMAC-SHA256, {len(body)}-byte job.submitted):")
    print(f"  sign one event                      {sign_us:8.1f} µs")
    print(f"  verify one event                    {verify_us:8.1f} µs")
    print(f"  intake time per accepted job        {job_us:8.1f} µs")
    print(f"  intake with signing on (measured)   {intake_rps:8.0f} accepted/s")
    print(f"  intake with signing off (estimate) {unsigned_rps:8.0f} accepted/s")
    print(f"  ratio on / off                      {intake_rps / unsigned_rps:8.4f}")


def submitted_body() -> str:
    """The body the intake publishes for one bench request."""
    return JobSubmitted(
        producer="intake",
        customer_id="cus_bench",
        request_id="job_bench",
        region="eu-west",
        tier="standard",
        model="smollm2",
        prompt=BODY["prompt"],
        max_tokens=BODY["max_tokens"],
    ).canonical_json()


async def report_latency(args, factory: Factory, headers) -> None:
    for name in SERVICES:
        if name != "intake":
            factory.start(name)
    await job_latency(factory.base_url, headers)  # The first job waits for the model to load.
    samples = [await job_latency(factory.base_url, headers) for _ in range(args.jobs)]
    observed, completed, booked = (
        statistics.median(column) for column in zip(*samples, strict=True)
    )
    print(f"one job of max_tokens={BODY['max_tokens']}, median of {args.jobs} (queue empty):")
    print(f"  submit → completed (server clocks)  {completed:8.0f} ms")
    print(f"  submit → booked (server clocks)     {booked:8.0f} ms")
    print(f"  submit → booked seen by the client  {observed:8.0f} ms")


async def drop_bench_data(settings: Settings, admin: asyncpg.Connection, database: str) -> None:
    redis = RedisClient.from_url(settings.redis_url)
    async for key in redis.scan_iter(match=f"{settings.stream_prefix}.*", count=500):
        await redis.delete(key)
    await redis.aclose()
    await admin.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
    await admin.close()


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--jobs", type=int, default=5)
    parser.add_argument(
        "--admission-only", action="store_true", help="only the admission holds' cost"
    )
    return parser.parse_args()


if __name__ == "__main__":
    asyncio.run(main(parse_args()))
