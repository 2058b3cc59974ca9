"""Worker service: takes its region's jobs, runs them in the batching engine, publishes
completions."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging

import torch
from redis.exceptions import RedisError

from tokenmill import health, powercap, service
from tokenmill.events import Event, JobStarted, JobSubmitted, parse_event, utc_now
from tokenmill.meters import create_meter
from tokenmill.settings import Settings
from tokenmill.streams import Delivery, consume, publish_event
from tokenmill.worker.cancels import Cancels
from tokenmill.worker.deltas import DeltaPublisher
from tokenmill.worker.energy import EnergyAccount, Interval, gauges
from tokenmill.worker.engine import BatchEngine, EngineConfig
from tokenmill.worker.metrics import WorkerMetrics
from tokenmill.worker.model import ModelRunner
from tokenmill.worker.serving import EngineService, elapsed_ms

# The outcome published for a job its customer cancelled before any worker ran it: never billed.
CANCELLED_BEFORE_START = "cancelled before it started"

log = logging.getLogger(__name__)


class Stopping(Exception):
    """The worker is stopping: an entry read now stays pending for another worker to claim."""


class AlreadyInHand(Exception):
    """This worker runs the job already, from an earlier delivery of the same entry (its own
    claimer took back an entry that waited in the reader's buffer); that one acknowledges it."""


class LeaseLost(Exception):
    """Another worker owns this job's entry now: it runs the job and publishes its outcome.

    Raised out of the handler so the entry is not acknowledged: acknowledging would settle an
    entry that is no longer ours to settle.
    """


async def keep_alive_while(
    task: asyncio.Future, delivery: Delivery, interval_s: float, lease_s: float
) -> bool:
    """Keep a long job's stream entry fresh while `task` runs; False once the lease is lost.

    The lease is lost when another consumer owns the entry (a claimer took it while this
    worker looked dead), or when no renewal succeeded for `lease_s`: past that a claimer may
    have taken it without this worker being able to tell.
    """
    loop = asyncio.get_running_loop()
    renewed_at = loop.time()
    while not task.done():
        await asyncio.wait({task}, timeout=interval_s)
        if task.done():
            break
        try:
            if not await delivery.keep_alive():
                return False
            renewed_at = loop.time()
        except RedisError as exc:
            # One line per renewal interval, and only until the lease runs out.
            log.warning("cannot renew the lease on %s: %s", delivery.entry_id, exc)
            if loop.time() - renewed_at > lease_s:
                return False
    return True


async def _abandon(job: asyncio.Future) -> None:
    """Cancel the job's request (it stops within one engine step) and wait for it to let go."""
    job.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await job


async def publish_energy(rt: service.Runtime, account: EnergyAccount) -> None:
    """Publish the energy account once per interval on the power stream (one event per
    interval per worker, whatever the load). An interval whose publish failed is folded into
    the next, so the published intervals always add up to what the meter counted."""
    settings = rt.settings
    pending: Interval | None = None
    while True:
        await asyncio.sleep(settings.energy_interval_s)
        closed = account.close_interval()
        pending = closed if pending is None else pending.merged(closed)
        event = pending.event(account.meter, settings.consumer, settings.region)
        shown = gauges(account.meter, settings.consumer, settings.region, closed, account.totals())
        try:
            await publish_event(rt.broker, rt.streams.power, event, rt.signing_keys)
        except Exception as exc:  # Redis unavailable: widen the interval instead of losing it.
            log.warning("energy interval not published (%s); folding it into the next", exc)
            continue
        pending = None
        # Expires when the worker stops publishing; a failed write waits for the next interval.
        ttl_ms = int(max(settings.worker_heartbeat_ttl_s, 3 * settings.energy_interval_s) * 1000)
        with contextlib.suppress(RedisError):
            key = health.energy_key(settings.stream_prefix, settings.consumer)
            await rt.redis.set(key, json.dumps(shown), px=ttl_ms)


def engine_config(settings: Settings) -> EngineConfig:
    return EngineConfig(
        kv_cache_bytes=settings.engine_kv_cache_mib << 20,
        block_size=settings.engine_block_size,
        step_tokens_max=settings.engine_step_tokens_max,
        running_max=settings.engine_running_max,
        waiting_max=settings.engine_waiting_max,
        prefix_caching=bool(settings.engine_prefix_caching),
    )


def build_engine(settings: Settings) -> BatchEngine:
    """The engine `settings.engine` names, with its model loaded."""
    if settings.engine == "vllm":
        from tokenmill.worker.vllm_engine import VllmEngine

        return VllmEngine.load(settings)  # type: ignore[return-value]  # Same interface.
    if settings.engine != "tokenmill":
        raise ValueError(
            f"TOKENMILL_ENGINE is {settings.engine!r}; it must be 'tokenmill' or 'vllm'"
        )
    runner = ModelRunner.load(settings.model, settings.model_cache_path, settings.device)
    return BatchEngine(runner, engine_config(settings))


async def wire(rt: service.Runtime):
    settings = rt.settings
    if settings.engine_torch_threads > 0:
        torch.set_num_threads(settings.engine_torch_threads)
    engine = await asyncio.to_thread(build_engine, settings)
    runner = engine.runner
    metrics = WorkerMetrics(engine)
    deltas = DeltaPublisher(rt.redis, settings)
    cancels = Cancels(rt.redis, settings)
    serving = EngineService(
        engine,
        create_meter(settings, runner.device),
        settings.consumer,
        on_step=deltas.on_step,
        metrics=metrics,
    )
    if settings.worker_metrics_port:
        metrics.serve(settings.http_host, settings.worker_metrics_port)
        log.info(
            "metrics on http://%s:%d/metrics", settings.http_host, settings.worker_metrics_port
        )
    log.info(
        "serving %s on %s, metered by %s; KV cache of %d blocks, up to %d jobs in hand",
        runner.name,
        runner.device,
        serving.meter.name,
        engine.pool.num_blocks,
        serving.capacity,
    )

    # Set when the service begins to stop. The runtime cancels background loops before it
    # stops the broker, whose graceful stop lets the jobs in hand finish for up to
    # graceful_timeout_s; an entry the reader or claimer still hands over meanwhile is not
    # started but left pending.
    stopping = asyncio.Event()

    async def note_stopping() -> None:
        try:
            await asyncio.Future()
        finally:
            stopping.set()

    async def on_job(event: Event, delivery: Delivery) -> None:
        if not isinstance(event, JobSubmitted):
            return
        if stopping.is_set():
            raise Stopping(f"{event.request_id} left pending on {delivery.entry_id}")
        # The entry may have waited in the reader's buffer while every handler was busy; if
        # another worker claimed it meanwhile, it is that worker's to run.
        if not await delivery.keep_alive():
            raise LeaseLost(f"{event.request_id}: lost the lease on {delivery.entry_id}")
        if serving.holds(event.request_id):
            raise AlreadyInHand(f"{event.request_id} runs here already")
        with cancels.hold(event.request_id) as stop:
            if await cancels.requested(event.request_id):
                # The intake settled the job as cancelled; this outcome completes its record.
                skipped = serving.failed(event, CANCELLED_BEFORE_START)
                await publish_event(rt.broker, rt.streams.completions, skipped, rt.signing_keys)
                return
            await run_job(event, delivery, stop)

    async def run_job(event: JobSubmitted, delivery: Delivery, stop: asyncio.Event) -> None:
        started = JobStarted(
            **event.envelope_for("worker"),
            worker=settings.consumer,
            queue_ms=elapsed_ms(event.occurred_at, utc_now()),
        )
        await publish_event(rt.broker, rt.streams.progress, started, rt.signing_keys)
        deltas.open(event)
        job = asyncio.ensure_future(serving.run(event, stop))
        lease_s = settings.claim_idle_ms / 1000
        try:
            owner = await keep_alive_while(job, delivery, lease_s / 3, lease_s)
        except asyncio.CancelledError:
            # The broker gave up waiting (graceful_timeout_s ran out while stopping): abandon
            # the job unpublished; its entry stays pending and another worker claims it.
            job.cancel()
            deltas.forget(event.request_id)
            raise
        if not owner:
            deltas.forget(event.request_id)
            await _abandon(job)
            raise LeaseLost(f"{event.request_id}: lost the lease on {delivery.entry_id}")
        try:
            outcome = job.result()
            # The lease may have been lost since the last renewal; only the owner publishes.
            if not await delivery.keep_alive():
                raise LeaseLost(f"{event.request_id}: lost the lease on {delivery.entry_id}")
        except Exception:
            deltas.forget(event.request_id)
            raise
        deltas.finish(event.request_id, outcome)
        await publish_event(rt.broker, rt.streams.completions, outcome, rt.signing_keys)

    async def on_give_up(raw: bytes, reason: str) -> None:
        # A job no worker could finish fails visibly instead of staying queued forever.
        job = parse_event(raw)
        if isinstance(job, JobSubmitted):
            failed = serving.failed(job, f"no worker could run this job: {reason}")
            await publish_event(rt.broker, rt.streams.completions, failed, rt.signing_keys)

    # As many new entries in hand as the engine holds (one slot is the claimer's): past that
    # the reader stops reading and jobs wait in Redis. An entry read is owned by this worker
    # until acknowledged, and each one's lease is renewed while its job runs.
    consume(
        rt.broker,
        settings,
        rt.streams.jobs(settings.region),
        "worker",
        on_job,
        max_records=min(settings.read_batch_max, serving.capacity),
        on_give_up=on_give_up,
        max_workers=max(1, serving.capacity - 1),
    )

    # Under the power cap the worker admits fewer requests of each shed tier into the batch.
    if settings.power_shed_running_max < 1:
        raise ValueError(
            "power_shed_running_max must be at least 1: a shed tier's accepted work still runs"
        )

    def curtail(level: powercap.Level) -> None:
        limit = settings.power_shed_running_max
        serving.limit_tiers({tier: limit for tier in level.shed_tiers})

    follower = powercap.LevelFollower(rt.redis, settings, curtail)
    # Intake's /readyz counts the workers whose heartbeat is live: this one, while its model is
    # loaded and until it begins to stop.
    return [
        note_stopping(),
        health.heartbeat(rt.redis, settings, runner.name, runner.device),
        publish_energy(rt, serving.energy),
        follower.run(),
        deltas.run(),
        cancels.follow(),
    ]
