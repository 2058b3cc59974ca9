"""Small helpers shared by the integration and end-to-end tests."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from faststream.redis import RedisBroker

from tokenmill.events import Event, JobStarted
from tokenmill.settings import Settings
from tokenmill.signing import SigningKeys
from tokenmill.streams import publish

WAIT_S_MAX = 20.0


async def eventually(check: Callable[[], Awaitable[bool]], timeout_s: float = WAIT_S_MAX) -> None:
    """Poll `check` until it holds; fail the test if it does not within `timeout_s`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not await check():
        assert loop.time() < deadline, f"condition not met within {timeout_s}s"
        await asyncio.sleep(0.05)


def started(request_id: str) -> JobStarted:
    """A small valid event to push through streams and outboxes."""
    return JobStarted(
        producer="test",
        customer_id="cus_1",
        request_id=request_id,
        region="eu-west",
        worker="w",
        queue_ms=0.0,
    )


async def publish_body(
    settings: Settings, stream: str, body: str, keys: SigningKeys | None = None
) -> None:
    """Publish `body` as a producer would, signed with `keys` (the run's own by default)."""
    broker = RedisBroker(settings.redis_url)
    await broker.connect()
    try:
        await publish(broker, stream, body, {}, keys or SigningKeys.parse(settings.signing_keys))
    finally:
        await broker.stop()


async def publish_signed(settings: Settings, stream: str, event: Event) -> None:
    await publish_body(settings, stream, event.canonical_json())
