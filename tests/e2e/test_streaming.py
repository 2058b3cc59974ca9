"""Streaming and cancellation end to end: the five services as processes, the real model, the
official `openai` client in streaming mode, a client that hangs up, and cancelled jobs billed
for what they made, once."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from decimal import Decimal

import asyncpg
import pytest
from openai import OpenAI

from tests.e2e.factory import Factory, customer_key, running_factory
from tests.e2e.test_factory import JOB_S_MAX, client, job_view, wait_for
from tests.integration.helpers import eventually
from tokenmill.db import connect
from tokenmill.intake import admission, customers
from tokenmill.settings import Settings

# Greedy decoding keeps counting far past what any test waits for.
COUNTING = "List the numbers from 1 to 300, one per line:\n1\n2\n"
# Raw text to complete: the model counts on without end.
COUNT_TO_1000 = "Count from 1 to 1000, separated by commas: 1, 2, 3,"
LONG_MAX_TOKENS = 200


@pytest.fixture(scope="module")
def factory(settings: Settings, tmp_path_factory) -> Iterator[Factory]:
    with running_factory(settings, tmp_path_factory.mktemp("logs"), "stream") as running:
        yield running


@pytest.fixture(scope="module")
async def api_key(factory: Factory) -> str:
    return await customer_key(factory, "streams", "premium")


def openai_client(factory: Factory, api_key: str) -> OpenAI:
    return OpenAI(base_url=f"{factory.base_url}/v1", api_key=api_key, timeout=JOB_S_MAX)


async def booked(factory: Factory, api_key: str, job_id: str) -> dict:
    async with client(factory, api_key) as http:
        return await wait_for(http, job_id, lambda j: j["billing"] is not None)


async def billed_once(pool: asyncpg.Pool, job_id: str) -> asyncpg.Record:
    (books,) = await pool.fetch("SELECT * FROM ledger.request_usage WHERE request_id = $1", job_id)
    completions = await pool.fetchval(
        "SELECT count(*) FROM ledger.events WHERE request_id = $1 AND event_type = 'job.completed'",
        job_id,
    )
    assert completions == 1
    return books


async def test_chat_streams_through_the_openai_client_with_its_usage(
    factory: Factory, api_key: str
):
    def stream() -> list:
        chunks = openai_client(factory, api_key).chat.completions.create(
            model="smollm2",
            messages=[{"role": "user", "content": "What is the capital of France?"}],
            max_tokens=16,
            stream=True,
            stream_options={"include_usage": True},
        )
        return list(chunks)

    chunks = await asyncio.to_thread(stream)
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    *choices, last = chunks
    text = "".join(c.choices[0].delta.content or "" for c in choices)
    finishes = [c.choices[0].finish_reason for c in choices if c.choices[0].finish_reason]
    assert text.strip() and finishes in (["stop"], ["length"])
    assert len(choices) > 3, "the text came in pieces, as it was made"
    assert last.choices == [] and last.usage.completion_tokens <= 16
    assert last.usage.prompt_tokens_details.cached_tokens <= last.usage.prompt_tokens
    assert all(c.usage is None for c in choices)

    job = await booked(factory, api_key, chunks[0].id.removeprefix("chatcmpl-"))
    assert job["output"]["text"] == text and job["output"]["finish_reason"] == finishes[0]
    assert job["usage"]["completion_tokens"] == last.usage.completion_tokens


async def test_completions_stream_through_the_openai_client(factory: Factory, api_key: str):
    def stream() -> list:
        chunks = openai_client(factory, api_key).completions.create(
            model="smollm2", prompt="1, 2, 3,", max_tokens=8, stream=True
        )
        return list(chunks)

    chunks = await asyncio.to_thread(stream)
    assert all(c.object == "text_completion" and c.usage is None for c in chunks)
    text = "".join(c.choices[0].text for c in chunks)
    assert chunks[-1].choices[0].finish_reason in ("stop", "length") and text

    job = await booked(factory, api_key, chunks[0].id.removeprefix("cmpl-"))
    assert job["output"]["text"] == text


async def test_a_client_that_hangs_up_stops_its_job_and_is_billed_once_for_what_it_got(
    factory: Factory, api_key: str, pool: asyncpg.Pool
):
    body = {
        "messages": [{"role": "user", "content": COUNTING}],
        "max_tokens": LONG_MAX_TOKENS,
        "stream": True,
    }
    pieces, job_id = 0, None
    async with client(factory, api_key) as http:
        async with http.stream("POST", "/v1/chat/completions", json=body) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            async for line in response.aiter_lines():
                if line.startswith("data: {"):
                    job_id = job_id or line.split('"id":"chatcmpl-')[1].split('"')[0]
                    pieces += '"content":"' in line and '"content":""' not in line
                if pieces >= 3:
                    break  # Hang up mid-stream.

    job = await booked(factory, api_key, job_id)
    assert job["status"] == "cancelled" and job["output"]["finish_reason"] == "cancelled"
    assert job["cancel_requested_at"] is not None
    books = await billed_once(pool, job_id)
    assert 3 <= books["completion_tokens"] < LONG_MAX_TOKENS
    assert books["completion_tokens"] == job["usage"]["completion_tokens"]
    assert Decimal(job["billing"]["revenue"]) == books["revenue"] > 0


async def held_customer(factory: Factory, name: str) -> tuple[str, str]:
    """A customer with a monthly budget, so that its jobs' worst cases are held: (id, key)."""
    conn = await connect(factory.settings.database_url)
    try:
        region = factory.settings.region
        customer, key = await customers.create(conn, name, "standard", region, True)
        await admission.set_budget(conn, customer.customer_id, Decimal("1.00"))
    finally:
        await conn.close()
    return customer.customer_id, key


async def test_a_running_job_shows_its_text_so_far_and_can_be_cancelled(
    factory: Factory, pool: asyncpg.Pool
):
    customer_id, api_key = await held_customer(factory, "running")
    body = {"prompt": COUNT_TO_1000, "max_tokens": LONG_MAX_TOKENS, "stream": True}
    events: list[dict] = []
    async with client(factory, api_key) as http:
        async with http.stream("POST", "/v1/completions", json=body) as response:
            lines = response.aiter_lines()
            while len(events) < 3:
                line = await anext(lines)
                if line.startswith("data: {"):
                    events.append(json.loads(line.removeprefix("data: ")))
            job_id = events[0]["id"].removeprefix("cmpl-")
            running = await job_view(http, job_id)
            assert running["status"] == "running" and running["output"]["finish_reason"] is None
            assert running["output"]["text"].startswith(
                "".join(e["choices"][0]["text"] for e in events)
            )

            cancelled = await http.post(f"/v1/jobs/{job_id}/cancel")
            assert cancelled.status_code == 200, cancelled.text
            assert cancelled.json()["cancel_requested_at"] is not None
            again = await http.post(f"/v1/jobs/{job_id}/cancel")
            assert again.status_code == 200
            assert again.json()["cancel_requested_at"] == cancelled.json()["cancel_requested_at"]
            # The stream ends as the job does: its last chunk says why.
            rest = [line async for line in lines if line.startswith("data: ")]
        assert rest[-1] == "data: [DONE]"
        last = json.loads(rest[-2].removeprefix("data: "))
        assert last["choices"][0]["finish_reason"] == "cancelled"
        job = await wait_for(http, job_id, lambda j: j["billing"] is not None)

    assert job["status"] == "cancelled" and job["output"]["finish_reason"] == "cancelled"
    assert job["output"]["text"].startswith(running["output"]["text"])
    books = await billed_once(pool, job_id)
    assert books["completion_tokens"] == job["usage"]["completion_tokens"] < LONG_MAX_TOKENS

    # Its hold settles at the booked charge, and the inspector judges it like any completion.
    async def settled() -> bool:
        balance = await pool.fetchrow(
            "SELECT held, period_settled FROM intake.admission_balances WHERE customer_id = $1",
            customer_id,
        )
        return balance["held"] == 0 and balance["period_settled"] == books["revenue"]

    async def judged() -> bool:
        return bool(
            await pool.fetchval("SELECT count(*) FROM ledger.quality WHERE request_id = $1", job_id)
        )

    await eventually(settled)
    await eventually(judged)


async def test_a_finished_job_cannot_be_cancelled(factory: Factory, api_key: str):
    async with client(factory, api_key) as http:
        submitted = await http.post("/v1/jobs", json={"prompt": "Say hi", "max_tokens": 4})
        job_id = submitted.json()["id"]
        await wait_for(http, job_id, lambda j: j["status"] == "completed")
        refused = await http.post(f"/v1/jobs/{job_id}/cancel")
    assert refused.status_code == 409
    assert "completed already" in refused.json()["detail"]


async def test_a_job_cancelled_while_queued_is_never_run_and_its_hold_is_released(
    factory: Factory, pool: asyncpg.Pool
):
    customer_id, key = await held_customer(factory, "queued")
    factory.kill("worker")
    async with client(factory, key) as http:
        submitted = await http.post("/v1/jobs", json={"prompt": "Say hi", "max_tokens": 8})
        job_id = submitted.json()["id"]
        held = await pool.fetchval(
            "SELECT held FROM intake.admission_balances WHERE customer_id = $1",
            customer_id,
        )
        assert held > 0
        cancelled = await http.post(f"/v1/jobs/{job_id}/cancel")
        assert cancelled.status_code == 200, cancelled.text
        assert cancelled.json()["status"] == "cancelled"
        balance = await pool.fetchrow(
            "SELECT held, period_settled FROM intake.admission_balances WHERE customer_id = $1",
            customer_id,
        )
        assert balance["held"] == 0 and balance["period_settled"] == 0

        factory.start("worker")

        async def skipped() -> bool:
            types = await pool.fetch(
                "SELECT event_type FROM ledger.events WHERE request_id = $1", job_id
            )
            return "job.failed" in {r["event_type"] for r in types}

        await eventually(skipped, timeout_s=JOB_S_MAX)
        job = await job_view(http, job_id)

    assert job["status"] == "cancelled" and job["output"] is None and job["billing"] is None
    types = await pool.fetch("SELECT event_type FROM ledger.events WHERE request_id = $1", job_id)
    assert "job.started" not in {r["event_type"] for r in types}
    assert (
        await pool.fetchval(
            "SELECT count(*) FROM ledger.request_usage WHERE request_id = $1", job_id
        )
        == 0
    )
