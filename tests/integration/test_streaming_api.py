"""Streaming and cancelling through the intake in process (real Postgres and Redis, no worker:
completions are published as a worker would): refusals, the cancel route's answers and
signals, answers replayed from the record, cached tokens in OpenAI's usage, and the worker's
deltas written one round trip per engine step, and the workers' cancel signals."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import threading
from collections.abc import AsyncIterator

import asyncpg
import httpx
import pytest
from redis.asyncio import Redis as RedisClient

from tests.integration.helpers import eventually, publish_signed
from tests.integration.test_intake_api import auth, new_key
from tests.unit.test_events import completed
from tokenmill import tokenstream
from tokenmill.events import JobFailed, JobSubmitted
from tokenmill.intake.api import create_app
from tokenmill.intake.main import wire
from tokenmill.settings import Settings
from tokenmill.streams import Streams
from tokenmill.worker.cancels import Cancels
from tokenmill.worker.deltas import DeltaPublisher
from tokenmill.worker.engine import StepOutput

HI = [{"role": "user", "content": "hi"}]


@pytest.fixture
async def client(test_settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    # No worker runs: a stream that hears nothing gives up quickly.
    app = create_app(dataclasses.replace(test_settings, chat_wait_s=0.5), wire)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://intake") as http:
            yield http


def events_of(response: httpx.Response) -> list:
    lines = [line.removeprefix("data: ") for line in response.text.split("\n\n") if line]
    return [line if line == "[DONE]" else json.loads(line) for line in lines]


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/jobs", {"prompt": "hi", "max_tokens": 4, "stream": True}, "stream"),
        ("/v1/chat/completions", {"messages": HI, "stream_options": {}}, "stream_options"),
        (
            "/v1/completions",
            {"prompt": "hi", "stream": False, "stream_options": {"include_usage": True}},
            "stream_options",
        ),
        (
            "/v1/chat/completions",
            {"messages": HI, "stream": True, "stream_options": {"include_usage": 1}},
            "stream_options.include_usage",
        ),
    ],
)
async def test_bad_streaming_requests_are_refused_before_anything_is_written(
    client: httpx.AsyncClient, pool: asyncpg.Pool, path: str, body: dict, param: str
):
    key = await new_key(pool)
    before = await pool.fetchval("SELECT count(*) FROM intake.requests")
    response = await client.post(path, json=body, headers=auth(key))
    assert response.status_code == 400, response.text
    error = response.json().get("error") or response.json()
    assert error["param"] == param
    assert await pool.fetchval("SELECT count(*) FROM intake.requests") == before


async def test_cancel_answers_404_for_unknown_and_other_customers_jobs(
    client: httpx.AsyncClient, pool: asyncpg.Pool
):
    mine, theirs = await new_key(pool), await new_key(pool)
    job = await client.post("/v1/jobs", json={"prompt": "hi", "max_tokens": 4}, headers=auth(mine))
    job_id = job.json()["id"]
    for key, path in ((mine, "/v1/jobs/job_nope/cancel"), (theirs, f"/v1/jobs/{job_id}/cancel")):
        response = await client.post(path, headers=auth(key))
        assert response.status_code == 404 and "no job" in response.json()["detail"]
    assert (await client.post(f"/v1/jobs/{job_id}/cancel")).status_code == 401
    view = await client.get(f"/v1/jobs/{job_id}", headers=auth(mine))
    assert view.json()["status"] == "queued" and view.json()["cancel_requested_at"] is None


async def test_a_queued_job_is_cancelled_at_once_and_the_workers_are_told(
    client: httpx.AsyncClient, pool: asyncpg.Pool, redis: RedisClient, test_settings: Settings
):
    key = await new_key(pool)
    job = await client.post(
        "/v1/chat/completions",
        json={"messages": HI, "max_tokens": 4, "stream": True},
        headers={**auth(key), "Idempotency-Key": "cancel-me"},
    )
    (job_id,) = await pool.fetchval(
        "SELECT array_agg(request_id) FROM intake.requests WHERE idempotency_key = 'cancel-me'"
    )
    assert events_of(job)[-2]["error"]["code"] == "timeout"  # No worker ran it.

    first = await client.post(f"/v1/jobs/{job_id}/cancel", headers=auth(key))
    again = await client.post(f"/v1/jobs/{job_id}/cancel", headers=auth(key))
    assert first.status_code == again.status_code == 200
    assert first.json()["status"] == "cancelled" and first.json()["error"]
    assert again.json()["cancel_requested_at"] == first.json()["cancel_requested_at"]

    prefix = test_settings.stream_prefix
    assert await tokenstream.cancel_requested(redis, test_settings, job_id)
    signals = await redis.xrange(tokenstream.cancels_key(prefix))
    assert [f[b"cancel"].decode() for _, f in signals] == [job_id, job_id]
    # Each cancel signals again (one lost to a Redis failure is sent once more).
    ends = await redis.xrange(tokenstream.tokens_key(prefix, job_id))
    assert {tokenstream.decode(fields).finish_reason for _, fields in ends} == {"cancelled"}
    assert await redis.ttl(tokenstream.tokens_key(prefix, job_id)) > 0

    # A replay of the streamed request is answered from the record: it ended cancelled.
    replay = await client.post(
        "/v1/chat/completions",
        json={"messages": HI, "max_tokens": 4, "stream": True},
        headers={**auth(key), "Idempotency-Key": "cancel-me"},
    )
    events = events_of(replay)
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    assert events[-2]["choices"][0]["finish_reason"] == "cancelled" and events[-1] == "[DONE]"


async def test_openai_usage_carries_cached_tokens_and_a_finished_job_replays_as_a_stream(
    client: httpx.AsyncClient, pool: asyncpg.Pool, test_settings: Settings
):
    key = await new_key(pool)
    body = {"messages": HI, "max_tokens": 4}
    headers = {**auth(key), "Idempotency-Key": "cached"}
    waiting = asyncio.create_task(client.post("/v1/chat/completions", json=body, headers=headers))

    async def accepted() -> bool:
        return bool(
            await pool.fetchval(
                "SELECT count(*) FROM intake.requests WHERE idempotency_key = 'cached'"
            )
        )

    await eventually(accepted)
    row = await pool.fetchrow("SELECT * FROM intake.requests WHERE idempotency_key = 'cached'")
    done = completed(
        request_id=row["request_id"],
        customer_id=row["customer_id"],
        text="Hello there",
        prompt_tokens=9,
        completion_tokens=3,
        cached_prompt_tokens=8,
    )
    await publish_signed(test_settings, Streams(test_settings.stream_prefix).completions, done)
    answer = (await waiting).json()
    assert answer["usage"]["prompt_tokens_details"] == {"cached_tokens": 8}
    assert answer["choices"][0]["message"]["content"] == "Hello there"

    streamed = {**body, "stream": True, "stream_options": {"include_usage": True}}
    replay = await client.post("/v1/chat/completions", json=streamed, headers=headers)
    assert replay.headers["content-type"].startswith("text/event-stream")
    events = events_of(replay)
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-2]) == (
        "Hello there"
    )
    assert events[-3]["choices"][0]["finish_reason"] == "stop"
    assert events[-2]["choices"] == [] and events[-2]["usage"]["total_tokens"] == 12
    assert events[-2]["usage"]["prompt_tokens_details"]["cached_tokens"] == 8


def job(request_id: str, stop: tuple[str, ...] = ()) -> JobSubmitted:
    return JobSubmitted(
        producer="test",
        customer_id="cus_1",
        request_id=request_id,
        region="eu-west",
        tier="standard",
        model="m",
        prompt="p",
        max_tokens=8,
        stop=stop,
    )


async def test_a_workers_deltas_go_out_in_one_round_trip_per_step(
    redis: RedisClient, test_settings: Settings
):
    deltas = DeltaPublisher(redis, test_settings)
    round_trips = []
    pipeline = redis.pipeline

    def counted(*args, **kwargs):
        round_trips.append(1)
        return pipeline(*args, **kwargs)

    redis.pipeline = counted
    ids = [f"job_d{i}" for i in range(3)]
    for request_id in ids:
        deltas.open(job(request_id, stop=("END",) if request_id == "job_d2" else ()))
    writer = asyncio.create_task(deltas.run())
    try:
        step = [StepOutput(rid, 1, (7,), "Hello E", None) for rid in ids]
        # From the engine's thread, as the worker's engine calls it.
        threading.Thread(target=deltas.on_step, args=(step,)).start()
        await eventually(lambda: _entries(redis, test_settings, ids[0], 1))
        assert len(round_trips) == 1
        deltas.finish(ids[0], completed(request_id=ids[0], text="Hello Ex", completion_tokens=2))
        deltas.finish(
            ids[1], JobFailed(**job(ids[1]).envelope_for("worker"), worker="w", reason="x")
        )
        deltas.finish(ids[2], completed(request_id=ids[2], text="Hello "))
        await eventually(lambda: _entries(redis, test_settings, ids[2], 2))
    finally:
        writer.cancel()
        redis.pipeline = pipeline
    assert len(round_trips) == 2
    assert await tokenstream.partial_text(redis, test_settings, ids[0]) == "Hello Ex"
    assert await tokenstream.partial_text(redis, test_settings, ids[1]) == "Hello E"
    # "E" may begin the stop string "END": held back, and never sent once the answer ended
    # before it.
    assert await tokenstream.partial_text(redis, test_settings, ids[2]) == "Hello "
    prefix = test_settings.stream_prefix
    (_, failed_end) = (await redis.xrange(tokenstream.tokens_key(prefix, ids[1])))[-1]
    assert tokenstream.decode(failed_end).error == "x"


async def _entries(redis: RedisClient, settings: Settings, request_id: str, count: int) -> bool:
    key = tokenstream.tokens_key(settings.stream_prefix, request_id)
    return await redis.xlen(key) >= count


async def test_a_worker_hears_a_cancel_for_a_job_it_holds_whenever_it_was_sent(
    redis: RedisClient, test_settings: Settings
):
    cancels = Cancels(redis, test_settings)
    following = asyncio.create_task(cancels.follow())
    try:
        # Sent before the worker took the job: the key says so on pickup.
        await tokenstream.request_cancel(redis, test_settings, "job_early")
        with cancels.hold("job_early") as stop:
            assert await cancels.requested("job_early") and not stop.is_set()
        # Sent while it runs: the cancel stream sets its stop event; other jobs are untouched.
        with cancels.hold("job_late") as stop, cancels.hold("job_other") as other:
            assert not await cancels.requested("job_late")
            await asyncio.sleep(0.2)  # The follower reads from the stream's end.
            await tokenstream.request_cancel(redis, test_settings, "job_late")
            await asyncio.wait_for(stop.wait(), 5)
            assert not other.is_set()
    finally:
        following.cancel()
