"""The shared life cycle of a service process: connect, bootstrap, run, stop cleanly."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import asyncpg
from faststream.redis import RedisBroker
from redis.asyncio import Redis as RedisClient

from tokenmill import tracing
from tokenmill.db import create_pool
from tokenmill.outage import OutageBackoff, is_outage
from tokenmill.outbox import OutboxRelay
from tokenmill.reconciler import Reconciler
from tokenmill.settings import Settings
from tokenmill.signing import SigningKeys
from tokenmill.streams import Streams, create_groups, prune_consumers, publish

log = logging.getLogger(__name__)

# How often a service checks that Redis answers, and the most it waits between checks while
# Redis is down: it notices a restarted Redis within this, before the subscribers' own retry
# (every 5 s, fixed in FastStream) can find a Redis that came back empty without our groups.
REDIS_WATCH_INTERVAL_S = 1.0
# How long a stopping service waits for a cancelled loop before cancelling it again, and how
# many times: bounded, so a loop that never yields cannot keep its service from stopping.
LOOP_STOP_WAIT_S = 1.0
LOOP_CANCELS_MAX = 10


class _QuietOutages(logging.Filter):
    """Drops FastStream's "Message fetch error" records caused by Redis being unreachable.

    Each subscriber (two per stream a service reads) logs one with a traceback every 5 s for as
    long as Redis is down: about a megabyte a minute. The outage is reported once, when it
    starts and when it ends, by `watch_redis`; other fetch errors still get through.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and record.exc_info[1] and is_outage(record.exc_info[1]))


_QUIET_OUTAGES = _QuietOutages()


@dataclass
class Runtime:
    """What a service's wiring gets: its settings, its broker, its pool, the stream names."""

    name: str
    settings: Settings
    broker: RedisBroker
    redis: RedisClient
    pool: asyncpg.Pool | None
    streams: Streams
    signing_keys: SigningKeys

    @property
    def db(self) -> asyncpg.Pool:
        assert self.pool is not None, f"{self.name} was started without a database"
        return self.pool

    def outbox_relay(self, schema: str) -> Coroutine[Any, Any, None]:
        """The loops that publish `schema`'s committed outbox rows through this broker, and
        republish the ones whose stream entries Redis lost."""

        async def publish_rows(rows: list[tuple[str, str, dict[str, str]]]) -> list[str]:
            # One round trip for the whole batch, not one per event; returns the entry ids.
            async with self.redis.pipeline(transaction=False) as pipe:
                for stream, body, headers in rows:
                    await publish(
                        self.broker, stream, body, headers, self.signing_keys, pipeline=pipe
                    )
                entry_ids = await pipe.execute()
            return [entry_id.decode() for entry_id in entry_ids]

        relay = OutboxRelay(self.db, schema, publish_rows, self.settings)
        groups = self.streams.groups(self.settings.region)
        reconciler = Reconciler(self.db, self.redis, schema, publish_rows, self.settings, groups)
        return _all_of(relay.run(), reconciler.run())


async def _all_of(*loops: Coroutine[Any, Any, None]) -> None:
    # Cancelling this cancels every loop in it.
    await asyncio.gather(*loops)


# Wiring registers subscribers on the broker and returns the background loops to run.
Wiring = Callable[[Runtime], Awaitable[list[Coroutine[Any, Any, None]]]]


def configure_logging() -> None:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )


@contextlib.asynccontextmanager
async def running(
    name: str, settings: Settings, wire: Wiring, *, needs_db: bool = True
) -> AsyncIterator[Runtime]:
    """Start a service's broker, pool and background loops; stop them all on exit."""
    assert settings.redis_url, "redis_url must be resolved before a service starts"
    signing_keys = SigningKeys.parse(settings.signing_keys)
    tracing.setup(name)
    # Per-message "Received/Processed" lines at DEBUG: at INFO they drown every other log line.
    broker_log = logging.getLogger(f"tokenmill.{name}.broker")
    broker_log.addFilter(_QUIET_OUTAGES)  # Added once: a logger ignores the same filter twice.
    broker = RedisBroker(
        settings.redis_url,
        logger=broker_log,
        log_level=logging.DEBUG,
        graceful_timeout=settings.graceful_timeout_s,
    )
    redis = RedisClient.from_url(settings.redis_url)
    pool = await create_pool(settings) if needs_db else None
    runtime = Runtime(
        name, settings, broker, redis, pool, Streams(settings.stream_prefix), signing_keys
    )
    loops: list[asyncio.Task[None]] = []
    try:
        pairs = runtime.streams.groups(settings.region)
        await create_groups(redis, pairs)
        await prune_consumers(redis, pairs, settings.consumer_idle_prune_ms)
        background = await wire(runtime)
        await broker.start()
        background.append(watch_redis(runtime, pairs))
        loops = [asyncio.create_task(c, name=f"{name}-{c.__name__}") for c in background]
        log.info("%s started (consumer %s)", name, settings.consumer)
        yield runtime
    finally:
        await stop_loops(loops)
        await broker.stop()
        await redis.aclose()
        if pool is not None:
            await _close_pool(pool, settings.graceful_timeout_s)
        log.info("%s stopped", name)


async def stop_loops(loops: list[asyncio.Task[None]]) -> None:
    """Cancel `loops` and wait for them to end, cancelling again any that does not.

    A client library can swallow a cancellation (redis-py turns one that arrives mid-command
    into a connection error, which a loop then waits out as an outage); a second cancellation
    lands in that wait. Past LOOP_CANCELS_MAX the service stops without them, loudly.
    """
    pending = {task for task in loops if not task.done()}
    for _ in range(LOOP_CANCELS_MAX):
        if not pending:
            return
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=LOOP_STOP_WAIT_S)
        if pending:
            log.warning(
                "loops still running %.0fs after being cancelled: %s; cancelling again",
                LOOP_STOP_WAIT_S,
                ", ".join(sorted(task.get_name() for task in pending)),
            )
    if pending:
        log.error("stopping without loops that ignored %d cancellations", LOOP_CANCELS_MAX)


async def watch_redis(runtime: Runtime, pairs: list[tuple[str, str]]) -> None:
    """Log when Redis stops answering, at most once a reminder interval while it is down, and
    when it answers again; then recreate the consumer groups in case it came back empty.

    The subscribers reconnect by themselves (redis-py opens a new connection on their next
    read); this loop only makes the outage visible in a bounded number of lines.
    """
    settings = runtime.settings
    backoff = OutageBackoff(
        f"{runtime.name}: redis",
        settings.outage_backoff_s_min,
        REDIS_WATCH_INTERVAL_S,
        settings.outage_log_interval_s,
    )
    while True:
        try:
            await runtime.redis.ping()
            if backoff.started_s is not None:
                await create_groups(runtime.redis, pairs)
                backoff.answered()
        except Exception as exc:  # Whatever keeps Redis from answering a PING.
            await backoff.failed(exc)
            continue
        await asyncio.sleep(REDIS_WATCH_INTERVAL_S)


async def _close_pool(pool: asyncpg.Pool, timeout_s: float) -> None:
    """Close gracefully, but never wait forever on a connection something still holds."""
    try:
        await asyncio.wait_for(pool.close(), timeout_s)
    except TimeoutError:
        log.warning("database connections still busy after %.0fs; closing them", timeout_s)
        pool.terminate()


async def until_stopped() -> None:
    """Block until SIGTERM or SIGINT."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


async def serve(name: str, settings: Settings, wire: Wiring, *, needs_db: bool = True) -> None:
    async with running(name, settings, wire, needs_db=needs_db):
        await until_stopped()
