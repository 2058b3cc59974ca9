"""The intake's bound on request bodies, enforced before any route parses one."""

from __future__ import annotations

from collections.abc import Callable

from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send


class BodySizeLimit:
    """ASGI middleware that refuses a request body over `size_bytes_max` with `too_large`.

    A declared Content-Length over the limit is refused before anything is read. Otherwise the
    body is read here, counting what actually arrives, so a chunked body or one that lies
    about its length is stopped at the limit too; the route then reads the buffered body.
    Buffering costs nothing extra: every route that takes a body parses all of it anyway.
    """

    def __init__(
        self, app: ASGIApp, size_bytes_max: int, too_large: Callable[[Scope], Response]
    ) -> None:
        self.app = app
        self.size_bytes_max = size_bytes_max
        self.too_large = too_large

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if _declared_length(scope) > self.size_bytes_max:
            await self.too_large(scope)(scope, receive, send)
            return
        body = await self._read(receive)
        if body is None:
            await self.too_large(scope)(scope, receive, send)
            return
        await self.app(scope, _replay(body, receive), send)

    async def _read(self, receive: Receive) -> bytes | None:
        """The whole body, or None as soon as it grows past the limit."""
        chunks: list[bytes] = []
        size_bytes = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                # The client went away; the route will see an empty body and the disconnect.
                return b"".join(chunks)
            chunk = message.get("body", b"")
            size_bytes += len(chunk)
            if size_bytes > self.size_bytes_max:
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)


def _declared_length(scope: Scope) -> int:
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                # The server refuses a malformed Content-Length before the app sees it; count
                # what arrives instead.
                return 0
    return 0


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive that gives the buffered body once, then waits on the client as before."""
    sent = False

    async def replayed() -> Message:
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replayed
