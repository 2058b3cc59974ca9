"""A consumer whose Redis dies: a bounded number of log lines while it is down, and delivery
resumes by itself when it is back on the same port."""

from __future__ import annotations

import asyncio
import logging
import subprocess
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from redis.asyncio import Redis as RedisClient

from tests.e2e.factory import free_port
from tests.integration.helpers import eventually, publish_signed, started
from tests.integration.test_streams import consumer_of
from tokenmill import service
from tokenmill.events import Event
from tokenmill.settings import Settings
from tokenmill.streams import Delivery, Streams

# Longer than FastStream's fixed 5 s retry, so every subscriber fails at least twice.
OUTAGE_S = 11.0


class PrivateRedis:
    """A redis-server of this test's own, on a fixed port, that it can kill and start again."""

    def __init__(self, directory: Path):
        self.port = free_port()
        self.directory = directory
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def launch(self) -> None:
        # An append-only file synced on every write, like the embedded Redis (which syncs every
        # second): it comes back with its streams and consumer groups.
        command = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1"]
        command += ["--dir", str(self.directory), "--save", "", "--appendonly", "yes"]
        command += ["--appendfsync", "always"]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL)

    async def start(self) -> None:
        self.launch()
        client = RedisClient.from_url(self.url)
        try:
            await eventually(lambda: _answers(client))
        finally:
            await client.aclose()

    def kill(self) -> None:
        assert self.process is not None
        self.process.kill()
        self.process.wait(timeout=10)


async def _answers(client: RedisClient) -> bool:
    try:
        return bool(await client.ping())
    except Exception:
        return False


@pytest.fixture
async def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    redis = PrivateRedis(tmp_path)
    await redis.start()
    yield redis
    redis.kill()


async def test_a_consumer_logs_an_outage_of_redis_twice_and_resumes_on_its_own(
    test_settings: Settings, private_redis: PrivateRedis, caplog: pytest.LogCaptureFixture
):
    settings = replace(test_settings, redis_url=private_redis.url)
    stream = Streams(settings.stream_prefix).progress
    handled: list[str] = []

    async def record(event: Event, delivery: Delivery) -> None:
        handled.append(event.request_id)

    async with service.running("t", settings, consumer_of(stream, record), needs_db=False):
        await publish_signed(settings, stream, started("job_before"))
        await eventually(lambda: _handled(handled, "job_before"))
        with caplog.at_level(logging.INFO):
            caplog.clear()
            private_redis.kill()
            await asyncio.sleep(OUTAGE_S)
            await private_redis.start()
            await publish_signed(settings, stream, started("job_after"))
            await eventually(lambda: _handled(handled, "job_after"), timeout_s=30)
            records = list(caplog.records)
    lines = [f"{r.name}: {r.getMessage()}" for r in records if r.levelno >= logging.WARNING]
    assert not [r for r in records if r.exc_info], "no traceback while Redis is down"
    assert len([line for line in lines if "t: redis: storage unreachable" in line]) == 1, lines
    assert len(lines) <= 2, lines
    assert any("t: redis: storage reachable again" in r.getMessage() for r in records)
    assert handled == ["job_before", "job_after"]


async def _handled(handled: list[str], request_id: str) -> bool:
    return request_id in handled
