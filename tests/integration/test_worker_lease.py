"""The worker's lease on a job's stream entry, on real Redis with the real model: it renews
only while it owns the entry, stops a job whose entry another worker took, and on stop
finishes its job within the graceful timeout or leaves it pending unpublished."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from faststream.redis import RedisBroker
from redis.asyncio import Redis as RedisClient

from tests.integration.helpers import eventually
from tokenmill import service
from tokenmill.events import Event, JobSubmitted, parse_event
from tokenmill.settings import Settings
from tokenmill.signing import SigningKeys
from tokenmill.streams import Delivery, Streams, publish_event
from tokenmill.worker import main as worker_main
from tokenmill.worker.engine import BatchEngine, EngineConfig
from tokenmill.worker.model import ModelRunner

# Greedy decoding keeps counting long past what any test waits for.
LONG_PROMPT = "Count from 1 to 1000, separated by commas: 1, 2, 3,"


async def test_renew_only_while_owner(test_settings: Settings, redis: RedisClient):
    stream = Streams(test_settings.stream_prefix).jobs("eu-west")
    entry_id = (await redis.xadd(stream, {"__data__": "{}"})).decode()
    await redis.xreadgroup("worker", "consumer-a", {stream: ">"}, count=1)
    a = Delivery(stream, "worker", "consumer-a", entry_id, redis)
    assert await a.keep_alive() is True

    await redis.xclaim(stream, "worker", "consumer-b", 0, [entry_id], justid=True)
    assert await a.keep_alive() is False
    (pending,) = await redis.xpending_range(stream, "worker", min=entry_id, max=entry_id, count=1)
    assert pending["consumer"] == b"consumer-b"

    await redis.xack(stream, "worker", entry_id)
    assert await a.keep_alive() is False
    assert (await redis.xpending(stream, "worker"))["pending"] == 0


async def test_a_lease_that_cannot_be_renewed_for_a_claim_timeout_is_lost():
    # A Redis nobody listens on: every renewal fails to connect.
    unreachable = RedisClient.from_url("redis://127.0.0.1:1", socket_connect_timeout=0.1)
    delivery = Delivery("tm.jobs", "worker", "consumer-a", "1-0", unreachable)
    running_job = asyncio.get_running_loop().create_future()
    try:
        owner = await worker_main.keep_alive_while(running_job, delivery, 0.05, lease_s=0.3)
    finally:
        await unreachable.aclose()
    assert owner is False and not running_job.done()


@pytest.fixture(scope="module")
def runner() -> ModelRunner:
    cache = Path.home() / ".cache" / "tokenmill" / "models"
    return ModelRunner.load("smollm2", Path(str(cache)))


@pytest.fixture
def engines(runner: ModelRunner, monkeypatch) -> list[BatchEngine]:
    """Every engine the workers of a test build, with a smaller KV cache."""
    built: list[BatchEngine] = []

    def build(runner: ModelRunner, config: EngineConfig) -> BatchEngine:
        built.append(BatchEngine(runner, dataclasses.replace(config, kv_cache_bytes=128 << 20)))
        return built[-1]

    monkeypatch.setattr(worker_main, "BatchEngine", build)
    return built


@pytest.fixture
async def jobs(test_settings: Settings, runner: ModelRunner, engines, monkeypatch) -> AsyncIterator:
    # The loaded model is shared by every worker these tests start; loading is not under test.
    monkeypatch.setattr(worker_main.ModelRunner, "load", lambda *_args: runner)
    broker = RedisBroker(test_settings.redis_url)
    await broker.connect()
    streams = Streams(test_settings.stream_prefix)
    keys = SigningKeys.parse(test_settings.signing_keys)

    async def submit(prompt: str, max_tokens: int) -> JobSubmitted:
        job = JobSubmitted(
            producer="test",
            customer_id="cus_1",
            request_id=f"job_{prompt[:5]}_{max_tokens}",
            region="eu-west",
            tier="standard",
            model="smollm2",
            prompt=prompt,
            max_tokens=max_tokens,
        )
        await publish_event(broker, streams.jobs("eu-west"), job, keys)
        return job

    yield submit
    await broker.stop()


async def events_on(redis: RedisClient, stream: str, request_id: str) -> list[Event]:
    events = []
    for _, fields in await redis.xrange(stream):
        data = fields[b"__data__"]
        event = parse_event(data[data.index(b"{") :])
        if event.request_id == request_id:
            events.append(event)
    return events


async def owner_of(redis: RedisClient, stream: str) -> list[bytes]:
    pending = await redis.xpending_range(stream, "worker", min="-", max="+", count=10)
    return [p["consumer"] for p in pending]


async def test_a_worker_that_lost_its_lease_stops_the_job_and_publishes_nothing(
    test_settings: Settings, redis: RedisClient, jobs, engines
):
    streams = Streams(test_settings.stream_prefix)
    jobs_stream = streams.jobs("eu-west")
    async with service.running("worker", test_settings, worker_main.wire, needs_db=False):
        long = await jobs(LONG_PROMPT, 2000)
        await eventually(lambda: _has(redis, streams.progress, long.request_id))
        (entry,) = await redis.xpending_range(jobs_stream, "worker", "-", "+", 1)
        # Another worker's claimer takes the entry, as it would from a worker that looked dead,
        # and that worker stays alive: it renews its lease, so our claimer leaves it alone.
        other = asyncio.create_task(_hold(redis, jobs_stream, entry["message_id"]))
        try:
            # The worker notices within a renewal interval and cancels the long job's request
            # (its 2000 tokens would take minutes); a short job beside it still completes.
            short = await jobs("Hi", 3)
            await eventually(lambda: _has(redis, streams.completions, short.request_id), 60)
            await eventually(lambda: _engine_idle(engines), 30)
        finally:
            other.cancel()
    assert await events_on(redis, streams.completions, long.request_id) == []
    assert await owner_of(redis, jobs_stream) == [b"other-worker"]


async def test_on_stop_a_job_past_the_graceful_timeout_is_left_pending_unpublished(
    test_settings: Settings, redis: RedisClient, jobs
):
    streams = Streams(test_settings.stream_prefix)
    impatient = dataclasses.replace(test_settings, graceful_timeout_s=0.5)
    async with service.running("worker", impatient, worker_main.wire, needs_db=False):
        long = await jobs(LONG_PROMPT, 2000)
        await eventually(lambda: _has(redis, streams.progress, long.request_id))
    assert await events_on(redis, streams.completions, long.request_id) == []
    assert await owner_of(redis, streams.jobs("eu-west")) == [test_settings.consumer.encode()]


async def test_on_stop_the_jobs_in_hand_finish(test_settings: Settings, redis: RedisClient, jobs):
    # The batching worker runs both jobs at once; stopping lets both finish and publish.
    streams = Streams(test_settings.stream_prefix)
    async with service.running("worker", test_settings, worker_main.wire, needs_db=False):
        first = await jobs("Hello", 12)
        second = await jobs("Again", 12)
        for job in (first, second):
            await eventually(lambda job=job: _has(redis, streams.progress, job.request_id))
    for job in (first, second):
        (completed,) = await events_on(redis, streams.completions, job.request_id)
        assert completed.type == "job.completed"
    assert await owner_of(redis, streams.jobs("eu-west")) == []


async def _hold(redis: RedisClient, stream: str, entry_id: bytes) -> None:
    """Own the entry as a live "other-worker" would: claim it, then renew it every 0.2 s."""
    while True:
        await redis.xclaim(stream, "worker", "other-worker", 0, [entry_id], justid=True)
        await asyncio.sleep(0.2)


async def _engine_idle(engines: list[BatchEngine]) -> bool:
    return all(not engine.has_work for engine in engines)


async def _has(redis: RedisClient, stream: str, request_id: str) -> bool:
    return bool(await events_on(redis, stream, request_id))


async def test_two_workers_share_a_stream_and_a_stopped_ones_jobs_complete_once(
    test_settings: Settings, redis: RedisClient, jobs
):
    streams = Streams(test_settings.stream_prefix)
    first = dataclasses.replace(test_settings, consumer="worker-a", graceful_timeout_s=0.1)
    second = dataclasses.replace(test_settings, consumer="worker-b")
    async with contextlib.AsyncExitStack() as stack:
        await stack.enter_async_context(
            service.running("worker", first, worker_main.wire, needs_db=False)
        )
        submitted = [await jobs(f"{n} is a number. Tell me about it", 12) for n in range(4)]
        for job in submitted:
            await eventually(lambda job=job: _has(redis, streams.progress, job.request_id))
        async with service.running("worker", second, worker_main.wire, needs_db=False):
            # The first worker stops mid-batch and gives up its jobs unpublished; the second
            # claims them once they are idle for claim_idle_ms and runs each to completion.
            await stack.aclose()
            for job in submitted:
                await eventually(
                    lambda job=job: _has(redis, streams.completions, job.request_id), 120
                )
    for job in submitted:
        (completed,) = await events_on(redis, streams.completions, job.request_id)
        assert completed.type == "job.completed"
    assert await owner_of(redis, streams.jobs("eu-west")) == []
