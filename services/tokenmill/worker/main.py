"""Worker service: takes its region's jobs, runs them on the model, publishes completions."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from tokenmill import service
from tokenmill.events import Event, JobStarted, JobSubmitted, parse_event, utc_now
from tokenmill.meters import create_meter
from tokenmill.streams import Delivery, consume, publish_event
from tokenmill.worker.engine import Engine, elapsed_ms
from tokenmill.worker.model import ModelRunner

log = logging.getLogger(__name__)


async def keep_alive_while(task: asyncio.Future, delivery: Delivery, interval_s: float) -> None:
    """Keep a long job's stream entry fresh so no claimer mistakes this worker for dead."""
    while not task.done():
        await asyncio.wait({task}, timeout=interval_s)
        if not task.done():
            with contextlib.suppress(Exception):
                await delivery.keep_alive()


async def wire(rt: service.Runtime):
    settings = rt.settings
    runner = await asyncio.to_thread(
        ModelRunner.load, settings.model, settings.model_cache_path, settings.device
    )
    engine = Engine(runner, create_meter(settings, runner.device), settings.consumer)
    log.info("serving %s on %s, metered by %s", runner.name, runner.device, engine.meter.name)

    async def on_job(event: Event, delivery: Delivery) -> None:
        if not isinstance(event, JobSubmitted):
            return
        started = JobStarted(
            **event.envelope_for("worker"),
            worker=settings.consumer,
            queue_ms=elapsed_ms(event.occurred_at, utc_now()),
        )
        await publish_event(rt.broker, rt.streams.progress, started, rt.signing_keys)
        job = asyncio.ensure_future(asyncio.to_thread(engine.run, event))
        await keep_alive_while(job, delivery, settings.claim_idle_ms / 3000)
        await publish_event(rt.broker, rt.streams.completions, job.result(), rt.signing_keys)

    async def on_give_up(raw: bytes, reason: str) -> None:
        # A job no worker could finish fails visibly instead of staying queued forever.
        job = parse_event(raw)
        if isinstance(job, JobSubmitted):
            failed = engine.failed(job, f"no worker could run this job: {reason}")
            await publish_event(rt.broker, rt.streams.completions, failed, rt.signing_keys)

    # One entry at a time: an entry read is owned by this worker until acknowledged.
    consume(
        rt.broker,
        settings,
        rt.streams.jobs(settings.region),
        "worker",
        on_job,
        max_records=1,
        on_give_up=on_give_up,
    )
    return []
