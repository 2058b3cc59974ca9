"""Cancel signals for the jobs this worker holds (see `tokenmill.tokenstream`).

Each job in hand has a stop event. The worker sets it when the cancel stream names the job,
and the engine then ends the request within one step. A job cancelled before any worker took
it is found by the cancelled key when the job is picked up: `Cancels.hold` registers the job
before that check, so a cancel lands either in the key the check reads or on the registered
event, never between the two.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator

from redis.asyncio import Redis as RedisClient
from redis.exceptions import RedisError

from tokenmill import tokenstream
from tokenmill.outage import OutageBackoff, stop_if_cancelled
from tokenmill.settings import Settings

log = logging.getLogger(__name__)

# How long one XREAD on the cancel stream blocks; bounds how late a stopping worker notices.
BLOCK_MS = 1000


class Cancels:
    def __init__(self, redis: RedisClient, settings: Settings) -> None:
        self.redis = redis
        self.settings = settings
        self._stops: dict[str, asyncio.Event] = {}

    @contextlib.contextmanager
    def hold(self, request_id: str) -> Iterator[asyncio.Event]:
        """The job's stop event while the block runs."""
        stop = self._stops.setdefault(request_id, asyncio.Event())
        try:
            yield stop
        finally:
            self._stops.pop(request_id, None)

    async def requested(self, request_id: str) -> bool:
        """Was the job cancelled before this worker took it? Call inside `hold`."""
        return await tokenstream.cancel_requested(self.redis, self.settings, request_id)

    def stop(self, request_id: str) -> None:
        stop = self._stops.get(request_id)
        if stop is not None:
            stop.set()

    async def follow(self) -> None:
        """Read the cancel stream from now on, until cancelled; stop each job it names."""
        key = tokenstream.cancels_key(self.settings.stream_prefix)
        backoff = OutageBackoff.configured("cancel signals", self.settings)
        # "$" only for the first read: after a reconnect, the read resumes past the last entry
        # seen, so no signal sent meanwhile is missed (within the stream's cap).
        last_id: bytes | str = "$"
        while True:
            try:
                found = await self.redis.xread({key: last_id}, count=100, block=BLOCK_MS)
                backoff.answered()
            except RedisError as exc:
                stop_if_cancelled()
                await backoff.failed(exc)
                continue
            for _, entries in found:
                for entry_id, fields in entries:
                    last_id = entry_id
                    request_id = fields.get(b"cancel")
                    if request_id is not None:
                        self.stop(request_id.decode())
