"""The whole factory as separate processes on real Postgres and Redis, driven over HTTP."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import datetime
from decimal import Decimal

import asyncpg
import httpx
import pytest
from openai import OpenAI

from tests.e2e.factory import Factory, customer_key, running_factory
from tests.integration.helpers import eventually
from tokenmill.db import connect
from tokenmill.intake import admission, customers
from tokenmill.money import joules_per_token
from tokenmill.settings import Settings
from tokenmill.streams import Streams

JOB_S_MAX = 120.0


@pytest.fixture(scope="module")
def factory(settings: Settings, tmp_path_factory) -> Iterator[Factory]:
    logs = tmp_path_factory.mktemp("logs")
    overrides = {"power_sample_interval_s": 1.0, "energy_interval_s": 1.0}
    with running_factory(settings, logs, "e2e", **overrides) as running:
        yield running


@pytest.fixture(scope="module")
async def api_key(factory: Factory) -> str:
    return await customer_key(factory, "e2e", "premium")


async def job_view(http: httpx.AsyncClient, job_id: str) -> dict:
    response = await http.get(f"/v1/jobs/{job_id}")
    assert response.status_code == 200, response.text
    return response.json()


async def wait_for(http: httpx.AsyncClient, job_id: str, done) -> dict:
    async def reached() -> bool:
        return done(await job_view(http, job_id))

    await eventually(reached, timeout_s=JOB_S_MAX)
    return await job_view(http, job_id)


def client(factory: Factory, api_key: str) -> httpx.AsyncClient:
    headers = {"Authorization": f"Bearer {api_key}"}
    return httpx.AsyncClient(base_url=factory.base_url, headers=headers, timeout=30)


async def test_job_goes_from_submit_to_booked(factory: Factory, api_key: str, pool: asyncpg.Pool):
    async with client(factory, api_key) as http:
        submitted = await http.post(
            "/v1/jobs",
            json={"prompt": "The capital of France is", "max_tokens": 12},
            headers={"Idempotency-Key": "e2e-first"},
        )
        assert submitted.status_code == 202, submitted.text
        job_id = submitted.json()["id"]
        job = await wait_for(http, job_id, lambda j: j["billing"] is not None)

    assert job["status"] == "completed" and job["output"]["text"].strip()
    assert 1 <= job["usage"]["completion_tokens"] <= 12 and job["usage"]["prompt_tokens"] > 0
    timings = job["timings"]
    assert 0 <= timings["queue_ms"] <= timings["ttft_ms"] <= timings["total_ms"]
    assert job["energy"]["meter"] == "modelled-cpu" and job["energy"]["estimated"] is True
    assert Decimal(job["energy"]["joules"]) > 0
    tokens = job["usage"]["total_tokens"]
    assert Decimal(job["energy"]["joules_per_token"]) == joules_per_token(
        Decimal(job["energy"]["joules"]), tokens
    )
    assert Decimal(job["billing"]["revenue"]) > 0 and "cost" not in job["billing"]

    # The customer sees what it is charged; our cost is in the operator's books only.
    books = await pool.fetchrow("SELECT * FROM ledger.request_usage WHERE request_id = $1", job_id)
    assert books["revenue"] == Decimal(job["billing"]["revenue"]) and books["cost"] > 0
    assert books["completion_tokens"] == job["usage"]["completion_tokens"]

    async def judged() -> bool:
        return bool(
            await pool.fetchval("SELECT count(*) FROM ledger.quality WHERE request_id = $1", job_id)
        )

    await eventually(judged)

    story = {"job.submitted", "job.started", "job.completed", "quality.verdict", "usage.booked"}

    async def logged_whole_story() -> bool:
        types = await pool.fetch(
            "SELECT event_type FROM ledger.events WHERE request_id = $1 ORDER BY seq", job_id
        )
        return {r["event_type"] for r in types} == story

    await eventually(logged_whole_story)


async def rows_since(
    pool: asyncpg.Pool, table: str, start: str, since: datetime
) -> list[asyncpg.Record]:
    """`table`'s rows from `since` on by their `start` column, oldest first: the database is
    the whole test run's, and rows from before the factory started are other tests'."""
    return await pool.fetch(f"SELECT * FROM {table} WHERE {start} >= $1 ORDER BY {start}", since)


async def test_telemetry_power_windows_reach_the_ledger(factory: Factory, pool: asyncpg.Pool):
    async def ours() -> list[asyncpg.Record]:
        return await rows_since(pool, "ledger.power_samples", "window_start", factory.started_at)

    async def sampled() -> bool:
        return len(await ours()) >= 2

    await eventually(sampled)
    rows = (await ours())[:2]
    # Telemetry models the whole host; the worker's meter only its own process.
    assert all(r["meter"] == "modelled-cpu-host" and r["estimated"] for r in rows)
    assert all(r["energy_j"] > 0 and r["window_end"] > r["window_start"] for r in rows)
    # Windows are contiguous: together they cover everything the meter counted.
    assert rows[0]["window_end"] == rows[1]["window_start"]


async def test_worker_energy_intervals_are_booked_with_their_idle_energy_as_overhead(
    factory: Factory, pool: asyncpg.Pool
):
    async def ours() -> list[asyncpg.Record]:
        table = "ledger.energy_intervals"
        return await rows_since(pool, table, "interval_start", factory.started_at)

    async def booked() -> bool:
        return len(await ours()) >= 2

    await eventually(booked)
    rows = await ours()
    assert all(r["metered_j"] == r["attributed_j"] + r["idle_j"] for r in rows)
    assert all(r["meter"] == "modelled-cpu" and r["device"] == "cpu" for r in rows)
    assert sum(r["idle_j"] for r in rows) > 0
    # One statement, one snapshot: the journal's overhead is the intervals' overhead cost.
    overhead = await pool.fetchrow(
        "SELECT (SELECT sum(overhead_cost) FROM ledger.energy_intervals) AS intervals, "
        "(SELECT sum(amount) FROM ledger.posting_legs "
        " WHERE account_id LIKE 'expense:factory_overhead:%') AS journal"
    )
    assert overhead["journal"] == overhead["intervals"] > 0


async def test_openai_client_works_unchanged(factory: Factory, api_key: str):
    openai = OpenAI(base_url=f"{factory.base_url}/v1", api_key=api_key, timeout=JOB_S_MAX)
    chat = await asyncio.to_thread(
        openai.chat.completions.create,
        model="smollm2",
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=16,
    )
    assert chat.choices[0].message.content.strip()
    assert chat.choices[0].finish_reason in ("stop", "length")
    assert chat.usage.completion_tokens <= 16 and chat.usage.prompt_tokens > 0
    assert chat.usage.total_tokens == chat.usage.prompt_tokens + chat.usage.completion_tokens

    text = await asyncio.to_thread(
        openai.completions.create, model="smollm2", prompt="1, 2, 3,", max_tokens=6
    )
    assert text.choices[0].text and text.usage.completion_tokens <= 6


async def test_usage_shows_tokens_cost_and_revenue_by_tier(factory: Factory, api_key: str):
    async with client(factory, api_key) as http:
        usage = (await http.get("/v1/usage")).json()
    (premium,) = usage["tiers"]
    assert premium["tier"] == "premium" and premium["completed"] >= 1
    assert premium["completion_tokens"] > 0 and Decimal(premium["revenue"]) > 0


async def test_the_intake_is_ready_once_the_worker_has_its_model(factory: Factory):
    async with httpx.AsyncClient(base_url=factory.base_url, timeout=5) as http:

        async def ready() -> bool:
            return (await http.get("/readyz")).status_code == 200

        await eventually(ready, timeout_s=JOB_S_MAX)
        body = (await http.get("/readyz")).json()
        metrics = (await http.get("/metrics")).text
    (worker,) = body["checks"]["workers"]["alive"]
    assert worker["model"] and worker["device"] == "cpu"
    assert 'tokenmill_workers_alive{device="cpu"' in metrics


async def test_killed_worker_job_completes_once_and_is_billed_once(
    factory: Factory, api_key: str, pool: asyncpg.Pool
):
    async with client(factory, api_key) as http:
        submitted = await http.post(
            "/v1/jobs",
            json={
                "prompt": "List the numbers from 1 to 300, one per line:\n1\n2\n",
                "max_tokens": 200,
            },
        )
        job_id = submitted.json()["id"]
        await wait_for(http, job_id, lambda j: j["status"] == "running")
        factory.kill("worker")
        assert (await job_view(http, job_id))["status"] == "running"
        factory.start("worker")
        job = await wait_for(http, job_id, lambda j: j["billing"] is not None)

    assert job["status"] == "completed"
    billed = await pool.fetchval(
        "SELECT count(*) FROM ledger.request_usage WHERE request_id = $1", job_id
    )
    starts = await pool.fetchval(
        "SELECT count(*) FROM ledger.events WHERE request_id = $1 AND event_type = 'job.completed'",
        job_id,
    )
    assert billed == 1 and starts >= 1


async def test_a_held_job_settles_at_its_booked_charge_and_the_books_reconcile(
    factory: Factory, pool: asyncpg.Pool
):
    """A customer with a budget and prepaid credit: the job's worst case is held, the real
    ledger's booking settles it, and the ledger's revenue and top-up match the intake's."""
    conn = await connect(factory.settings.database_url)
    try:
        region = factory.settings.region
        customer, key = await customers.create(conn, "held", "standard", region, True)
        billing = Streams(factory.settings.stream_prefix).billing
        await admission.set_budget(conn, customer.customer_id, Decimal("1.00"))
        await admission.add_credit(conn, billing, customer.customer_id, Decimal("2.00"), "e2e")
    finally:
        await conn.close()
    async with client(factory, key) as http:
        submitted = await http.post("/v1/jobs", json={"prompt": "Say hi", "max_tokens": 8})
        assert submitted.status_code == 202, submitted.text
        job = await wait_for(http, submitted.json()["id"], lambda j: j["billing"] is not None)
    revenue = Decimal(job["billing"]["revenue"])

    async def settled() -> bool:
        balance = await pool.fetchrow(
            "SELECT * FROM intake.admission_balances WHERE customer_id = $1", customer.customer_id
        )
        return balance["held"] == 0 and balance["period_settled"] == revenue

    await eventually(settled)
    balance = await pool.fetchrow(
        "SELECT prepaid_balance FROM intake.admission_balances WHERE customer_id = $1",
        customer.customer_id,
    )
    assert balance["prepaid_balance"] == Decimal("2.00") - revenue

    async def reconciled() -> bool:
        async with pool.acquire() as conn:
            (period,) = await admission.reconcile(conn, customer.customer_id)
        return period["matches"] and period["ledger_topups"] == "2.00"

    await eventually(reconciled)
