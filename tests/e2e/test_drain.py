"""A real intake process drains on SIGTERM: a chat client already waiting gets its answer, a
new request gets 503 with Retry-After, and then the process exits."""

from __future__ import annotations

import asyncio
import dataclasses
import signal
import time
from collections.abc import Iterator

import asyncpg
import httpx
import pytest
from faststream.redis import RedisBroker
from redis.asyncio import Redis as RedisClient

from tests.e2e.factory import Factory, free_port
from tests.integration.helpers import eventually
from tests.integration.test_books import complete, take_job
from tests.integration.test_intake_api import auth, new_key
from tokenmill.intake.keys import digest
from tokenmill.settings import Settings
from tokenmill.signing import SigningKeys
from tokenmill.streams import Streams, publish_event

EXIT_S_MAX = 15.0


@pytest.fixture
def intake(test_settings: Settings, tmp_path) -> Iterator[Factory]:
    settings = dataclasses.replace(test_settings, http_port=free_port(), drain_retry_after_s=3)
    running = Factory(settings, tmp_path)
    running.start("intake")
    try:
        running.wait_ready()
        yield running
    finally:
        running.stop()


async def test_sigterm_answers_the_waiting_chat_refuses_new_requests_then_exits(
    intake: Factory, pool: asyncpg.Pool, redis: RedisClient
):
    settings = intake.settings
    streams = Streams(settings.stream_prefix)
    key = await new_key(pool)
    async with httpx.AsyncClient(base_url=intake.base_url, timeout=30) as http:
        waiting = asyncio.create_task(
            http.post(
                "/v1/chat/completions",
                json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8},
                headers=auth(key),
            )
        )
        job = await take_job(redis, streams.jobs(settings.region))
        process = intake.processes["intake"]
        process.send_signal(signal.SIGTERM)

        async def refusing() -> bool:
            response = await http.post(
                "/v1/jobs", json={"prompt": "Hi", "max_tokens": 4}, headers=auth(key)
            )
            return response.status_code == 503

        await eventually(refusing, timeout_s=5)
        refused = await http.post(
            "/v1/jobs", json={"prompt": "Hi", "max_tokens": 4}, headers=auth(key)
        )
        assert refused.headers["retry-after"] == "3"
        assert refused.json()["detail"] == "this intake is shutting down; send the request again"
        assert not waiting.done() and process.poll() is None, "the waiting client holds it open"

        broker = RedisBroker(settings.redis_url)
        await broker.connect()
        try:
            keys = SigningKeys.parse(settings.signing_keys)
            await publish_event(broker, streams.completions, complete(job, "Hello!", 2), keys)
        finally:
            await broker.stop()
        answer = await waiting
        assert answer.status_code == 200, answer.text
        assert answer.json()["choices"][0]["message"]["content"] == "Hello!"

    answered_s = time.monotonic()
    await asyncio.to_thread(process.wait, EXIT_S_MAX)
    assert time.monotonic() - answered_s < EXIT_S_MAX
    assert process.returncode in (0, -signal.SIGTERM)
    queued = await pool.fetchval(
        "SELECT count(*) FROM intake.requests JOIN intake.api_keys USING (customer_id) "
        "WHERE key_sha256 = $1 AND api = 'jobs'",
        digest(key),
    )
    assert queued == 0, "a refused request changes nothing"
