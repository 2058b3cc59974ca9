"""The intake's probes, as Kubernetes reads them, and its Prometheus metrics.

- `/healthz` — liveness: the process answers. Nothing else is checked, so a Postgres outage
  never gets every intake restarted.
- `/readyz` — readiness: Postgres and Redis each answer within `probe_timeout_s`, at least
  `ready_workers_min` workers of this region have their model loaded (their heartbeats), and
  the process is not draining. 503 otherwise; the body says which check failed. Dead-letter
  counts are in the body too, for people, but never fail it: a dead letter needs an operator,
  not a restart or an intake out of rotation.
- `/metrics` — Prometheus text, read fresh from Redis and Postgres at each scrape, within
  `probe_timeout_s` too.

All three are unauthenticated: probes and scrapers carry no API key, and nothing here names a
customer.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from typing import Any

from prometheus_client import generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from tokenmill import health
from tokenmill.service import Runtime

METRICS_MEDIA_TYPE = "text/plain; version=0.0.4; charset=utf-8"


async def readiness_of(state: Any) -> tuple[bool, dict[str, Any]]:
    """`readiness` of the intake app whose `app.state` this is."""
    drain = getattr(state, "drain", None)  # Installed by main.serve; absent in-process.
    draining = drain is not None and drain.started
    return await readiness(state.runtime, draining, state.keys.listener_up)


async def metrics_of(state: Any) -> tuple[int, bytes]:
    """`metrics` of the intake app whose `app.state` this is, with the HTTP status to send: a
    scrape that cannot read Redis or Postgres in time fails (503), so Prometheus marks it down
    rather than recording partial numbers."""
    drain = getattr(state, "drain", None)
    responses = drain.responses if drain is not None else Counter()
    runtime = state.runtime
    try:
        async with asyncio.timeout(runtime.settings.probe_timeout_s):
            return 200, await metrics(runtime, responses)
    except Exception as exc:  # Whatever kept the numbers from being read is the answer.
        return 503, f"metrics unavailable: {type(exc).__name__}: {exc}\n".encode()


async def readiness(
    runtime: Runtime, draining: bool, key_listener_up: bool
) -> tuple[bool, dict[str, Any]]:
    """Whether this intake should get traffic, and the body that says why (not)."""
    settings = runtime.settings
    timeout_s = settings.probe_timeout_s
    workers: list[dict[str, Any]] = []

    async def enough_workers() -> None:
        workers.extend(
            w
            for w in await health.alive_workers(runtime.redis, settings.stream_prefix)
            if w["region"] == settings.region
        )
        if len(workers) < settings.ready_workers_min:
            raise LookupError(
                f"{len(workers)} worker(s) of {settings.region} with a model loaded, "
                f"{settings.ready_workers_min} needed"
            )

    postgres, redis, workers_check, stats = await asyncio.gather(
        health.check(runtime.db.fetchval("SELECT 1"), timeout_s),
        health.check(runtime.redis.ping(), timeout_s),
        health.check(enough_workers(), timeout_s),
        _stats_or_none(runtime, timeout_s),
    )
    checks: dict[str, Any] = {
        "postgres": postgres.as_json(),
        "redis": redis.as_json(),
        "workers": {**workers_check.as_json(), "alive": workers},
        "draining": {"ok": not draining},
    }
    ready = postgres.ok and redis.ok and workers_check.ok and not draining
    body = {
        "status": "ready" if ready else "not ready",
        "checks": checks,
        # Informational: how long the key cache may trust an entry depends on it.
        "key_listener_up": key_listener_up,
        "dead_letters": None if stats is None else stats.dead_letters,
    }
    return ready, body


async def _stats_or_none(runtime: Runtime, timeout_s: float) -> health.StreamStats | None:
    try:
        async with asyncio.timeout(timeout_s):
            return await health.stream_stats(
                runtime.redis, runtime.streams, runtime.settings.region
            )
    except Exception:  # Redis' own check says why; the counts are only missing.
        return None


async def metrics(runtime: Runtime, responses: Counter[tuple[str, str, int]]) -> bytes:
    """The metrics in Prometheus' text format. `responses` counts this process' answers by
    (method, route, status)."""
    settings = runtime.settings
    stats, workers, backlog = await asyncio.gather(
        health.stream_stats(runtime.redis, runtime.streams, settings.region),
        health.alive_workers(runtime.redis, settings.stream_prefix),
        runtime.db.fetchrow(
            # Two partial-index counts, never a scan of every request ever made.
            "SELECT (SELECT count(*) FROM intake.requests WHERE status = 'queued') AS queued, "
            "(SELECT count(*) FROM intake.requests WHERE status = 'running') AS running"
        ),
    )
    energy = await _energy_of(runtime, workers)
    families = (
        _stream_families(stats)
        + _energy_families(energy)
        + [
            _workers_family(workers),
            _gauge(
                "tokenmill_requests", "Requests not finished yet, by status.", ["status"], backlog
            ),
            _responses_family(responses),
        ]
    )
    return generate_latest(_Snapshot(families))


def _stream_families(stats: health.StreamStats) -> list[Metric]:
    lengths = _gauge(
        "tokenmill_stream_length", "Entries in each stream.", ["stream"], stats.lengths
    )
    dead = _gauge(
        "tokenmill_dead_letters",
        "Entries in each stream's dead letters (see `tokenmill dlq list`).",
        ["stream"],
        stats.dead_letters,
    )
    pending = GaugeMetricFamily(
        "tokenmill_stream_pending",
        "Entries delivered to a consumer of the group and not yet acknowledged.",
        labels=["stream", "group"],
    )
    lag = GaugeMetricFamily(
        "tokenmill_stream_lag",
        "Entries of the stream not yet delivered to the group.",
        labels=["stream", "group"],
    )
    for group in stats.groups:
        pending.add_metric([group.stream, group.group], group.pending)
        if group.lag is not None:
            lag.add_metric([group.stream, group.group], group.lag)
    return [lengths, dead, pending, lag]


async def _energy_of(runtime: Runtime, workers: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The energy gauges each live worker last wrote (worker/energy.py `gauges`)."""
    if not workers:
        return []
    prefix = runtime.settings.stream_prefix
    found = await runtime.redis.mget([health.energy_key(prefix, w["consumer"]) for w in workers])
    return [json.loads(raw) for raw in found if raw is not None]


def _energy_families(energy: list[dict[str, Any]]) -> list[Metric]:
    """Per worker and device: joules by kind and tokens (counters since the worker started);
    the last interval's watts, tokens per joule and utilisation (gauges)."""
    labels = ["worker", "device", "meter"]
    joules = CounterMetricFamily(
        "tokenmill_energy_joules",
        "Joules the worker's meter counted, by kind: metered = attributed (engine steps, split "
        "across their requests) + idle; unbilled is the attributed share no completion took.",
        labels=[*labels, "kind"],
    )
    tokens = CounterMetricFamily(
        "tokenmill_energy_tokens", "Tokens the worker's engine steps processed.", labels=labels
    )
    gauges = {
        name: GaugeMetricFamily(f"tokenmill_{name}", text, labels=labels)
        for name, text in (
            ("watts", "The worker device's mean power over its last energy interval."),
            ("tokens_per_joule", "Tokens processed per joule metered, last energy interval."),
            ("utilisation", "Share of the last energy interval the engine spent in steps."),
        )
    }
    for w in energy:
        key = [w["worker"], w["device"], w["meter"]]
        for kind, value in w["joules_total"].items():
            joules.add_metric([*key, kind], float(value))
        tokens.add_metric(key, w["tokens_total"])
        for name, family in gauges.items():
            family.add_metric(key, w[name])
    return [joules, tokens, *gauges.values()]


def _workers_family(workers: list[dict[str, Any]]) -> Metric:
    alive = Counter((w["region"], w["model"], w["device"]) for w in workers)
    return _gauge(
        "tokenmill_workers_alive",
        "Workers with their model loaded (a live heartbeat), by region, model and device.",
        ["region", "model", "device"],
        alive,
    )


def _responses_family(responses: Counter[tuple[str, str, int]]) -> Metric:
    family = CounterMetricFamily(
        "tokenmill_intake_responses",
        "Responses of this intake process by method, route and status (202: job accepted).",
        labels=["method", "route", "status"],
    )
    for (method, route, status), count in sorted(responses.items()):
        family.add_metric([method, route, str(status)], count)
    return family


def _gauge(name: str, documentation: str, labels: list[str], values: Any) -> Metric:
    family = GaugeMetricFamily(name, documentation, labels=labels)
    for label, value in sorted(dict(values).items()):
        family.add_metric(list(label) if isinstance(label, tuple) else [label], value)
    return family


class _Snapshot:
    """Metric families already gathered, in the shape `generate_latest` reads a registry."""

    def __init__(self, families: list[Metric]):
        self._families = families

    def collect(self) -> list[Metric]:
        return self._families
