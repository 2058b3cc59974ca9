"""Intake, inspector and ledger in process on real Postgres and Redis, with the worker's part
played by the test: a job is booked once however often its completion is delivered."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from decimal import Decimal

import asyncpg
import httpx
import pytest
from faststream.redis import RedisBroker
from redis.asyncio import Redis as RedisClient

from tests.integration.helpers import eventually
from tests.integration.test_intake_api import auth, new_key
from tokenmill import service
from tokenmill.events import EnergyReading, JobCompleted, JobSubmitted, parse_event, utc_now
from tokenmill.inspector.main import wire as inspector_wire
from tokenmill.intake.api import create_app
from tokenmill.intake.main import wire as intake_wire
from tokenmill.ledger.main import wire as ledger_wire
from tokenmill.settings import Settings
from tokenmill.signing import SigningKeys
from tokenmill.streams import Streams, publish_event


@pytest.fixture
async def factory(test_settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """The intake API with the inspector and ledger running beside it."""
    app = create_app(test_settings, intake_wire)
    async with contextlib.AsyncExitStack() as stack:
        await stack.enter_async_context(service.running("ledger", test_settings, ledger_wire))
        await stack.enter_async_context(service.running("inspector", test_settings, inspector_wire))
        await stack.enter_async_context(app.router.lifespan_context(app))
        transport = httpx.ASGITransport(app=app)
        yield await stack.enter_async_context(
            httpx.AsyncClient(transport=transport, base_url="http://intake")
        )


async def take_job(redis: RedisClient, stream: str) -> JobSubmitted:
    """Read the next job the way a worker would."""
    ((_, entries),) = await redis.xreadgroup(
        "worker", "test-worker", {stream: ">"}, count=1, block=5000
    )
    ((_, fields),) = entries
    data = fields[b"__data__"]
    event = parse_event(data[data.index(b"{") :])
    assert isinstance(event, JobSubmitted)
    return event


def complete(job: JobSubmitted, text: str, completion_tokens: int) -> JobCompleted:
    return JobCompleted(
        **job.envelope_for("worker"),
        tier=job.tier,
        submitted_at=job.occurred_at,
        worker="test-worker",
        model=job.model,
        device="cpu",
        prompt=job.prompt,
        max_tokens=job.max_tokens,
        text=text,
        finish_reason="stop",
        prompt_tokens=10,
        completion_tokens=completion_tokens,
        queue_ms=5.0,
        ttft_ms=50.0,
        generation_ms=100.0,
        e2e_ms=120.0,
        compute_s=Decimal("36"),
        energy=EnergyReading(energy_j=Decimal("3600"), meter="scripted", estimated=True),
        occurred_at=utc_now(),
    )


async def test_completion_delivered_three_times_is_booked_once(
    factory: httpx.AsyncClient, pool: asyncpg.Pool, redis: RedisClient, test_settings: Settings
):
    streams = Streams(test_settings.stream_prefix)
    key = await new_key(pool, tier="standard")
    submitted = await factory.post(
        "/v1/jobs", json={"prompt": "Hi", "max_tokens": 8}, headers=auth(key)
    )
    job = await take_job(redis, streams.jobs("eu-west"))
    assert job.request_id == submitted.json()["id"]

    first = complete(job, "Hello there, friend.", completion_tokens=5)
    rerun = complete(job, "A different answer from a re-run.", completion_tokens=7)
    broker = RedisBroker(test_settings.redis_url)
    await broker.connect()
    keys = SigningKeys.parse(test_settings.signing_keys)
    try:
        for event in (first, first, rerun):
            await publish_event(broker, streams.completions, event, keys)
    finally:
        await broker.stop()

    async def booked() -> bool:
        view = (await factory.get(f"/v1/jobs/{job.request_id}", headers=auth(key))).json()
        return view["billing"] is not None

    await eventually(booked)
    view = (await factory.get(f"/v1/jobs/{job.request_id}", headers=auth(key))).json()
    assert view["status"] == "completed"
    assert view["output"]["text"] == "Hello there, friend."
    assert view["usage"] == {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}
    assert view["energy"] == {
        "joules": "3600",
        "joules_per_token": "240",  # 3600 J over 15 tokens.
        "meter": "scripted",
        "estimated": True,
    }
    # 10 x $0.50/M + 5 x $1.50/M; 3600 J = 0.001 kWh x 1.2 x $0.12 + 36 s = 0.01 h x $0.04.
    # The customer sees the charge; our cost (0.000544) stays in the ledger's books.
    assert view["billing"] == {"revenue": "0.0000125", "currency": "USD"}

    async def verdicts_recorded() -> bool:
        judged = "SELECT count(*) FROM ledger.quality WHERE request_id = $1"
        return await pool.fetchval(judged, job.request_id) == 2

    # Each distinct completion is judged; the request's verdict is the booked one's.
    await eventually(verdicts_recorded)
    counted = await pool.fetch(
        "SELECT * FROM ledger.request_quality WHERE request_id = $1", job.request_id
    )
    assert [r["completion_event_id"] for r in counted] == [first.event_id]
    rows = await pool.fetch(
        "SELECT * FROM ledger.request_usage WHERE request_id = $1", job.request_id
    )
    assert len(rows) == 1 and rows[0]["completion_event_id"] == first.event_id
    assert rows[0]["cost"] == Decimal("0.000544")
    assert rows[0]["margin"] == rows[0]["revenue"] - rows[0]["cost"]

    async def both_completions_logged() -> bool:
        logged = await pool.fetchval(
            "SELECT count(*) FROM ledger.events "
            "WHERE request_id = $1 AND event_type = 'job.completed'",
            job.request_id,
        )
        return logged == 2

    # Both distinct completions are in the log; only the first is billed.
    await eventually(both_completions_logged)
    assert (
        await pool.fetchval(
            "SELECT count(*) FROM ledger.request_usage WHERE request_id = $1", job.request_id
        )
        == 1
    )
    assert await redis.xlen(streams.booked) == 1

    usage = (await factory.get("/v1/usage", headers=auth(key))).json()
    (standard,) = usage["tiers"]
    assert standard["tier"] == "standard" and standard["completion_tokens"] == 5
    assert standard["revenue"] == "0.0000125" and "cost" not in standard
    assert standard["currency"] == "USD"
