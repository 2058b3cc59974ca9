"""GET /v1/jobs/{id}/events: a customer sees its request's events with their place in the
ledger's hash chain, and never another customer's."""

from __future__ import annotations

import asyncpg
import httpx

from tests.integration.test_intake_api import auth, client, new_key
from tokenmill.events import JobStarted
from tokenmill.ledger import chain

__all__ = ["client"]  # A fixture, used by name.


async def _log(pool: asyncpg.Pool, request_id: str, customer_id: str) -> JobStarted:
    event = JobStarted(
        producer="worker",
        customer_id=customer_id,
        request_id=request_id,
        region="eu-west",
        worker="w",
        queue_ms=1.0,
    )
    await pool.execute(
        "INSERT INTO ledger.events (event_id, event_type, stream, customer_id, request_id, "
        "occurred_at, body) VALUES ($1, $2, 'tm.progress', $3, $4, $5, $6)",
        event.event_id,
        event.type,
        event.customer_id,
        event.request_id,
        event.occurred_at,
        event.canonical_json(),
    )
    return event


async def test_a_job_shows_its_events_with_their_chain_hashes(
    client: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    owner, stranger = await new_key(pool), await new_key(pool)
    job = (
        await client.post("/v1/jobs", json={"prompt": "hi", "max_tokens": 4}, headers=auth(owner))
    ).json()
    customer_id = await pool.fetchval(
        "SELECT customer_id FROM intake.requests WHERE request_id = $1", job["id"]
    )
    event = await _log(pool, job["id"], customer_id)

    unsealed = (await client.get(f"/v1/jobs/{job['id']}/events", headers=auth(owner))).json()
    assert unsealed["object"] == "list" and unsealed["job_id"] == job["id"]
    (only,) = unsealed["data"]
    assert (only["event_id"], only["type"], only["hash"]) == (event.event_id, "job.started", None)

    await chain.seal(pool, 1000)
    sealed = (await client.get(f"/v1/jobs/{job['id']}/events", headers=auth(owner))).json()
    stored = await pool.fetchrow(
        "SELECT position, hash FROM ledger.event_chain WHERE event_seq = $1", only["seq"]
    )
    assert sealed["data"][0]["position"] == stored["position"]
    assert sealed["data"][0]["hash"] == stored["hash"].hex()

    hidden = await client.get(f"/v1/jobs/{job['id']}/events", headers=auth(stranger))
    assert hidden.status_code == 404
    assert hidden.headers["content-type"].startswith("application/problem+json")
