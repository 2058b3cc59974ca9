"""Intake service: the HTTP API, its outbox relay, and the consumers that follow each job."""

from __future__ import annotations

import uvicorn

from tokenmill import service
from tokenmill.db import first_delivery
from tokenmill.events import Event, JobCompleted, JobFailed, JobStarted, UsageBooked
from tokenmill.intake import jobs
from tokenmill.intake.api import create_app
from tokenmill.settings import Settings
from tokenmill.streams import Delivery, consume


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


async def serve(settings: Settings) -> None:
    app = create_app(settings, wire)
    config = uvicorn.Config(
        app, host=settings.http_host, port=settings.http_port, log_level="info", access_log=False
    )
    await uvicorn.Server(config).serve()
