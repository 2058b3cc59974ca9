"""A request that fails because Postgres or Redis cannot be reached is answered 503, not 500.

While our storage restarts or is unreachable, every request fails the same way, whatever it
asked. The client should send it again shortly (the answer says when), and the log should
say that the storage is down once, and again at most once per interval while it lasts, not
print one traceback per request.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tokenmill.outage import is_outage

log = logging.getLogger(__name__)


class StorageOutage:
    """ASGI middleware: an exception that says our storage is unreachable (see
    `tokenmill.outage.is_outage`) is answered with `unavailable` and logged sparingly; any
    other exception goes on to the server as before."""

    def __init__(
        self, app: ASGIApp, unavailable: Callable[[Scope], Response], log_interval_s: float
    ) -> None:
        self.app = app
        self.unavailable = unavailable
        self.log_interval_s = log_interval_s
        self.logged_s: float | None = None
        self.answered = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def sending(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, sending)
        except Exception as exc:
            # Once an answer has begun it cannot be replaced; the server drops the connection.
            if started or not is_outage(exc):
                raise
            self._note(exc)
            await self.unavailable(scope)(scope, receive, send)

    def _note(self, exc: BaseException) -> None:
        self.answered += 1
        now_s = time.monotonic()
        if self.logged_s is not None and now_s - self.logged_s < self.log_interval_s:
            return
        self.logged_s = now_s
        log.warning(
            "storage unreachable (%s: %s); answering 503 (%d so far), quietly for %.0fs",
            type(exc).__name__,
            exc,
            self.answered,
            self.log_interval_s,
        )
