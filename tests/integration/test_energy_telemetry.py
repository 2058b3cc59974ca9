"""Energy on the power stream and in /metrics, on real Redis: a worker's energy intervals and
gauges, and the telemetry service's 1 s windows read at a higher rate."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from redis.asyncio import Redis as RedisClient

from tests.integration.helpers import eventually
from tests.integration.test_probes import a_worker, intake, samples  # noqa: F401 - a fixture
from tokenmill import health, service
from tokenmill.events import EnergyInterval, Event, PowerSample, parse_event
from tokenmill.meters import ScriptedMeter
from tokenmill.settings import Settings
from tokenmill.streams import Streams
from tokenmill.telemetry.main import wire as telemetry_wire
from tokenmill.worker.energy import EnergyAccount
from tokenmill.worker.main import publish_energy


async def power_events(redis: RedisClient, settings: Settings, kind: type) -> list[Event]:
    entries = await redis.xrange(Streams(settings.stream_prefix).power)
    found = []
    for _, fields in entries:
        data = fields[b"__data__"]
        event = parse_event(data[data.index(b"{") :])
        if isinstance(event, kind):
            found.append(event)
    return found


def until(redis: RedisClient, settings: Settings, kind: type, count: int) -> Callable:
    async def enough() -> bool:
        return len(await power_events(redis, settings, kind)) >= count

    return enough


async def test_a_worker_publishes_its_energy_intervals_and_metrics_show_them(
    intake,  # noqa: F811 - the fixture
    redis: RedisClient,
    test_settings: Settings,
):
    http, _ = intake
    settings = dataclasses.replace(a_worker(test_settings, "worker-e"), energy_interval_s=0.2)
    account = EnergyAccount(ScriptedMeter([(0.0, 50.0)], device="cpu"))

    async def wire(rt: service.Runtime):
        return [publish_energy(rt, account)]

    await health.beat(redis, settings, "smollm2", "cpu")
    async with service.running("worker", settings, wire, needs_db=False):
        await eventually(until(redis, settings, EnergyInterval, 2))
    intervals = await power_events(redis, settings, EnergyInterval)
    for event in intervals:
        assert event.worker == "worker-e" and event.meter == "scripted"
        assert event.metered_j == event.attributed_j + event.idle_j
        assert event.idle_j > 0 and event.attributed_j == 0  # No steps: all of it idle.
    consecutive = zip(intervals, intervals[1:], strict=False)
    assert all(a.interval_end == b.interval_start for a, b in consecutive), "nothing skipped"

    text = (await http.get("/metrics")).text
    labels = (("device", "cpu"), ("meter", "scripted"), ("worker", "worker-e"))
    watts = samples(text, "tokenmill_watts")[labels]
    assert 45 <= watts <= 55, watts
    idle_labels = tuple(sorted((*labels, ("kind", "idle"))))
    idle = samples(text, "tokenmill_energy_joules_total")[idle_labels]
    assert idle > 0
    assert samples(text, "tokenmill_utilisation")[labels] == 0


async def test_telemetry_reads_often_and_publishes_one_window_per_interval(
    redis: RedisClient, test_settings: Settings
):
    settings = dataclasses.replace(
        test_settings, meter="scripted:80", power_read_hz=50.0, power_sample_interval_s=0.25
    )
    async with service.running("telemetry", settings, telemetry_wire, needs_db=False):
        await eventually(until(redis, settings, PowerSample, 3))
    windows = await power_events(redis, settings, PowerSample)
    for window in windows:
        seconds = (window.window_end - window.window_start).total_seconds()
        assert 0.2 <= seconds <= 0.5, seconds
        assert 75 <= window.power_w <= 85 and 75 <= window.power_w_max <= 85
        assert window.meter == "scripted" and window.estimated
