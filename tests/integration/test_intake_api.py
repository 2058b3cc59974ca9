"""The intake's HTTP API in process (real Postgres and Redis, no worker): acceptance,
idempotency keys, the outbox relay to the job stream, and refusals that change nothing."""

from __future__ import annotations

from collections.abc import AsyncIterator

import asyncpg
import httpx
import pytest
from redis.asyncio import Redis as RedisClient

from tests.integration.helpers import eventually
from tokenmill.events import JobSubmitted, parse_event
from tokenmill.intake.api import create_app
from tokenmill.intake.keys import create_customer, issue_key
from tokenmill.intake.main import wire
from tokenmill.settings import Settings
from tokenmill.streams import Streams


@pytest.fixture
async def client(test_settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(test_settings, wire)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://intake") as http:
            yield http


async def new_key(pool: asyncpg.Pool, tier: str = "standard") -> str:
    async with pool.acquire() as conn, conn.transaction():
        customer = await create_customer(conn, "test", tier, "eu-west")
        return await issue_key(conn, customer.customer_id)


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def counts(pool: asyncpg.Pool) -> tuple[int, int]:
    return (
        await pool.fetchval("SELECT count(*) FROM intake.requests"),
        await pool.fetchval("SELECT count(*) FROM intake.outbox"),
    )


async def test_accepted_job_is_recorded_and_relayed_to_its_region_stream(
    client: httpx.AsyncClient, pool: asyncpg.Pool, redis: RedisClient, test_settings: Settings
):
    key = await new_key(pool, tier="premium")
    response = await client.post(
        "/v1/jobs", json={"prompt": "Say hi", "max_tokens": 8}, headers=auth(key)
    )
    assert response.status_code == 202, response.text
    job = response.json()
    assert job["status"] == "queued" and job["tier"] == "premium"
    assert response.headers["location"] == f"/v1/jobs/{job['id']}"

    stream = Streams(test_settings.stream_prefix).jobs("eu-west")

    async def relayed() -> bool:
        return await redis.xlen(stream) == 1

    await eventually(relayed)
    ((_, fields),) = await redis.xrange(stream)
    event = parse_event(fields[b"__data__"][fields[b"__data__"].index(b"{") :])
    assert isinstance(event, JobSubmitted)
    assert event.request_id == job["id"] and event.max_tokens == 8 and event.tier == "premium"
    headers = await pool.fetchval(
        "SELECT headers FROM intake.outbox WHERE event_id = $1", event.event_id
    )
    assert headers["event_id"] == event.event_id
    assert headers["traceparent"].startswith("00-"), "the HTTP request's trace travels on"
    seen = await client.get(f"/v1/jobs/{job['id']}", headers=auth(key))
    assert seen.status_code == 200 and seen.json()["id"] == job["id"]


async def test_same_idempotency_key_returns_the_same_job_and_queues_once(
    client: httpx.AsyncClient, pool: asyncpg.Pool
):
    key = await new_key(pool)
    headers = {**auth(key), "Idempotency-Key": "order-42"}
    body = {"prompt": "Count to three", "max_tokens": 8}
    before = await counts(pool)
    first = await client.post("/v1/jobs", json=body, headers=headers)
    again = await client.post("/v1/jobs", json=body, headers=headers)
    assert (first.status_code, again.status_code) == (202, 200)
    assert first.json()["id"] == again.json()["id"]
    assert await counts(pool) == (before[0] + 1, before[1] + 1)

    other_body = await client.post("/v1/jobs", json={**body, "max_tokens": 9}, headers=headers)
    assert other_body.status_code == 409
    assert other_body.headers["content-type"] == "application/problem+json"
    assert await counts(pool) == (before[0] + 1, before[1] + 1)


@pytest.mark.parametrize(
    ("body", "status", "needle"),
    [
        ({"prompt": "", "max_tokens": 8}, 400, "prompt"),
        ({"prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
        ({"prompt": "hi", "max_tokens": 100000}, 400, "max_tokens"),
        ({"prompt": "hi"}, 400, "max_tokens"),
        ({"prompt": "x" * 40000, "max_tokens": 8}, 400, "limit"),
        ({"prompt": 5, "max_tokens": 8}, 400, "prompt"),
    ],
)
async def test_bad_input_gets_a_clear_problem_and_writes_nothing(
    client: httpx.AsyncClient, pool: asyncpg.Pool, body, status, needle
):
    key = await new_key(pool)
    before = await counts(pool)
    response = await client.post("/v1/jobs", json=body, headers=auth(key))
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert needle in response.json()["detail"]
    assert await counts(pool) == before


async def test_malformed_json_is_refused(client: httpx.AsyncClient, pool: asyncpg.Pool):
    key = await new_key(pool)
    before = await counts(pool)
    response = await client.post(
        "/v1/jobs", content=b"{not json", headers={**auth(key), "Content-Type": "application/json"}
    )
    assert response.status_code == 400
    assert "not valid JSON" in response.json()["detail"]
    assert await counts(pool) == before


@pytest.mark.parametrize("header", [None, "Bearer tm_wrong", "Basic abc", "Bearer "])
async def test_missing_or_wrong_key_is_401_and_writes_nothing(
    client: httpx.AsyncClient, pool: asyncpg.Pool, header
):
    before = await counts(pool)
    headers = {"Authorization": header} if header else {}
    response = await client.post(
        "/v1/jobs", json={"prompt": "hi", "max_tokens": 8}, headers=headers
    )
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"
    assert await counts(pool) == before


async def test_openai_routes_answer_errors_in_openai_shape(client: httpx.AsyncClient):
    response = await client.post("/v1/chat/completions", json={"messages": []})
    assert response.status_code == 401
    assert response.json()["error"]["type"] == "authentication_error"


async def test_another_customers_job_is_not_found(client: httpx.AsyncClient, pool: asyncpg.Pool):
    owner, stranger = await new_key(pool), await new_key(pool)
    job = (
        await client.post("/v1/jobs", json={"prompt": "hi", "max_tokens": 4}, headers=auth(owner))
    ).json()
    response = await client.get(f"/v1/jobs/{job['id']}", headers=auth(stranger))
    assert response.status_code == 404
    missing = await client.get("/v1/jobs/job_nope", headers=auth(stranger))
    assert missing.json()["detail"].replace("job_nope", job["id"]) == response.json()["detail"]


async def test_a_method_a_route_lacks_is_a_405_that_names_the_allowed_ones(
    client: httpx.AsyncClient,
):
    response = await client.delete("/v1/jobs/job_x")
    assert response.status_code == 405
    assert response.headers["allow"] == "GET"
    assert (await client.get("/v1/jobs")).headers["allow"] == "POST"
