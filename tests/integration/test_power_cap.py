"""The facility power cap end to end, on real Postgres and Redis with the real model: the
operator's cap (admin API, CLI, a grid signal on the control stream), the telemetry
controller fed a scripted power trace on the power stream (as a meter's readings arrive),
intake refusing a shed tier's new requests with 429, workers admitting fewer of them, nothing
accepted lost, capacity back without an operator, and every change in the ledger's log."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
from collections.abc import AsyncIterator
from datetime import timedelta
from decimal import Decimal
from pathlib import Path

import asyncpg
import httpx
import pytest
from faststream.redis import RedisBroker
from redis.asyncio import Redis as RedisClient
from redis.exceptions import RedisError

from tests.integration.helpers import eventually, publish_signed
from tests.integration.test_customer_commands import tokenmill  # noqa: F401 (a fixture)
from tests.integration.test_intake_api import auth, new_key
from tokenmill import powercap, service
from tokenmill.events import PowerSample, utc_now
from tokenmill.intake import main as intake_main
from tokenmill.intake.api import create_app
from tokenmill.ledger import main as ledger_main
from tokenmill.settings import Settings
from tokenmill.signing import SigningKeys
from tokenmill.streams import Streams, publish_event
from tokenmill.telemetry import main as telemetry_main
from tokenmill.worker import main as worker_main
from tokenmill.worker.engine import BatchEngine, EngineConfig
from tokenmill.worker.model import ModelRunner

ADMIN = {"Authorization": "Bearer power-admin-token"}
CAP_W = 1000
# The trace: under the cap, over it, inside the hysteresis band (90 %..100 % of the cap: the
# level holds), and well under it.
UNDER_W, OVER_W, BAND_W, LOW_W = 600, 1100, 950, 500
SAMPLE_S = 0.1


def fast(settings: Settings) -> Settings:
    """The controller's loop in tenths of seconds, so the test takes seconds, not minutes.
    The telemetry's own meter samples once an hour: the scripted trace is the only reading."""
    return dataclasses.replace(
        settings,
        admin_token=ADMIN["Authorization"].split()[1],
        power_control_interval_s=0.1,
        power_cap_window_s=0.5,
        power_cap_dwell_s=2.0,
        power_cap_release_dwell_s=2.0,
        power_level_poll_s=0.05,
        power_level_ttl_s=5.0,
        power_sample_interval_s=3600.0,
        meter="modelled-cpu",
        chat_wait_s=60.0,
        engine_running_max=8,
        engine_waiting_max=8,
        engine_step_tokens_max=64,
    )


@contextlib.asynccontextmanager
async def intake(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(settings, intake_main.wire)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://intake") as http:
            yield http


class Trace:
    """Publishes a PowerSample of `power_w` every SAMPLE_S, as a meter's readings arrive."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.power_w = UNDER_W

    async def run(self) -> None:
        broker = RedisBroker(self.settings.redis_url)
        await broker.connect()
        keys = SigningKeys.parse(self.settings.signing_keys)
        stream = Streams(self.settings.stream_prefix).power
        try:
            while True:
                end = utc_now()
                power_w = Decimal(self.power_w)
                sample = PowerSample(
                    producer="test-meter",
                    customer_id="",
                    request_id="",
                    region=self.settings.region,
                    meter="scripted",
                    device="rack-1",
                    estimated=False,
                    window_start=end - timedelta(seconds=SAMPLE_S),
                    window_end=end,
                    energy_j=power_w * Decimal(str(SAMPLE_S)),
                    power_w=power_w,
                )
                await publish_event(broker, stream, sample, keys)
                await asyncio.sleep(SAMPLE_S)
        finally:
            await broker.stop()


@pytest.fixture(scope="module")
def runner() -> ModelRunner:
    return ModelRunner.load("smollm2", Path.home() / ".cache" / "tokenmill" / "models")


@pytest.fixture
async def factory(test_settings: Settings, runner: ModelRunner, monkeypatch):
    """Intake, worker, telemetry and ledger in process, and the power trace running."""
    settings = fast(test_settings)
    engines: list[BatchEngine] = []

    def build(runner: ModelRunner, config: EngineConfig) -> BatchEngine:
        engines.append(BatchEngine(runner, dataclasses.replace(config, kv_cache_bytes=64 << 20)))
        return engines[-1]

    monkeypatch.setattr(worker_main, "BatchEngine", build)
    monkeypatch.setattr(worker_main.ModelRunner, "load", lambda *_args: runner)
    trace = Trace(settings)
    async with contextlib.AsyncExitStack() as stack:
        await stack.enter_async_context(service.running("ledger", settings, ledger_main.wire))
        telemetry = service.running("telemetry", settings, telemetry_main.wire, needs_db=False)
        await stack.enter_async_context(telemetry)
        worker = service.running("worker", settings, worker_main.wire, needs_db=False)
        await stack.enter_async_context(worker)
        http = await stack.enter_async_context(intake(settings))
        tracing = asyncio.create_task(trace.run())
        try:
            yield http, trace, engines, settings
        finally:
            tracing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await tracing


async def curtailment(http: httpx.AsyncClient) -> dict:
    response = await http.get("/admin/v1/power/cap", headers=ADMIN)
    assert response.status_code == 200, response.text
    return response.json()["curtailment"]


async def submit(
    http: httpx.AsyncClient, key: str, max_tokens: int, idempotency_key: str | None = None
) -> httpx.Response:
    body = {"prompt": "Count to ten: 1, 2,", "max_tokens": max_tokens}
    headers = auth(key)
    if idempotency_key is not None:
        headers["Idempotency-Key"] = idempotency_key
    return await http.post("/v1/jobs", json=body, headers=headers)


async def test_a_trace_over_the_cap_sheds_free_keeps_premium_loses_nothing_and_recovers(
    factory, pool: asyncpg.Pool
):
    http, trace, engines, settings = factory
    free_key, premium_key = await new_key(pool, "free"), await new_key(pool, "premium")
    response = await http.put(
        "/admin/v1/power/cap", json={"cap_w": CAP_W, "reason": "test"}, headers=ADMIN
    )
    assert response.status_code == 200, response.text
    assert response.json()["cap"]["cap_w"] == "1000.000"

    # Under the cap: free requests are accepted; they are still running when the cap bites.
    accepted: dict[str, str] = {}
    for i in range(4):
        response = await submit(http, free_key, 24, idempotency_key=f"before-the-cap-{i}")
        assert response.status_code == 202, response.text
        accepted[response.json()["id"]] = "free"

    async def at_level(level: int) -> bool:
        return (await curtailment(http))["level"] == level

    trace.power_w = OVER_W
    await eventually(lambda: at_level(1))
    found = await curtailment(http)
    assert found["shed_tiers"] == ["free"] and Decimal(found["measured_w"]) > CAP_W
    # Shedding free brought the power into the hysteresis band: the level holds there.
    trace.power_w = BAND_W

    async def refused() -> bool:
        return (await submit(http, free_key, 4)).status_code == 429

    await eventually(refused)  # Within one poll of the level by the intake.
    response = await submit(http, free_key, 4)
    assert response.status_code == 429
    assert response.headers["retry-after"] == str(settings.power_retry_after_s)
    problem = response.json()
    assert problem["type"].endswith("/power_curtailed") and "free-tier" in problem["detail"]
    openai = await http.post(
        "/v1/completions", json={"prompt": "Hi", "max_tokens": 2}, headers=auth(free_key)
    )
    assert openai.status_code == 429 and openai.json()["error"]["code"] == "power_curtailed"
    # A retry of a request accepted before the cap bit gets its job, not a 429; its key with
    # another body is still a 409; a new key is refused.
    retried = await submit(http, free_key, 24, idempotency_key="before-the-cap-0")
    assert retried.status_code == 200, retried.text
    assert retried.json()["id"] == next(iter(accepted))
    assert (await submit(http, free_key, 5, idempotency_key="before-the-cap-0")).status_code == 409
    assert (await submit(http, free_key, 24, idempotency_key="new-while-shed")).status_code == 429
    await eventually(lambda: _async(engines[0].tier_running_max == {"free": 1}))

    # Premium keeps being accepted and completing while free is shed.
    premium = []
    for _ in range(3):
        response = await submit(http, premium_key, 4)
        assert response.status_code == 202, response.text
        premium.append(response.json()["id"])
        accepted[premium[-1]] = "premium"
    await eventually(lambda: all_completed(http, premium_key, premium), timeout_s=60)
    assert await at_level(1), "the band between 90 % and 100 % of the cap holds the level"
    assert (await submit(http, free_key, 4)).status_code == 429

    # The trace falls: capacity returns without an operator.
    trace.power_w = LOW_W
    await eventually(lambda: at_level(0))
    await eventually(lambda: _async(engines[0].tier_running_max == {}))

    async def free_accepted() -> bool:
        response = await submit(http, free_key, 4)
        if response.status_code == 429:
            return False  # The intake sees the new level within one poll, not at once.
        assert response.status_code == 202, response.text
        accepted[response.json()["id"]] = "free"
        return True

    await eventually(free_accepted)

    # Nothing accepted was lost: every job completes, free ones included.
    free = [job for job, tier in accepted.items() if tier == "free"]
    await eventually(lambda: all_completed(http, free_key, free), timeout_s=120)

    # Every cap change and curtailment decision is in the ledger's log.
    control = Streams(settings.stream_prefix).control

    async def logged() -> list[dict]:
        rows = await pool.fetch(
            "SELECT body FROM ledger.events WHERE stream = $1 ORDER BY seq", control
        )
        return [json.loads(row["body"]) for row in rows]

    await eventually(lambda: _async_len(logged, 3))
    events = await logged()
    assert [e["type"] for e in events] == ["power.cap_set", "power.curtailment"] * 1 + [
        "power.curtailment"
    ]
    assert events[0]["cap_w"] == "1000.000" and events[0]["source"] == "admin-api"
    steps = [(e["previous_level"], e["level"]) for e in events[1:]]
    assert steps == [(0, 1), (1, 0)]
    assert events[1]["shed_tiers"] == ["free"] and events[2]["shed_tiers"] == []


async def _async(value: bool) -> bool:
    return value


async def _async_len(read, count: int) -> bool:
    return len(await read()) >= count


async def all_completed(http: httpx.AsyncClient, key: str, job_ids: list[str]) -> bool:
    for job_id in job_ids:
        response = await http.get(f"/v1/jobs/{job_id}", headers=auth(key))
        if response.json()["status"] != "completed":
            return False
    return True


@pytest.fixture
async def admin_http(test_settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    async with intake(fast(test_settings)) as http:
        yield http


@pytest.mark.parametrize(
    "body",
    [
        {"cap_w": -5},
        {"cap_w": 0},
        {"cap_w": "abc"},
        {"cap_w": "1500"},  # A string is not a number of watts.
        {"cap_w": True},
        {"cap_w": 1e12},
        {"cap_w": None},
        {},
        {"cap_w": 1500, "extra": 1},
    ],
)
async def test_a_bad_cap_is_a_400_naming_cap_w_and_changes_nothing(admin_http, body):
    before = (await admin_http.get("/admin/v1/power/cap", headers=ADMIN)).json()
    response = await admin_http.put("/admin/v1/power/cap", json=body, headers=ADMIN)
    assert response.status_code == 400, response.text
    assert response.headers["content-type"] == "application/problem+json"
    if "extra" not in body:
        assert response.json()["param"] == "cap_w", response.json()
    assert (await admin_http.get("/admin/v1/power/cap", headers=ADMIN)).json() == before


async def test_the_cap_is_set_read_and_cleared_and_needs_the_admin_credential(
    admin_http, pool: asyncpg.Pool
):
    customer = auth(await new_key(pool))
    assert (await admin_http.get("/admin/v1/power/cap", headers=customer)).status_code == 403
    put = await admin_http.put("/admin/v1/power/cap", json={"cap_w": 2500.5}, headers=ADMIN)
    assert put.status_code == 200 and put.json()["cap"]["cap_w"] == "2500.500"
    status = (await admin_http.get("/admin/v1/power/cap", headers=ADMIN)).json()
    assert status["cap"]["source"] == "admin-api" and status["curtailment"]["level"] == 0
    cleared = await admin_http.delete("/admin/v1/power/cap", headers=ADMIN)
    assert cleared.status_code == 200 and cleared.json()["cap"]["cap_w"] is None


async def test_a_grid_signal_on_the_control_stream_sets_the_cap_unless_a_newer_one_did(
    test_settings: Settings, redis: RedisClient
):
    settings = fast(test_settings)
    control = Streams(settings.stream_prefix).control
    older = powercap.cap_event(Decimal(800), "grid:tso-east", "evening peak", settings.region)
    newer = powercap.cap_event(Decimal(1200), "grid:tso-east", "peak over", settings.region)

    async def cap_w() -> Decimal | None:
        return (await powercap.read_cap(redis, settings.stream_prefix)).cap_w

    telemetry = service.running("telemetry", settings, telemetry_main.wire, needs_db=False)
    async with telemetry:
        await publish_signed(settings, control, newer)
        await eventually(lambda: _equals(cap_w(), Decimal(1200)))
        await publish_signed(settings, control, older)  # Late: it must not undo the newer.
        await asyncio.sleep(0.5)
        assert await cap_w() == Decimal(1200)
        cap = await powercap.read_cap(redis, settings.stream_prefix)
        assert (cap.source, cap.reason) == ("grid:tso-east", "peak over")


async def _equals(value, expected) -> bool:
    return await value == expected


async def test_power_cap_commands_set_show_and_clear_and_refuse_bad_watts(
    tokenmill,  # noqa: F811 (the fixture imported above)
    settings: Settings,
    redis: RedisClient,
):
    for bad in ("-100", "abc", "1e12", "nan", "0"):
        refusal, out = await tokenmill("power", "cap", bad)
        assert str(refusal).startswith("tokenmill power cap: cap_w"), refusal
    assert (await powercap.read_cap(redis, settings.stream_prefix)).event_id == ""

    refusal, out = await tokenmill("power", "cap", "5000", "--reason", "maintenance")
    assert refusal is None and "power cap: 5000.000 W (set by cli" in out
    refusal, out = await tokenmill("power", "status", "--json")
    status = json.loads(out)
    assert status["cap"]["cap_w"] == "5000.000" and status["cap"]["reason"] == "maintenance"
    assert status["curtailment"]["level"] == 0
    refusal, out = await tokenmill("power", "cap", "--clear")
    assert refusal is None and "power cap: none" in out
    refusal, _ = await tokenmill("power", "cap", "--clear", "5000")
    assert refusal is not None  # One or the other, not both.


async def test_a_follower_keeps_the_last_level_through_an_outage_then_fails_open(
    test_settings: Settings, redis: RedisClient
):
    settings = dataclasses.replace(test_settings, power_level_ttl_s=0.5)
    shed = powercap.Level(level=2, measured_w=Decimal(1200), cap_w=Decimal(1000), reason="test")
    await redis.set(powercap.level_key(settings.stream_prefix), json.dumps(shed.as_json()))
    follower = powercap.LevelFollower(redis, settings)
    await follower.refresh()
    assert follower.current().shed_tiers == ("free", "standard")

    # Redis unreachable: the level read last holds for power_level_ttl_s, then nothing is shed.
    unreachable = RedisClient.from_url("redis://127.0.0.1:1", socket_connect_timeout=0.1)
    follower._redis = unreachable
    try:
        with pytest.raises(RedisError):
            await follower.refresh()
        assert follower.current().level == 2
        await asyncio.sleep(0.6)
        assert follower.current().level == 0
    finally:
        await unreachable.aclose()

    # A controller that stopped refreshing: its key expires, and the level lapses with it.
    follower._redis = redis
    await redis.set(powercap.level_key(settings.stream_prefix), json.dumps(shed.as_json()), px=300)
    await follower.refresh()
    assert follower.current().level == 2
    await asyncio.sleep(0.4)
    await follower.refresh()
    assert follower.current().level == 0
