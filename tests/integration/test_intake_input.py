"""Bad input against the intake in process (real Postgres and Redis, no worker): every refusal
has its status and names what is wrong, and writes nothing, queues nothing."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import AsyncIterator
from decimal import Decimal

import asyncpg
import httpx
import openai
import pytest
from redis.asyncio import Redis as RedisClient

from tests.integration.test_intake_api import auth, counts, new_key
from tokenmill import tokenizer
from tokenmill.events import UsageBooked, new_id
from tokenmill.intake import jobs
from tokenmill.intake.api import create_app
from tokenmill.intake.main import wire
from tokenmill.settings import Settings
from tokenmill.streams import Streams, create_groups

# Small enough that a chat request times out at once when no worker runs.
CHAT_WAIT_S = 0.2
SEED_MAX = 2**63 - 1
CHAT = "/v1/chat/completions"
USER_HI = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
async def input_settings(settings: Settings) -> Settings:
    """One app serves the whole module (starting one per test would dominate its run time),
    on a stream prefix of its own."""
    prefix = f"{settings.stream_prefix}.{new_id().lower()[-8:]}"
    redis = RedisClient.from_url(settings.redis_url)
    try:
        await create_groups(redis, Streams(prefix).groups(settings.region))
    finally:
        await redis.aclose()
    return dataclasses.replace(settings, stream_prefix=prefix, chat_wait_s=CHAT_WAIT_S)


@pytest.fixture(scope="module")
async def app(input_settings: Settings) -> AsyncIterator:
    app = create_app(input_settings, wire)
    async with app.router.lifespan_context(app):
        yield app


@pytest.fixture
async def client(app) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://intake") as http:
        yield http


@pytest.fixture
async def key(pool: asyncpg.Pool) -> str:
    return await new_key(pool)


@pytest.fixture
async def unchanged(pool: asyncpg.Pool, redis: RedisClient, input_settings: Settings):
    """Asserts, after the test, that no request or outbox row was written and nothing queued."""
    stream = Streams(input_settings.stream_prefix).jobs("eu-west")
    before = (await counts(pool), await redis.xlen(stream))
    yield
    assert await counts(pool) == before[0], "a refused request wrote rows"
    assert await redis.xlen(stream) == before[1], "a refused request was queued"


def sdk(app, key: str, **options) -> openai.AsyncOpenAI:
    """The official OpenAI client, talking to `app` in process."""
    transport = httpx.ASGITransport(app=app)
    return openai.AsyncOpenAI(
        base_url="http://intake/v1",
        api_key=key,
        http_client=httpx.AsyncClient(transport=transport),
        **options,
    )


def refused(response: httpx.Response, status: int, param: str | None = None) -> str:
    """Check the refusal's status and shape; return its message."""
    assert response.status_code == status, response.text
    body = response.json()
    if response.request.url.path.startswith(("/v1/chat/", "/v1/completions")):
        error = body["error"]
        assert error["type"] == "invalid_request_error"
        message, named = error["message"], error["param"]
    else:
        assert response.headers["content-type"] == "application/problem+json"
        assert body["status"] == status
        message, named = body["detail"], body.get("param")
    if param is not None:
        assert named == param, body
    return message


def raw_json(text: str, key: str) -> dict:
    """Send `text` as the body byte for byte: JSON escapes such as \\ud800 arrive unchanged."""
    return {"content": text.encode(), "headers": {**auth(key), "Content-Type": "application/json"}}


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/jobs", '{"prompt": "a\\u0000b", "max_tokens": 8}', "prompt"),
        ("/v1/jobs", '{"prompt": "\\ud800", "max_tokens": 8}', "prompt"),
        ("/v1/jobs", '{"prompt": "hi", "max_tokens": 8, "stop": ["\\u0000"]}', "stop.0"),
        ("/v1/jobs", '{"prompt": "hi", "max_tokens": 8, "model": "x\\u0000"}', "model"),
        ("/v1/completions", '{"prompt": "hi \\udfff", "max_tokens": 8}', "prompt"),
        ("/v1/completions", '{"prompt": "hi", "stop": "\\ud800"}', "stop.0"),
        (CHAT, '{"messages": [{"role": "user", "content": "a\\u0000"}]}', "messages.0.content"),
        (CHAT, '{"messages": [{"role": "user", "content": "\\ud83d"}]}', "messages.0.content"),
        (CHAT, '{"messages": [{"role": "us\\u0000er", "content": "hi"}]}', "messages.0.role"),
        (
            CHAT,
            '{"messages": [{"role": "user", "content": "hi", "name": "\\u0000"}]}',
            "messages.0.name",
        ),
        (
            CHAT,
            '{"messages": [{"role": "user", "content": "hi"}], "stop": ["ok", "\\u0000"]}',
            "stop.1",
        ),
    ],
)
async def test_nul_and_lone_surrogates_are_refused_naming_the_field(
    client: httpx.AsyncClient, key: str, unchanged, path: str, body: str, param: str
):
    refused(await client.post(path, **raw_json(body, key)), 400, param)


async def test_a_paired_surrogate_escape_is_an_ordinary_character(
    client: httpx.AsyncClient, key: str, pool: asyncpg.Pool
):
    body = '{"prompt": "smile \\ud83d\\ude00", "max_tokens": 8}'
    response = await client.post("/v1/jobs", **raw_json(body, key))
    assert response.status_code == 202, response.text
    stored = await pool.fetchval(
        "SELECT prompt FROM intake.requests WHERE request_id = $1", response.json()["id"]
    )
    assert stored == "smile \N{GRINNING FACE}"


@pytest.mark.parametrize("job_id", ["job_%00x", "job_%ED%A0%80", "job%20x", "x" * 65])
async def test_a_job_id_that_cannot_be_one_is_refused(
    client: httpx.AsyncClient, key: str, job_id: str
):
    message = refused(await client.get(f"/v1/jobs/{job_id}", headers=auth(key)), 400, None)
    assert "job_id" in message


async def test_body_over_the_limit_is_413_by_content_length(
    client: httpx.AsyncClient, key: str, input_settings: Settings, unchanged
):
    prompt = "x" * input_settings.request_body_bytes_max
    response = await client.post(
        "/v1/jobs", json={"prompt": prompt, "max_tokens": 8}, headers=auth(key)
    )
    assert "bytes" in refused(response, 413)


async def test_body_over_the_limit_is_413_when_chunked(
    client: httpx.AsyncClient, key: str, input_settings: Settings, unchanged
):
    chunk = b" " * 65536
    chunks = input_settings.request_body_bytes_max // len(chunk) + 2

    async def body() -> AsyncIterator[bytes]:
        yield b'{"max_tokens": 8, "prompt": "hi"'
        for _ in range(chunks):
            yield chunk
        yield b"}"

    response = await client.post(
        "/v1/jobs", content=body(), headers={**auth(key), "Content-Type": "application/json"}
    )
    assert "content-length" not in response.request.headers
    refused(response, 413)


async def test_a_body_of_exactly_the_limit_is_read(
    client: httpx.AsyncClient, key: str, input_settings: Settings
):
    body = json.dumps({"prompt": "hi", "max_tokens": 8}).encode()
    padding = b" " * (input_settings.request_body_bytes_max - len(body))
    response = await client.post(
        "/v1/jobs",
        content=body[:-1] + padding + b"}",
        headers={**auth(key), "Content-Type": "application/json"},
    )
    assert response.status_code == 202, response.text


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        (CHAT, lambda s: {"messages": USER_HI * (s.request_messages_max + 1)}, "messages"),
        (
            CHAT,
            lambda s: {"messages": USER_HI, "stop": ["s"] * (s.request_stop_sequences_max + 1)},
            "stop",
        ),
        (
            CHAT,
            lambda s: {"messages": USER_HI, "stop": ["s" * (s.request_stop_chars_max + 1)]},
            "stop",
        ),
        ("/v1/jobs", lambda s: {"prompt": "hi", "max_tokens": 8, "stop": [""]}, "stop"),
        ("/v1/completions", lambda s: {"prompt": "hi", "stop": ""}, "stop"),
        (CHAT, lambda s: {"messages": USER_HI, "n": 2}, "n"),
        ("/v1/jobs", lambda s: {"prompt": "hi", "max_tokens": 8, "seed": SEED_MAX + 1}, "seed"),
        ("/v1/jobs", lambda s: {"prompt": "hi", "max_tokens": 8, "seed": -SEED_MAX - 2}, "seed"),
    ],
)
async def test_what_a_request_carries_is_bounded(
    client: httpx.AsyncClient, key: str, input_settings: Settings, unchanged, path, body, param
):
    response = await client.post(path, json=body(input_settings), headers=auth(key))
    refused(response, 400, param)


@pytest.mark.parametrize("seed", [SEED_MAX, -SEED_MAX - 1])
async def test_a_seed_at_the_64_bit_bounds_is_taken(
    client: httpx.AsyncClient, key: str, pool: asyncpg.Pool, seed: int
):
    response = await client.post(
        "/v1/jobs", json={"prompt": "hi", "max_tokens": 8, "seed": seed}, headers=auth(key)
    )
    assert response.status_code == 202, response.text


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/jobs", {"prompt": "hi", "max_tokens": True}, "max_tokens"),
        ("/v1/jobs", {"prompt": "hi", "max_tokens": "4"}, "max_tokens"),
        ("/v1/jobs", {"prompt": "hi", "max_tokens": 4.0}, "max_tokens"),
        ("/v1/jobs", {"prompt": "hi", "max_tokens": 8, "temperature": "0.5"}, "temperature"),
        ("/v1/jobs", {"prompt": "hi", "max_tokens": 8, "temperature": True}, "temperature"),
        ("/v1/jobs", {"prompt": "hi", "max_tokens": 8, "seed": "7"}, "seed"),
        ("/v1/jobs", {"prompt": 5, "max_tokens": 8}, "prompt"),
        (CHAT, {"messages": USER_HI, "stream": "false"}, "stream"),
        (CHAT, {"messages": USER_HI, "n": True}, "n"),
        (CHAT, {"messages": USER_HI, "max_completion_tokens": "5"}, "max_completion_tokens"),
        (CHAT, {"messages": [{"role": "user", "content": 5}]}, "messages.0.content"),
        (
            CHAT,
            {"messages": USER_HI, "max_tokens": 5, "max_completion_tokens": 6},
            "max_completion_tokens",
        ),
    ],
)
async def test_types_are_strict(
    client: httpx.AsyncClient, key: str, unchanged, path: str, body: dict, param: str
):
    refused(await client.post(path, json=body, headers=auth(key)), 400, param)


@pytest.mark.parametrize(
    "limits", [{"max_completion_tokens": 5}, {"max_completion_tokens": 5, "max_tokens": 5}]
)
async def test_max_completion_tokens_limits_the_tokens_run(
    app, key: str, pool: asyncpg.Pool, limits: dict
):
    # The real SDK, as newer clients send it; the chat times out (no worker) but is queued.
    async with sdk(app, key, max_retries=0) as client:
        with pytest.raises(openai.InternalServerError):
            await client.chat.completions.create(model="smollm2", messages=USER_HI, **limits)
    queued = await pool.fetchval(
        "SELECT body FROM intake.outbox WHERE event_type = 'job.submitted' ORDER BY seq DESC"
    )
    assert json.loads(queued)["max_tokens"] == 5


@pytest.mark.parametrize(
    ("path", "content_type"),
    [
        ("/v1/jobs", "text/plain"),
        ("/v1/jobs", "application/x-www-form-urlencoded"),
        ("/v1/jobs", None),
        (CHAT, "text/plain; charset=utf-8"),
        ("/v1/completions", "multipart/form-data; boundary=x"),
    ],
)
async def test_a_body_that_is_not_json_is_415(
    client: httpx.AsyncClient, key: str, unchanged, path: str, content_type: str | None
):
    headers = auth(key) | ({"Content-Type": content_type} if content_type else {})
    body = json.dumps({"prompt": "hi", "messages": USER_HI, "max_tokens": 8}).encode()
    response = await client.post(path, content=body, headers=headers)
    assert "application/json" in refused(response, 415)


async def test_a_prompt_that_leaves_no_room_in_the_context_is_refused(
    client: httpx.AsyncClient, key: str, pool: asyncpg.Pool, input_settings: Settings
):
    counter = tokenizer.load(input_settings)
    prompt = "x" * 24_800
    room = counter.context_tokens - counter.count(prompt, None)
    assert 1 <= room <= input_settings.max_tokens_limit, "the prompt must nearly fill the context"
    before = await counts(pool)
    over = await client.post(
        "/v1/completions", json={"prompt": prompt, "max_tokens": room + 1}, headers=auth(key)
    )
    assert "context" in refused(over, 400, "prompt")
    assert await counts(pool) == before
    fits = await client.post(
        "/v1/jobs",
        json={"prompt": prompt[: len(prompt) // 2], "max_tokens": room},
        headers=auth(key),
    )
    assert fits.status_code == 202, fits.text


async def test_chat_context_counts_the_chat_template(
    client: httpx.AsyncClient, key: str, input_settings: Settings, unchanged
):
    counter = tokenizer.load(input_settings)
    content = "x" * 24_800
    # The raw text would fit with max_tokens = room; the template's own tokens make it not.
    room = counter.context_tokens - counter.count(content, None)
    response = await client.post(
        CHAT,
        json={"messages": [{"role": "user", "content": content}], "max_tokens": room},
        headers=auth(key),
    )
    assert "context" in refused(response, 400, "messages")


async def test_a_timed_out_chat_tells_the_sdk_not_to_retry(app, key: str, pool: asyncpg.Pool):
    """The official SDK retries a 5xx twice by default; a retry would run and bill the question
    again. With `x-should-retry: false` the 504 creates exactly one job."""
    before = await counts(pool)
    async with sdk(app, key) as client:
        assert client.max_retries == 2, "the SDK's default retries are on"
        with pytest.raises(openai.InternalServerError) as timed_out:
            await client.chat.completions.create(model="smollm2", messages=USER_HI, max_tokens=4)
    assert timed_out.value.status_code == 504
    assert timed_out.value.response.headers["x-should-retry"] == "false"
    assert await counts(pool) == (before[0] + 1, before[1] + 1)


async def test_customers_see_what_they_are_charged_never_our_cost(
    client: httpx.AsyncClient, key: str, pool: asyncpg.Pool
):
    job = (
        await client.post("/v1/jobs", json={"prompt": "hi", "max_tokens": 4}, headers=auth(key))
    ).json()
    row = await pool.fetchrow(
        "SELECT customer_id, tier FROM intake.requests WHERE request_id = $1", job["id"]
    )
    booked = UsageBooked(
        producer="ledger",
        customer_id=row["customer_id"],
        request_id=job["id"],
        region="eu-west",
        tier=row["tier"],
        prompt_tokens=3,
        completion_tokens=4,
        energy_j=Decimal("1.5"),
        cost=Decimal("0.004"),
        revenue=Decimal("0.0000125"),
        currency="USD",
        price_version="test",
    )
    async with pool.acquire() as conn:
        await jobs.mark_booked(conn, booked)
    view = (await client.get(f"/v1/jobs/{job['id']}", headers=auth(key))).json()
    assert view["billing"] == {"revenue": "0.0000125", "currency": "USD"}
    (tier,) = (await client.get("/v1/usage", headers=auth(key))).json()["tiers"]
    assert tier["revenue"] == "0.0000125" and "cost" not in tier
    assert "0.004" not in json.dumps(view) + json.dumps(tier)


@pytest.mark.parametrize("idempotency_key", ["", "k" * 256, "order\x00-1", "order\x7f"])
async def test_an_idempotency_key_that_cannot_be_stored_is_refused(
    client: httpx.AsyncClient, key: str, unchanged, idempotency_key: str
):
    response = await client.post(
        "/v1/jobs",
        json={"prompt": "hi", "max_tokens": 8},
        headers={**auth(key), "Idempotency-Key": idempotency_key},
    )
    assert "Idempotency-Key" in refused(response, 400)
