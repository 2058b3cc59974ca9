"""Small helpers shared by the integration and end-to-end tests."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

WAIT_S_MAX = 20.0


async def eventually(check: Callable[[], Awaitable[bool]], timeout_s: float = WAIT_S_MAX) -> None:
    """Poll `check` until it holds; fail the test if it does not within `timeout_s`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not await check():
        assert loop.time() < deadline, f"condition not met within {timeout_s}s"
        await asyncio.sleep(0.05)
