"""The ledger's booked completion is the request's canonical one, on real Postgres and Redis:
when a re-run job's two completions reach the intake and inspector in one order and the ledger
in the other, the output shown, the verdict that counts and the bill all name one completion."""

from __future__ import annotations

import contextlib

import asyncpg
import httpx
from faststream.redis import RedisBroker
from redis.asyncio import Redis as RedisClient

from tests.integration.helpers import eventually
from tests.integration.test_books import complete, take_job
from tests.integration.test_intake_api import auth, new_key
from tests.integration.test_reconciler import event_of
from tokenmill import service
from tokenmill.events import JobCompleted, UsageBooked
from tokenmill.inspector.main import wire as inspector_wire
from tokenmill.intake.api import create_app
from tokenmill.intake.main import wire as intake_wire
from tokenmill.ledger.main import wire as ledger_wire
from tokenmill.settings import Settings
from tokenmill.signing import SigningKeys
from tokenmill.streams import Streams, publish_event


async def test_output_verdict_and_bill_all_refer_to_the_booked_completion(
    pool: asyncpg.Pool, redis: RedisClient, test_settings: Settings
):
    streams = Streams(test_settings.stream_prefix)
    keys = SigningKeys.parse(test_settings.signing_keys)
    key = await new_key(pool, tier="standard")
    app = create_app(test_settings, intake_wire)
    broker = RedisBroker(test_settings.redis_url)
    async with contextlib.AsyncExitStack() as stack:
        await broker.connect()
        stack.push_async_callback(broker.stop)
        await stack.enter_async_context(app.router.lifespan_context(app))
        http = await stack.enter_async_context(
            httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://intake")
        )
        submitted = await http.post(
            "/v1/jobs", json={"prompt": "Hi", "max_tokens": 8}, headers=auth(key)
        )
        job = await take_job(redis, streams.jobs("eu-west"))
        assert job.request_id == submitted.json()["id"]

        async def view() -> dict:
            return (await http.get(f"/v1/jobs/{job.request_id}", headers=auth(key))).json()

        # A re-run job completed twice. The intake and the inspector see B first...
        b = complete(job, "", completion_tokens=3)  # Empty: the inspector finds it defective.
        a = complete(job, "Hello there, friend.", completion_tokens=5)
        entry_b = await publish_and_id(broker, redis, streams.completions, b, keys)
        await publish_and_id(broker, redis, streams.completions, a, keys)
        await stack.enter_async_context(service.running("inspector", test_settings, inspector_wire))

        async def shows_b() -> bool:
            return (await view())["status"] == "completed"

        await eventually(shows_b)
        assert (await view())["output"]["text"] == ""

        # ...while the ledger gets A first (B's delivery to it comes later, as a reclaim or a
        # republish would bring it), and books A.
        await redis.xgroup_setid(streams.completions, "ledger", entry_b)
        await stack.enter_async_context(service.running("ledger", test_settings, ledger_wire))

        async def booked() -> bool:
            return (await view())["billing"] is not None

        await eventually(booked)
        await publish_event(broker, streams.completions, b, keys)

        async def both_judged_and_logged() -> bool:
            judged = await pool.fetchval(
                "SELECT count(*) FROM ledger.quality WHERE request_id = $1", job.request_id
            )
            logged = await pool.fetchval(
                "SELECT count(*) FROM ledger.events WHERE request_id = $1 "
                "AND event_type = 'job.completed'",
                job.request_id,
            )
            return judged == 2 and logged == 2

        await eventually(both_judged_and_logged)
        shown = await view()

    assert shown["output"]["text"] == a.text
    assert shown["usage"]["completion_tokens"] == 5
    request = await pool.fetchrow(
        "SELECT * FROM intake.requests WHERE request_id = $1", job.request_id
    )
    assert request["completion_event_id"] == request["booked_completion_event_id"] == a.event_id
    (bill,) = await pool.fetch(
        "SELECT * FROM ledger.request_usage WHERE request_id = $1", job.request_id
    )
    assert bill["completion_event_id"] == a.event_id and bill["completion_tokens"] == 5
    (quality,) = await pool.fetch(
        "SELECT * FROM ledger.request_quality WHERE request_id = $1", job.request_id
    )
    assert quality["completion_event_id"] == a.event_id and quality["verdict"] == "pass"
    ((_, fields),) = await redis.xrange(streams.booked)
    booking = event_of(fields)
    assert isinstance(booking, UsageBooked) and booking.completion_event_id == a.event_id


async def publish_and_id(
    broker: RedisBroker, redis: RedisClient, stream: str, event: JobCompleted, keys: SigningKeys
) -> str:
    await publish_event(broker, stream, event, keys)
    ((entry_id, _),) = await redis.xrevrange(stream, count=1)
    return entry_id.decode()
