"""`make bench-power`: premium time to first token with the facility power cap at half of the
uncapped draw, beside uncapped, measured in the same run.

The factory runs as processes (intake, worker with the real model, telemetry with the power
controller) on the machine's PostgreSQL and Redis, in a throwaway database and stream prefix.
Load: closed-loop free and standard clients (each submits a job, waits for it, submits the
next; on a 429 it waits a second and tries again, to keep the pressure on) and premium jobs
arriving open-loop at a fixed rate, so premium's own load leaves the machine part idle.

The meter: this process samples the worker process's CPU time every `--sample-s` and
publishes it on the power stream as the modelled CPU meter would, (TDP − idle) × utilisation,
counting the worker process alone and leaving out the host's constant idle power (`--idle-w`,
0 by default). The host-wide modelled meter would also count whatever else runs on this
shared machine, and the cap would be shedding other people's test suites; and with the
constant idle power in, half of the uncapped draw sits so close to idle on a machine where the
worker gets a fraction of the cores that only shedding everything could meet it. The
telemetry service's own sampling is turned off (once an hour).

Phases: warm-up; uncapped (mean power P, premium TTFT); then the cap set to P / 2 through the
admin API, a settling time for the controller to shed, and the capped phase measured the same
way. Printed: both phases' power, the curtailment level reached, per-tier accepted and refused
counts, and premium TTFT p50/p99 with their ratio capped / uncapped.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path

import asyncpg
import httpx
import psutil
from faststream.redis import RedisBroker
from redis.asyncio import Redis as RedisClient

from bench.intake import ADMIN_URL, drop_bench_data, factory_settings, wait_healthy
from bench.stats import percentile
from tests.e2e.factory import Factory
from tokenmill.cli import bootstrap, create_key
from tokenmill.events import PowerSample, new_id, utc_now
from tokenmill.settings import Settings
from tokenmill.signing import SigningKeys
from tokenmill.streams import Streams, publish_event
from tokenmill.telemetry.control import facility_power_w, recent_samples

ADMIN_TOKEN = "bench-power-admin"
PROMPT = "Write a short story about a lighthouse keeper."


@dataclass
class Tally:
    accepted: int = 0
    refused: int = 0
    completed: int = 0
    premium_ttft_ms: list[float] = field(default_factory=list)


class Phase:
    """Counts what happens while it is current; jobs are counted in the phase they were
    submitted in."""

    def __init__(self) -> None:
        self.name = "warm-up"
        self.tallies: dict[str, dict[str, Tally]] = {}

    def tally(self, tier: str) -> Tally:
        return self.tallies.setdefault(self.name, {}).setdefault(tier, Tally())


async def run_job(http: httpx.AsyncClient, key: str, max_tokens: int) -> dict | None:
    """Submit a job and wait for it; None when it was refused with 429."""
    headers = {"Authorization": f"Bearer {key}"}
    response = await http.post(
        "/v1/jobs", json={"prompt": PROMPT, "max_tokens": max_tokens}, headers=headers
    )
    if response.status_code == 429:
        return None
    assert response.status_code == 202, response.text
    job_id = response.json()["id"]
    while True:
        await asyncio.sleep(0.2)
        job = (await http.get(f"/v1/jobs/{job_id}", headers=headers)).json()
        if job["status"] == "completed":
            return job
        assert job["status"] != "failed", job


async def closed_loop(http, key: str, tier: str, phase: Phase, max_tokens: int) -> None:
    while True:
        tally = phase.tally(tier)
        job = await run_job(http, key, max_tokens)
        if job is None:
            tally.refused += 1
            await asyncio.sleep(1.0)
            continue
        tally.accepted += 1
        tally.completed += 1


async def premium_arrivals(http, key: str, phase: Phase, rate: float, max_tokens: int) -> None:
    async def one(tally: Tally) -> None:
        job = await run_job(http, key, max_tokens)
        if job is None:
            tally.refused += 1
            return
        tally.accepted += 1
        tally.completed += 1
        tally.premium_ttft_ms.append(job["timings"]["ttft_ms"])

    tasks: set[asyncio.Task] = set()
    try:
        while True:
            task = asyncio.create_task(one(phase.tally("premium")))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            await asyncio.sleep(1 / rate)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def process_meter(settings: Settings, pid: int, sample_s: float, idle_w: Decimal) -> None:
    """Publish the worker process's modelled power on the power stream every `sample_s`."""
    process = psutil.Process(pid)
    cpus = psutil.cpu_count() or 1
    dynamic_w = Decimal(str(settings.cpu_tdp_w - settings.cpu_idle_w))
    broker = RedisBroker(settings.redis_url)
    await broker.connect()
    keys = SigningKeys.parse(settings.signing_keys)
    stream = Streams(settings.stream_prefix).power
    start, busy = utc_now(), sum(process.cpu_times()[:2])
    try:
        while True:
            await asyncio.sleep(sample_s)
            end, now_busy = utc_now(), sum(process.cpu_times()[:2])
            window_s = Decimal(str((end - start).total_seconds()))
            share = min(Decimal(1), Decimal(str(now_busy - busy)) / (window_s * cpus))
            power_w = (idle_w + dynamic_w * share).quantize(Decimal("0.001"))
            sample = PowerSample(
                producer="bench-meter",
                customer_id="",
                request_id="",
                region=settings.region,
                meter="modelled-cpu-process",
                device="cpu",
                estimated=True,
                window_start=start,
                window_end=end,
                energy_j=power_w * window_s,
                power_w=power_w,
            )
            await publish_event(broker, stream, sample, keys)
            start, busy = end, now_busy
    finally:
        await broker.stop()


async def mean_power_w(redis: RedisClient, settings: Settings, seconds: float) -> Decimal:
    keys = SigningKeys.parse(settings.signing_keys)
    stream = Streams(settings.stream_prefix).power
    samples = await recent_samples(redis, stream, seconds, 100_000, keys)
    found = facility_power_w(samples)
    assert found is not None, "no power samples"
    return found


async def main(args: argparse.Namespace) -> None:
    database = f"tm_bench_{new_id().lower()}"
    admin = await asyncpg.connect(ADMIN_URL)
    await admin.execute(f'CREATE DATABASE "{database}"')
    settings = factory_settings(
        database,
        admin_token=ADMIN_TOKEN,
        power_sample_interval_s=3600.0,
        power_control_interval_s=0.5,
        power_cap_window_s=args.window_s,
        power_cap_dwell_s=args.window_s,
        power_cap_release_dwell_s=4 * args.window_s,
        ready_workers_min=1,
    )
    factory = Factory(settings, Path(tempfile.mkdtemp(prefix="tokenmill-bench-power-")))
    redis = RedisClient.from_url(settings.redis_url)
    tasks: list[asyncio.Task] = []
    try:
        await bootstrap(settings)
        for name in ("telemetry", "worker", "intake"):
            factory.start(name)
        await wait_healthy(factory.base_url)
        await wait_ready(factory.base_url)
        keys = {
            tier: [(await create_key(settings, f"{tier}-{i}", tier, settings.region))[1]
                   for i in range(count)]
            for tier, count in (("free", args.free), ("standard", args.standard), ("premium", 1))
        }  # fmt: skip
        phase = Phase()
        worker_pid = factory.processes["worker"].pid
        meter = process_meter(settings, worker_pid, args.sample_s, Decimal(str(args.idle_w)))
        tasks.append(asyncio.create_task(meter))
        async with httpx.AsyncClient(base_url=factory.base_url, timeout=60) as http:
            for tier in ("free", "standard"):
                for key in keys[tier]:
                    load = closed_loop(http, key, tier, phase, args.max_tokens)
                    tasks.append(asyncio.create_task(load))
            premium = premium_arrivals(
                http, keys["premium"][0], phase, args.premium_rate, args.max_tokens
            )
            tasks.append(asyncio.create_task(premium))
            await asyncio.sleep(args.warmup_s)

            phase.name = "uncapped"
            await asyncio.sleep(args.phase_s)
            uncapped_w = await mean_power_w(redis, settings, args.phase_s)
            cap_w = (uncapped_w / 2).quantize(Decimal("0.001"))
            admin_headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
            put = await http.put(
                "/admin/v1/power/cap", json={"cap_w": float(cap_w)}, headers=admin_headers
            )
            assert put.status_code == 200, put.text

            phase.name = "settling"
            await asyncio.sleep(args.settle_s)
            phase.name = "capped"
            levels = []
            started = time.monotonic()
            while time.monotonic() - started < args.phase_s:
                await asyncio.sleep(1.0)
                status = (await http.get("/admin/v1/power/cap", headers=admin_headers)).json()
                levels.append(status["curtailment"]["level"])
            capped_w = await mean_power_w(redis, settings, args.phase_s)
            phase.name = "done"
        report(args, phase, uncapped_w, cap_w, capped_w, levels)
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await redis.aclose()
        factory.stop()
        await drop_bench_data(settings, admin, database)


async def wait_ready(base_url: str) -> None:
    """Until the intake sees a live worker (its model loaded)."""
    async with httpx.AsyncClient(base_url=base_url) as http:
        for _ in range(1200):
            if (await http.get("/readyz")).status_code == 200:
                return
            await asyncio.sleep(0.1)
    raise RuntimeError("no worker became ready")


def report(args, phase: Phase, uncapped_w, cap_w, capped_w, levels: list[int]) -> None:
    load = psutil.getloadavg()
    print(
        f"power cap bench: {args.free} free + {args.standard} standard closed-loop clients, "
        f"premium {args.premium_rate}/s open-loop, {args.max_tokens} tokens a job, "
        f"{args.phase_s:.0f} s per phase, load average {load[0]:.1f}"
    )
    print(f"  uncapped mean power   {uncapped_w:>10} W (worker process, idle {args.idle_w} W)")
    print(f"  cap (half of it)      {cap_w:>10} W")
    print(f"  capped mean power     {capped_w:>10} W")
    print(f"  curtailment levels in the capped phase (1 s apart): {levels}")
    rows: dict[str, tuple[float, float, int]] = {}
    for name in ("uncapped", "capped"):
        tallies = phase.tallies.get(name, {})
        counts = ", ".join(
            f"{tier} {t.accepted} accepted / {t.refused} refused"
            for tier, t in sorted(tallies.items())
        )
        print(f"  {name:<9} jobs: {counts}")
        ttft = tallies.get("premium", Tally()).premium_ttft_ms
        if ttft:
            rows[name] = (statistics.median(ttft), percentile(ttft, 0.99), len(ttft))
    for name, (p50, p99, count) in rows.items():
        print(f"  premium TTFT {name:<9} p50 {p50:8.0f} ms  p99 {p99:8.0f} ms  ({count} jobs)")
    if len(rows) == 2:
        (u50, u99, _), (c50, c99, _) = rows["uncapped"], rows["capped"]
        print(f"  ratio capped / uncapped: p50 {c50 / u50:.2f}, p99 {c99 / u99:.2f}")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--free", type=int, default=6, help="free closed-loop clients")
    parser.add_argument("--standard", type=int, default=3, help="standard closed-loop clients")
    parser.add_argument("--premium-rate", type=float, default=0.2, help="premium jobs a second")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--warmup-s", type=float, default=15.0)
    parser.add_argument("--phase-s", type=float, default=90.0)
    parser.add_argument("--settle-s", type=float, default=45.0)
    parser.add_argument(
        "--window-s", type=float, default=12.0, help="controller window and dwell (release: 4x)"
    )
    parser.add_argument("--sample-s", type=float, default=0.5, help="meter sample interval")
    parser.add_argument("--idle-w", type=float, default=0.0, help="constant power added")
    return parser.parse_args()


if __name__ == "__main__":
    asyncio.run(main(parse_args()))
