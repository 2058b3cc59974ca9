"""A relay told to stop as a NOTIFY wakes it must stop: on Python 3.11, asyncio.wait_for
swallows a cancellation that arrives together with the wake-up, and the relay outlived its
service, logging "pool is closed" into every later test."""

from __future__ import annotations

import asyncio

import pytest

from tokenmill.outbox import OutboxRelay
from tokenmill.settings import Settings


async def _nothing(rows):
    return []


async def test_a_relay_woken_and_cancelled_at_once_stops():
    relay = OutboxRelay(None, "intake", _nothing, Settings.from_env({}))  # type: ignore[arg-type]
    waiting = asyncio.create_task(relay._wait())
    await asyncio.sleep(0)  # Now waiting for a NOTIFY.
    relay._on_notify()
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
