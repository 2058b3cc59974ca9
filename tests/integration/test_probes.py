"""The intake's probes and metrics against real Postgres and Redis: liveness, readiness that
names the failing check, worker heartbeats, dead-letter counts, Prometheus text."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from types import SimpleNamespace

import asyncpg
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from redis.asyncio import Redis as RedisClient

from tests.e2e.factory import free_port
from tests.integration.helpers import eventually
from tests.integration.test_intake_api import auth, new_key
from tokenmill import health
from tokenmill.intake import draining, probes
from tokenmill.intake.api import create_app
from tokenmill.intake.keys import digest
from tokenmill.intake.main import wire
from tokenmill.settings import Settings
from tokenmill.streams import Streams


@pytest.fixture
async def intake(test_settings: Settings) -> AsyncIterator[tuple[httpx.AsyncClient, object]]:
    """The intake app in process, with the drain main.serve puts in front of it."""
    app = create_app(test_settings, wire)
    draining.install(app, draining.Drain(), test_settings.drain_retry_after_s)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://intake") as http:
            yield http, app


def a_worker(settings: Settings, name: str = "worker-1") -> Settings:
    return dataclasses.replace(settings, consumer=name)


def samples(text: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """The samples of metric `name`, keyed by their sorted labels."""
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                found[tuple(sorted(sample.labels.items()))] = sample.value
    return found


async def test_liveness_answers_and_readiness_waits_for_a_worker_with_its_model(
    intake, redis: RedisClient, test_settings: Settings
):
    http, _ = intake
    assert (await http.get("/healthz")).status_code == 200
    refused = await http.get("/readyz")
    assert refused.status_code == 503
    body = refused.json()
    assert body["status"] == "not ready"
    assert body["checks"]["postgres"]["ok"] and body["checks"]["redis"]["ok"]
    assert not body["checks"]["workers"]["ok"]
    assert "0 worker(s) of eu-west" in body["checks"]["workers"]["error"]

    await health.beat(redis, a_worker(test_settings), "smollm2", "cpu")
    ready = await http.get("/readyz")
    assert ready.status_code == 200, ready.text
    (worker,) = ready.json()["checks"]["workers"]["alive"]
    assert (worker["consumer"], worker["model"], worker["device"]) == ("worker-1", "smollm2", "cpu")


async def test_a_worker_of_another_region_does_not_make_this_intake_ready(
    intake, redis: RedisClient, test_settings: Settings
):
    http, _ = intake
    elsewhere = dataclasses.replace(a_worker(test_settings), region="us-east")
    await health.beat(redis, elsewhere, "smollm2", "cuda")
    assert (await http.get("/readyz")).status_code == 503


async def test_readiness_names_the_dependency_that_does_not_answer(
    intake, redis: RedisClient, test_settings: Settings
):
    _, app = intake
    await health.beat(redis, a_worker(test_settings), "smollm2", "cpu")
    runtime = app.state.runtime
    nowhere = f"127.0.0.1:{free_port()}"
    dead_redis = RedisClient.from_url(f"redis://{nowhere}")
    dead_pool = await asyncpg.create_pool(f"postgresql://postgres@{nowhere}/x", min_size=0)
    try:
        ready, body = await probes.readiness(
            dataclasses.replace(runtime, redis=dead_redis), False, True
        )
        assert not ready
        assert body["checks"]["postgres"]["ok"] and not body["checks"]["redis"]["ok"]
        assert body["checks"]["redis"]["error"] and body["dead_letters"] is None
        ready, body = await probes.readiness(
            dataclasses.replace(runtime, pool=dead_pool), False, True
        )
        assert not ready
        assert not body["checks"]["postgres"]["ok"] and body["checks"]["redis"]["ok"]
        scrape = SimpleNamespace(runtime=dataclasses.replace(runtime, redis=dead_redis))
        status, text = await probes.metrics_of(scrape)
        assert status == 503 and text.startswith(b"metrics unavailable: ")
    finally:
        await dead_redis.aclose()
        await dead_pool.close()


async def test_a_heartbeat_expires_and_a_stopping_worker_withdraws_at_once(
    redis: RedisClient, test_settings: Settings
):
    prefix = test_settings.stream_prefix
    brief = dataclasses.replace(a_worker(test_settings, "brief"), worker_heartbeat_ttl_s=0.2)
    await health.beat(redis, brief, "smollm2", "cpu")
    assert [w["consumer"] for w in await health.alive_workers(redis, prefix)] == ["brief"]
    await asyncio.sleep(0.3)
    assert await health.alive_workers(redis, prefix) == []
    assert await redis.smembers(health.workers_key(prefix)) == set(), "expired ones are dropped"

    beating = asyncio.create_task(
        health.heartbeat(redis, a_worker(test_settings, "steady"), "smollm2", "cpu")
    )

    async def alive() -> list[str]:
        return [w["consumer"] for w in await health.alive_workers(redis, prefix)]

    async def steady_alive() -> bool:
        return await alive() == ["steady"]

    await eventually(steady_alive)
    beating.cancel()
    with pytest.raises(asyncio.CancelledError):
        await beating
    assert await alive() == []


async def test_dead_letters_are_reported_without_failing_readiness_and_metrics_count_them(
    intake, redis: RedisClient, pool: asyncpg.Pool, test_settings: Settings
):
    http, _ = intake
    await health.beat(redis, a_worker(test_settings), "smollm2", "cpu")
    jobs = Streams(test_settings.stream_prefix).jobs("eu-west")
    await redis.xadd(Streams.dead_letters(jobs), {"stream": jobs, "reason": "test", "data": "x"})
    key = await new_key(pool)
    accepted = await http.post(
        "/v1/jobs", json={"prompt": "Hi", "max_tokens": 4}, headers=auth(key)
    )
    assert accepted.status_code == 202

    ready = await http.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["dead_letters"][jobs] == 1

    scraped = await http.get("/metrics")
    assert scraped.status_code == 200
    assert scraped.headers["content-type"].startswith("text/plain; version=0.0.4")
    text = scraped.text
    assert samples(text, "tokenmill_dead_letters")[(("stream", jobs),)] == 1
    assert samples(text, "tokenmill_stream_length")[(("stream", jobs),)] >= 0
    assert (("group", "worker"), ("stream", jobs)) in samples(text, "tokenmill_stream_pending")
    workers = samples(text, "tokenmill_workers_alive")
    assert workers[(("device", "cpu"), ("model", "smollm2"), ("region", "eu-west"))] == 1
    requests = samples(text, "tokenmill_requests")
    assert requests[(("status", "queued"),)] + requests[(("status", "running"),)] >= 1
    responses = samples(text, "tokenmill_intake_responses_total")
    assert responses[(("method", "POST"), ("route", "/v1/jobs"), ("status", "202"))] == 1
    assert not any(dict(labels)["route"] == "/readyz" for labels in responses), "probes uncounted"


async def test_a_draining_intake_refuses_new_requests_with_retry_after_but_answers_probes(
    intake, pool: asyncpg.Pool, test_settings: Settings
):
    http, app = intake
    key = await new_key(pool)
    app.state.drain.begin()
    job = await http.post("/v1/jobs", json={"prompt": "Hi", "max_tokens": 4}, headers=auth(key))
    assert job.status_code == 503
    assert job.headers["retry-after"] == str(test_settings.drain_retry_after_s)
    assert job.headers["content-type"] == "application/problem+json"
    assert job.json()["status"] == 503
    chat = await http.post(
        "/v1/chat/completions",
        json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4},
        headers=auth(key),
    )
    assert chat.status_code == 503 and chat.json()["error"]["code"] == "shutting_down"
    queued = await pool.fetchval(
        "SELECT count(*) FROM intake.requests JOIN intake.api_keys USING (customer_id) "
        "WHERE key_sha256 = $1",
        digest(key),
    )
    assert queued == 0, "a refused request changes nothing"
    assert (await http.get("/healthz")).status_code == 200
    readiness = await http.get("/readyz")
    assert readiness.status_code == 503 and not readiness.json()["checks"]["draining"]["ok"]
    refusals = samples((await http.get("/metrics")).text, "tokenmill_intake_responses_total")
    assert refusals[(("method", "POST"), ("route", "unrouted"), ("status", "503"))] == 2


async def test_a_request_still_waiting_when_the_drain_ends_gets_a_504_not_a_dropped_line(
    intake, pool: asyncpg.Pool
):
    http, app = intake
    key = await new_key(pool)
    chat = asyncio.create_task(
        http.post(
            "/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4},
            headers=auth(key),
        )
    )
    drain = app.state.drain

    async def waiting() -> bool:
        return drain.in_flight == 1

    await eventually(waiting)
    drain.begin()
    drain.expire()
    answer = await chat
    assert answer.status_code == 504
    assert answer.headers["x-should-retry"] == "false"
    assert answer.json()["error"]["code"] == "shutting_down"
    assert drain.in_flight == 0
