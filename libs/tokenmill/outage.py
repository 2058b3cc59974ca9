"""Telling an outage of our own storage from a bad message, and waiting one out quietly.

A handler that fails because Postgres or Redis cannot be reached says nothing about the entry
it was given: every entry fails the same way until the storage is back. Such a failure must not
count towards dead-lettering the entry, must not be retried in a hot loop, and must not log a
traceback per entry (a long outage would fill the disk with identical lines).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

import asyncpg
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from tokenmill.settings import Settings

log = logging.getLogger(__name__)

# Connection-level failures of our storage. Query errors (a constraint, a syntax error, a
# statement timeout) are not here: the same entry would fail the same way with the storage
# up, so they count and eventually dead-letter.
_OUTAGE_ERRORS: tuple[type[BaseException], ...] = (
    ConnectionError,  # refused, reset, aborted, broken pipe
    TimeoutError,  # a connect, pool acquire or socket read that got no answer
    asyncpg.PostgresConnectionError,  # 08xxx: the connection failed or was dropped
    asyncpg.CannotConnectNowError,  # 57P03: starting up or shutting down
    asyncpg.AdminShutdownError,  # 57P01
    asyncpg.CrashShutdownError,  # 57P02
    asyncpg.TooManyConnectionsError,  # 53300
    RedisConnectionError,  # includes BusyLoadingError: Redis is loading its AOF
    RedisTimeoutError,
)
# Errors of the filesystem are OSErrors too, but they are not the network to our storage.
_LOCAL_OS_ERRORS = (FileNotFoundError, FileExistsError, IsADirectoryError, PermissionError)
CAUSE_DEPTH_MAX = 8


def is_outage(exc: BaseException) -> bool:
    """Whether `exc`, or what caused it, says our storage could not be reached.

    A bare OSError counts: connecting to a name with several addresses (localhost) raises
    OSError("Multiple exceptions: ...") with no errno when every address refuses.
    """
    seen: BaseException | None = exc
    for _ in range(CAUSE_DEPTH_MAX):
        if seen is None:
            return False
        if isinstance(seen, _OUTAGE_ERRORS):
            return True
        if isinstance(seen, OSError) and not isinstance(seen, _LOCAL_OS_ERRORS):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


@dataclass
class OutageBackoff:
    """One consumer's pacing through an outage: a bounded exponential pause after each failed
    delivery, and a log line when the outage starts, at most one per `reminder_s` while it
    lasts, and one when the storage answers again."""

    consumer: str
    delay_s_min: float
    delay_s_max: float
    reminder_s: float
    started_s: float | None = None
    delay_s: float = 0.0
    held: int = 0
    logged_s: float = 0.0

    @classmethod
    def configured(cls, consumer: str, settings: Settings) -> OutageBackoff:
        """The deployment's pacing: outage_backoff_s_min to _max, a reminder every
        outage_log_interval_s."""
        return cls(
            consumer,
            settings.outage_backoff_s_min,
            settings.outage_backoff_s_max,
            settings.outage_log_interval_s,
        )

    async def failed(self, exc: BaseException) -> None:
        """Record an attempt lost to the outage, then pause before the consumer goes on."""
        now_s = time.monotonic()
        if self.started_s is None:
            self.started_s, self.logged_s, self.delay_s = now_s, now_s, self.delay_s_min
            log.warning(
                "%s: storage unreachable (%s: %s); retrying with a backoff of up to %.0fs,"
                " quietly until it answers",
                self.consumer,
                type(exc).__name__,
                exc,
                self.delay_s_max,
            )
        elif now_s - self.logged_s >= self.reminder_s:
            self.logged_s = now_s
            log.warning(
                "%s: storage still unreachable after %.0fs (%d attempts failed): %s",
                self.consumer,
                now_s - self.started_s,
                self.held,
                exc,
            )
        self.held += 1
        await asyncio.sleep(self.delay_s)
        self.delay_s = min(self.delay_s * 2, self.delay_s_max)

    def answered(self) -> None:
        """The storage answered (a handler succeeded, or failed on its own): the outage is over."""
        if self.started_s is None:
            return
        log.info(
            "%s: storage reachable again after %.0fs (%d attempts failed meanwhile)",
            self.consumer,
            time.monotonic() - self.started_s,
            self.held,
        )
        self.started_s, self.held = None, 0


def stop_if_cancelled() -> None:
    """Re-raise a cancellation that a client library turned into another error (redis-py
    raises a connection error when cancelled mid-command): a loop that caught it as an outage
    would never stop, and its service would never finish stopping."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError
