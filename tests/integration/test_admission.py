"""Admission on real Postgres and Redis: budgets, prepaid credit and the free quota are held
before a job is queued, in one statement, and settled or released exactly once."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from decimal import Decimal

import asyncpg
import httpx
import pytest

from tests.integration.helpers import eventually, publish_signed
from tokenmill.events import JobFailed, UsageBooked
from tokenmill.intake import admission
from tokenmill.intake.api import create_app
from tokenmill.intake.keys import create_customer, issue_key
from tokenmill.intake.main import wire
from tokenmill.settings import Settings
from tokenmill.streams import Streams

BODY = {"prompt": "Name three colours.", "max_tokens": 20}


@pytest.fixture
async def client(test_settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(test_settings, wire)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://intake") as http:
            yield http


async def new_customer(pool: asyncpg.Pool, tier: str = "standard") -> tuple[str, dict[str, str]]:
    async with pool.acquire() as conn, conn.transaction():
        customer = await create_customer(conn, "admission", tier, "eu-west")
        key = await issue_key(conn, customer.customer_id)
    return customer.customer_id, {"Authorization": f"Bearer {key}"}


async def balance(pool: asyncpg.Pool, customer_id: str) -> asyncpg.Record:
    return await pool.fetchrow(
        "SELECT * FROM intake.admission_balances WHERE customer_id = $1", customer_id
    )


async def written(pool: asyncpg.Pool, customer_id: str) -> tuple[int, int]:
    """The customer's requests, and every queued outbox row."""
    return (
        await pool.fetchval(
            "SELECT count(*) FROM intake.requests WHERE customer_id = $1", customer_id
        ),
        await pool.fetchval("SELECT count(*) FROM intake.outbox"),
    )


async def hold_of_one(client: httpx.AsyncClient, pool: asyncpg.Pool, tier: str) -> Decimal:
    """What one BODY request holds on `tier`: admitted for a customer with a large budget."""
    customer_id, headers = await new_customer(pool, tier)
    async with pool.acquire() as conn:
        await admission.set_budget(conn, customer_id, Decimal(1000))
    response = await client.post("/v1/jobs", json=BODY, headers=headers)
    assert response.status_code == 202, response.text
    return await pool.fetchval(
        "SELECT hold_amount FROM intake.requests WHERE request_id = $1", response.json()["id"]
    )


def booked(row: asyncpg.Record, revenue: Decimal) -> UsageBooked:
    return UsageBooked(
        producer="ledger",
        customer_id=row["customer_id"],
        request_id=row["request_id"],
        region="eu-west",
        tier="standard",
        prompt_tokens=5,
        completion_tokens=7,
        energy_j=Decimal("1.5"),
        cost=Decimal("0.000001"),
        revenue=revenue,
        currency="USD",
        price_version="2026-01",
    )


async def test_500_concurrent_requests_against_a_budget_for_100_admit_exactly_100_and_settle(
    client: httpx.AsyncClient, pool: asyncpg.Pool, test_settings: Settings
):
    hold = await hold_of_one(client, pool, "standard")
    assert hold > 0
    customer_id, headers = await new_customer(pool)
    async with pool.acquire() as conn:
        await admission.set_budget(conn, customer_id, hold * 100)
    responses = await asyncio.gather(
        *(client.post("/v1/jobs", json=BODY, headers=headers) for _ in range(500))
    )
    statuses = Counter(r.status_code for r in responses)
    assert statuses == {202: 100, 402: 400}, statuses
    refusals = [r.json()["detail"] for r in responses if r.status_code == 402]
    assert all("over monthly budget" in detail for detail in refusals)
    assert (await written(pool, customer_id))[0] == 100
    after_admission = await balance(pool, customer_id)
    assert after_admission["period_held"] == hold * 100 == after_admission["held"]

    # Each booked for less than its worst case, and one booking delivered twice.
    rows = await pool.fetch(
        "SELECT customer_id, request_id FROM intake.requests WHERE customer_id = $1", customer_id
    )
    charges = [Decimal("0.000013") + Decimal(i) / 10**9 for i in range(len(rows))]
    events = [booked(row, charge) for row, charge in zip(rows, charges, strict=True)]
    booked_stream = Streams(test_settings.stream_prefix).booked
    for event in [*events, events[0]]:
        await publish_signed(test_settings, booked_stream, event)

    async def settled() -> bool:
        return (await balance(pool, customer_id))["period_held"] == 0

    await eventually(settled)
    final = await balance(pool, customer_id)
    assert final["period_settled"] == sum(charges) and final["held"] == 0
    assert final["period_tokens_used"] == 12 * len(rows)
    states = await pool.fetch(
        "SELECT hold_state, count(*) FROM intake.requests WHERE customer_id = $1 GROUP BY 1",
        customer_id,
    )
    assert [(s["hold_state"], s["count"]) for s in states] == [("settled", 100)]


async def test_a_redelivered_booking_settles_once(
    client: httpx.AsyncClient, pool: asyncpg.Pool, test_settings: Settings
):
    customer_id, headers = await new_customer(pool)
    async with pool.acquire() as conn:
        await admission.set_budget(conn, customer_id, Decimal(5))
    job = (await client.post("/v1/jobs", json=BODY, headers=headers)).json()
    row = {"customer_id": customer_id, "request_id": job["id"]}
    first, again = booked(row, Decimal("0.01")), booked(row, Decimal("0.01"))
    stream = Streams(test_settings.stream_prefix).booked
    # The same event twice (the inbox stops it) and a second booking of the same request
    # (booked_at stops it).
    for event in (first, first, again):
        await publish_signed(test_settings, stream, event)

    async def inbox_saw_all() -> bool:
        return (
            await pool.fetchval(
                "SELECT count(*) FROM intake.inbox WHERE event_id = ANY($1)",
                [first.event_id, again.event_id],
            )
            == 2
        )

    await eventually(inbox_saw_all)
    settled = await balance(pool, customer_id)
    assert (settled["period_settled"], settled["period_held"]) == (Decimal("0.01"), 0)


async def test_a_failed_job_releases_its_hold_once(
    client: httpx.AsyncClient, pool: asyncpg.Pool, test_settings: Settings
):
    customer_id, headers = await new_customer(pool)
    async with pool.acquire() as conn:
        await admission.set_budget(conn, customer_id, Decimal(5))
    job = (await client.post("/v1/jobs", json=BODY, headers=headers)).json()
    assert (await balance(pool, customer_id))["period_held"] > 0
    failed = JobFailed(
        producer="worker",
        customer_id=customer_id,
        request_id=job["id"],
        region="eu-west",
        worker="w",
        reason="the prompt cannot be run",
    )
    stream = Streams(test_settings.stream_prefix).completions
    await publish_signed(test_settings, stream, failed)
    await publish_signed(test_settings, stream, failed.model_copy(update={"event_id": "x" * 26}))

    async def released() -> bool:
        return (await balance(pool, customer_id))["held"] == 0

    await eventually(released)
    await asyncio.sleep(0.3)  # The second JobFailed, a different event, releases nothing.
    after = await balance(pool, customer_id)
    assert (after["held"], after["period_held"], after["period_settled"]) == (0, 0, 0)
    state = await pool.fetchval(
        "SELECT hold_state FROM intake.requests WHERE request_id = $1", job["id"]
    )
    assert state == "released"


async def test_over_budget_is_402_with_how_much_and_nothing_is_queued(
    client: httpx.AsyncClient, pool: asyncpg.Pool
):
    customer_id, headers = await new_customer(pool, "premium")
    async with pool.acquire() as conn:
        await admission.set_budget(conn, customer_id, Decimal("0.01"))
    before = await written(pool, customer_id)
    response = await client.post("/v1/jobs", json=BODY, headers=headers)
    assert response.status_code == 402, response.text
    assert response.headers["content-type"] == "application/problem+json"
    detail = response.json()["detail"]
    assert "over monthly budget" in detail and "short by" in detail, detail
    assert await written(pool, customer_id) == before
    assert (await balance(pool, customer_id))["held"] == 0


async def test_out_of_prepaid_credit_is_402_in_openai_shape_on_chat(
    client: httpx.AsyncClient, pool: asyncpg.Pool, test_settings: Settings
):
    customer_id, headers = await new_customer(pool, "premium")
    async with pool.acquire() as conn:
        await admission.add_credit(
            conn, Streams(test_settings.stream_prefix).billing, customer_id, Decimal("0.01"), ""
        )
    before = await written(pool, customer_id)
    chat = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 50}
    response = await client.post("/v1/chat/completions", json=chat, headers=headers)
    assert response.status_code == 402, response.text
    error = response.json()["error"]
    assert error["code"] == "insufficient_quota"
    assert "out of prepaid credit" in error["message"] and "0.01" in error["message"]
    assert await written(pool, customer_id) == before


async def test_a_free_customer_past_its_quota_is_402_and_nothing_is_queued(
    client: httpx.AsyncClient, pool: asyncpg.Pool
):
    customer_id, headers = await new_customer(pool, "free")
    assert (await client.post("/v1/jobs", json=BODY, headers=headers)).status_code == 202
    # As if the month had used all but 10 of the 100,000 included tokens.
    await pool.execute(
        "UPDATE intake.admission_balances SET period_tokens_used = 99990 - period_tokens_held "
        "WHERE customer_id = $1",
        customer_id,
    )
    before = await written(pool, customer_id)
    response = await client.post("/v1/jobs", json=BODY, headers=headers)
    assert response.status_code == 402, response.text
    detail = response.json()["detail"]
    assert "free quota used up" in detail and "10 of the plan's 100000" in detail, detail
    assert await written(pool, customer_id) == before


async def test_a_postpaid_customer_is_not_held_and_a_retry_does_not_hold_twice(
    client: httpx.AsyncClient, pool: asyncpg.Pool
):
    postpaid_id, postpaid = await new_customer(pool)
    assert (await client.post("/v1/jobs", json=BODY, headers=postpaid)).status_code == 202
    assert (await balance(pool, postpaid_id))["held"] == 0
    customer_id, headers = await new_customer(pool)
    async with pool.acquire() as conn:
        await admission.set_budget(conn, customer_id, Decimal(5))
    retried = {**headers, "Idempotency-Key": "once"}
    first = await client.post("/v1/jobs", json=BODY, headers=retried)
    again = await client.post("/v1/jobs", json=BODY, headers=retried)
    assert (first.status_code, again.status_code) == (202, 200)
    hold = await pool.fetchval(
        "SELECT hold_amount FROM intake.requests WHERE request_id = $1", first.json()["id"]
    )
    assert (await balance(pool, customer_id))["held"] == hold > 0


async def test_a_suspended_customer_gets_403_on_every_route_and_works_again_when_resumed(
    client: httpx.AsyncClient, pool: asyncpg.Pool
):
    customer_id, headers = await new_customer(pool)
    assert (await client.get("/v1/usage", headers=headers)).status_code == 200
    await pool.execute(
        "UPDATE intake.customers SET suspended_at = now() WHERE customer_id = $1", customer_id
    )
    routes = [
        ("POST", "/v1/jobs", BODY),
        ("GET", "/v1/jobs/job_x", None),
        ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}]}),
        ("POST", "/v1/completions", {"prompt": "Hi"}),
        ("GET", "/v1/models", None),
        ("GET", "/v1/usage", None),
    ]

    async def all_refused() -> bool:
        answers = [
            await client.request(method, path, json=body, headers=headers)
            for method, path, body in routes
        ]
        return all(a.status_code == 403 and "suspended" in a.text for a in answers)

    await eventually(all_refused, timeout_s=1.0)
    await pool.execute(
        "UPDATE intake.customers SET suspended_at = NULL WHERE customer_id = $1", customer_id
    )

    async def works() -> bool:
        return (await client.get("/v1/usage", headers=headers)).status_code == 200

    await eventually(works, timeout_s=1.0)


async def test_a_new_month_starts_the_budget_again_and_last_months_hold_settles_there(
    client: httpx.AsyncClient, pool: asyncpg.Pool, test_settings: Settings
):
    customer_id, headers = await new_customer(pool)
    async with pool.acquire() as conn:
        await admission.set_budget(conn, customer_id, Decimal("1.00"))
    last_month = (await client.post("/v1/jobs", json=BODY, headers=headers)).json()["id"]
    # As if that request had been admitted last month, and last month's budget were spent.
    await pool.execute(
        "UPDATE intake.requests SET submitted_at = submitted_at - interval '1 month' "
        "WHERE request_id = $1",
        last_month,
    )
    await pool.execute(
        "UPDATE intake.admission_balances SET period = (period - interval '1 month')::date, "
        "period_settled = 1.00 - period_held WHERE customer_id = $1",
        customer_id,
    )
    this_month = await client.post("/v1/jobs", json=BODY, headers=headers)
    assert this_month.status_code == 202, this_month.text
    holds = dict(
        await pool.fetch(
            "SELECT request_id, hold_amount FROM intake.requests WHERE customer_id = $1",
            customer_id,
        )
    )
    rolled = await balance(pool, customer_id)
    assert rolled["period"] == admission.period_of(datetime.now(UTC))
    assert (rolled["period_settled"], rolled["period_held"]) == (0, holds[this_month.json()["id"]])
    assert rolled["held"] == sum(holds.values())

    row = {"customer_id": customer_id, "request_id": last_month}
    booking = booked(row, Decimal("0.000010"))
    await publish_signed(test_settings, Streams(test_settings.stream_prefix).booked, booking)

    async def last_month_settled() -> bool:
        return (await balance(pool, customer_id))["held"] == holds[this_month.json()["id"]]

    await eventually(last_month_settled)
    after = await balance(pool, customer_id)
    # Its charge is last month's: this month's counters are untouched.
    assert (after["period_settled"], after["period_held"]) == (0, rolled["period_held"])
