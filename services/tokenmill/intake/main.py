"""Intake service: the HTTP API, its outbox relay, and the consumers that follow each job."""

from __future__ import annotations

import logging
import time
from types import FrameType

import uvicorn

from tokenmill import service
from tokenmill.db import first_delivery
from tokenmill.events import Event, JobCompleted, JobFailed, JobStarted, UsageBooked
from tokenmill.intake import draining, jobs
from tokenmill.intake.api import create_app
from tokenmill.settings import Settings
from tokenmill.streams import Delivery, consume

log = logging.getLogger(__name__)

# Once the drain is over, how long uvicorn may still wait for a response being written.
SHUTDOWN_S_MAX = 5


async def wire(rt: service.Runtime):
    async def on_event(event: Event, delivery: Delivery) -> None:
        async with rt.db.acquire() as conn, conn.transaction():
            if not await first_delivery(conn, jobs.SCHEMA, event, delivery.stream):
                return
            if isinstance(event, JobStarted):
                await jobs.mark_started(conn, event)
            elif isinstance(event, JobCompleted):
                await jobs.mark_completed(conn, event)
            elif isinstance(event, JobFailed):
                await jobs.mark_failed(conn, event)
            elif isinstance(event, UsageBooked):
                await jobs.mark_booked(conn, event)

    for stream in (rt.streams.progress, rt.streams.completions, rt.streams.booked):
        consume(rt.broker, rt.settings, stream, "intake", on_event)
    return [rt.outbox_relay(jobs.SCHEMA)]


class DrainingServer(uvicorn.Server):
    """A uvicorn server that drains on its first SIGTERM or SIGINT instead of closing its
    sockets: it answers until no request is in flight or `timeout_s` has passed (then those
    left answer 504), and only then shuts down. A second signal shuts down at once."""

    def __init__(self, config: uvicorn.Config, drain: draining.Drain, timeout_s: float):
        super().__init__(config)
        self._drain = drain
        self._timeout_s = timeout_s
        self._deadline_s = float("inf")

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._drain.started:
            super().handle_exit(sig, frame)
            return
        # Kept, as uvicorn keeps it, to raise again once the server has stopped.
        self._captured_signals.append(sig)
        self._deadline_s = time.monotonic() + self._timeout_s
        self._drain.begin()

    async def on_tick(self, counter: int) -> bool:
        if self._drain.started:
            if self._drain.in_flight == 0:
                return True
            if time.monotonic() >= self._deadline_s:
                self._drain.expire()
            elif counter % 10 == 0:
                log.info("draining: %d request(s) in flight", self._drain.in_flight)
        return await super().on_tick(counter)


async def serve(settings: Settings) -> None:
    app = create_app(settings, wire)
    drain = draining.Drain()
    draining.install(app, drain, settings.drain_retry_after_s)
    config = uvicorn.Config(
        app,
        host=settings.http_host,
        port=settings.http_port,
        log_level="info",
        access_log=False,
        timeout_graceful_shutdown=SHUTDOWN_S_MAX,
    )
    await DrainingServer(config, drain, settings.drain_timeout_s).serve()
