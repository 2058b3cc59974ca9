"""Draining: how an intake stops without dropping a client.

Once a drain begins (SIGTERM, see `main.DrainingServer`), a new request is answered 503 with
Retry-After and `Connection: close`, so the client retries, on another replica where there is
one; the probes still answer, `/readyz` with 503 so that Kubernetes takes the pod out of its
Service. A request already in flight, a chat completion waiting for its job included, runs
to its answer. One still running when the drain's time is up gets a 504 that says its job
goes on, never a dropped connection.

The middleware also counts this process' responses by route and status for `/metrics`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tokenmill.intake.errors import ApiError, error_response

# Answered during a drain as at any other time, and not counted among the responses.
PROBE_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
# The route label of a request no route answered (none matched, or the drain refused it): one
# label, whatever path was asked for, so the metric's size stays bounded.
UNROUTED = "unrouted"


class Drain:
    """One intake process' requests in flight, and whether it has begun to drain."""

    def __init__(self) -> None:
        self.started = False
        self.responses: Counter[tuple[str, str, int]] = Counter()
        # The timeout of each request in flight, which `expire` brings forward to now.
        self._in_flight: set[asyncio.Timeout] = set()

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    def begin(self) -> None:
        self.started = True

    @contextlib.asynccontextmanager
    async def tracking(self) -> AsyncIterator[asyncio.Timeout]:
        """Count the block as in flight; `expire` raises TimeoutError out of it."""
        async with asyncio.timeout(None) as limit:
            self._in_flight.add(limit)
            try:
                yield limit
            finally:
                self._in_flight.discard(limit)

    def expire(self) -> None:
        """End every request still in flight now: each answers 504."""
        now_s = asyncio.get_running_loop().time()
        for limit in list(self._in_flight):
            limit.reschedule(now_s)


class DrainMiddleware:
    def __init__(self, app: ASGIApp, drain: Drain, retry_after_s: int):
        self._app = app
        self._drain = drain
        self._retry_after_s = retry_after_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in PROBE_PATHS:
            await self._app(scope, receive, send)
            return
        if self._drain.started:
            refusal = ApiError(
                503,
                "shutting_down",
                "this intake is shutting down; send the request again",
                headers={"Retry-After": str(self._retry_after_s), "Connection": "close"},
            )
            await self._answer(scope, receive, send, refusal)
            self._count(scope, 503)
            return
        await self._serve(scope, receive, send)

    async def _serve(self, scope: Scope, receive: Receive, send: Send) -> None:
        status: int | None = None

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            async with self._drain.tracking() as limit:
                await self._app(scope, receive, sending)
        except TimeoutError:
            if not limit.expired() or status is not None:
                raise
            status = 504
            cut_short = ApiError(
                504,
                "shutting_down",
                "this intake stopped before the answer was ready; an accepted job still runs "
                "and is billed, so send it again only with the same Idempotency-Key",
                # The OpenAI SDK retries a 5xx without an idempotency key unless told not to.
                headers={"x-should-retry": "false", "Connection": "close"},
            )
            await self._answer(scope, receive, send, cut_short)
        finally:
            self._count(scope, status or 500)

    def _count(self, scope: Scope, status: int) -> None:
        route = getattr(scope.get("route"), "path", UNROUTED)
        self._drain.responses[(scope["method"], route, status)] += 1

    async def _answer(self, scope: Scope, receive: Receive, send: Send, error: ApiError) -> None:
        response = error_response(Request(scope), error)
        await response(scope, receive, send)


def install(app: Any, drain: Drain, retry_after_s: int) -> None:
    """Put the drain in front of `app`'s routes, and where its probes can see it."""
    app.state.drain = drain
    app.add_middleware(DrainMiddleware, drain=drain, retry_after_s=retry_after_s)
