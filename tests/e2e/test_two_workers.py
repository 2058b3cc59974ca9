"""Two workers share the region's stream; one is killed while its batch runs. Every job
completes once and is billed once: the survivor claims the dead worker's entries and runs them
again from the start, and the ledger books each request once whatever was published."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import asyncpg
import pytest
from redis.asyncio import Redis

from tests.e2e.factory import SERVICES, Factory, customer_key, running_factory
from tests.e2e.test_factory import client, wait_for
from tests.integration.helpers import eventually
from tokenmill.settings import Settings
from tokenmill.streams import Streams

JOBS = 6
pytestmark = pytest.mark.slow  # Two models to load and a claim to wait out: 25-90 s here.


@pytest.fixture(scope="module")
def two_workers(settings: Settings, tmp_path_factory) -> Iterator[Factory]:
    overrides = dict(
        # Two workers on a shared host: one core each rather than both waiting on both.
        engine_torch_threads=1,
        # Four jobs in hand at most (three running, one waiting): the first worker to read
        # cannot take all six, so both run a batch when the kill comes.
        engine_running_max=3,
        engine_waiting_max=1,
        # Jobs are submitted once both workers have their model (the intake's /readyz).
        ready_workers_min=2,
    )
    logs, services = tmp_path_factory.mktemp("logs"), (*SERVICES, "worker-2")
    with running_factory(settings, logs, "e2e2w", services, **overrides) as running:
        yield running


async def holders(factory: Factory) -> dict[str, int]:
    """Jobs each worker process has in hand (its pending entries), by process name."""
    settings = factory.settings
    redis = Redis.from_url(settings.redis_url)
    try:
        stream = Streams(settings.stream_prefix).jobs(settings.region)
        summary = await redis.xpending(stream, "worker")
    finally:
        await redis.aclose()
    # A consumer is named "<host>-<pid>".
    by_pid = {c["name"].decode().rsplit("-", 1)[1]: c["pending"] for c in summary["consumers"]}
    return {
        name: by_pid.get(str(process.pid), 0)
        for name, process in factory.processes.items()
        if name.startswith("worker")
    }


async def test_a_worker_killed_mid_batch_loses_and_double_bills_nothing(
    two_workers: Factory, pool: asyncpg.Pool
):
    factory = two_workers
    api_key = await customer_key(factory, "two", "standard")
    async with client(factory, api_key) as http:

        async def both_ready() -> bool:
            return (await http.get("/readyz")).status_code == 200

        await eventually(both_ready, timeout_s=180)
        ids = []
        for index in range(JOBS):
            body = {
                "prompt": f"Job {index}. List the numbers from 1 to 300, one per line:\n1\n2\n",
                "max_tokens": 100,
            }
            response = await http.post("/v1/jobs", json=body)
            assert response.status_code == 202, response.text
            ids.append(response.json()["id"])

        async def both_hold_jobs() -> bool:
            return min((await holders(factory)).values()) >= 1

        await eventually(both_hold_jobs, timeout_s=60)
        held = await holders(factory)
        victim = max(held, key=held.get)
        assert held[victim] >= 2, f"the victim runs a batch: {held}"
        factory.kill(victim)

        jobs = await asyncio.gather(*(wait_for(http, j, lambda v: v["billing"]) for j in ids))

    assert [j["status"] for j in jobs] == ["completed"] * JOBS
    billed = await pool.fetch(
        "SELECT request_id, count(*) AS n FROM ledger.request_usage "
        "WHERE request_id = ANY($1) GROUP BY request_id",
        ids,
    )
    assert sorted(r["request_id"] for r in billed) == sorted(ids)
    assert all(r["n"] == 1 for r in billed), [dict(r) for r in billed]
    # Each job's charge is on the customer once: the books agree with the per-request rows.
    charges = await pool.fetchval(
        "SELECT count(*) FROM ledger.request_usage WHERE customer_id = "
        "(SELECT customer_id FROM ledger.request_usage WHERE request_id = $1)",
        ids[0],
    )
    assert charges == JOBS
