"""The admin API for customers, keys, budgets and prepaid credit, on real Postgres and Redis:
only the admin credential opens it, and what it changes reaches every intake process."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import AsyncIterator
from decimal import Decimal

import asyncpg
import httpx
import pytest

from tests.integration.helpers import eventually
from tokenmill.events import PrepaidCreditAdded, parse_event
from tokenmill.intake.api import create_app
from tokenmill.intake.main import wire
from tokenmill.settings import Settings
from tokenmill.streams import Streams

ADMIN_TOKEN = "test-admin-token-0123456789"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
JOB = {"prompt": "Name three colours.", "max_tokens": 8}
# (method, path, body) of every route this module serves, with a customer that may not exist.
ROUTES = [
    ("POST", "/admin/v1/customers", {"name": "x"}),
    ("GET", "/admin/v1/customers", None),
    ("GET", "/admin/v1/customers/cus_x", None),
    ("PUT", "/admin/v1/customers/cus_x/tier", {"tier": "premium"}),
    ("POST", "/admin/v1/customers/cus_x/suspend", None),
    ("POST", "/admin/v1/customers/cus_x/resume", None),
    ("POST", "/admin/v1/customers/cus_x/keys", None),
    ("PUT", "/admin/v1/customers/cus_x/budget", {"monthly": "5.00"}),
    ("POST", "/admin/v1/customers/cus_x/credits", {"amount": "5.00"}),
    ("GET", "/admin/v1/keys", None),
    ("POST", "/admin/v1/keys/revoke", {"key": "key_x"}),
    ("GET", "/admin/v1/admission/reconcile", None),
]


@contextlib.asynccontextmanager
async def intake(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """One intake process's app, with its own key cache and listener."""
    app = create_app(settings, wire)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://intake") as http:
            yield http


@pytest.fixture
def admin_settings(test_settings: Settings) -> Settings:
    return dataclasses.replace(test_settings, admin_token=ADMIN_TOKEN)


@pytest.fixture
async def client(admin_settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    async with intake(admin_settings) as http:
        yield http


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def new_customer(client: httpx.AsyncClient, **body) -> dict:
    response = await client.post(
        "/admin/v1/customers", json={"name": "acme", "key": True, **body}, headers=ADMIN
    )
    assert response.status_code == 201, response.text
    return response.json()


async def test_no_token_is_401_and_a_customer_key_is_403_on_every_route(
    client: httpx.AsyncClient, pool: asyncpg.Pool
):
    customer_key = (await new_customer(client))["api_key"]
    before = await pool.fetchval("SELECT count(*) FROM intake.customers")
    for method, path, body in ROUTES:
        anonymous = await client.request(method, path, json=body)
        assert anonymous.status_code == 401, (path, anonymous.text)
        assert anonymous.headers["content-type"] == "application/problem+json"
        wrong = await client.request(method, path, json=body, headers=auth("not-the-token"))
        assert wrong.status_code == 401, (path, wrong.text)
        as_customer = await client.request(method, path, json=body, headers=auth(customer_key))
        assert as_customer.status_code == 403, (path, as_customer.text)
        assert "admin credential" in as_customer.json()["detail"]
    assert await pool.fetchval("SELECT count(*) FROM intake.customers") == before


async def test_the_admin_manages_a_customer_from_creation_to_reconciliation(
    client: httpx.AsyncClient, pool: asyncpg.Pool, admin_settings: Settings
):
    created = await new_customer(client, tier="standard")
    customer_id, key = created["customer_id"], created["api_key"]
    assert created["admission"]["postpaid"] and created["active_keys"] == 1
    listed = (await client.get("/admin/v1/customers", headers=ADMIN)).json()["data"]
    assert customer_id in [c["customer_id"] for c in listed]

    tiered = await client.put(
        f"/admin/v1/customers/{customer_id}/tier", json={"tier": "premium"}, headers=ADMIN
    )
    assert tiered.status_code == 200 and tiered.json()["tier"] == "premium"

    budget = await client.put(
        f"/admin/v1/customers/{customer_id}/budget", json={"monthly": "12.50"}, headers=ADMIN
    )
    assert budget.json()["admission"]["monthly_budget"] == "12.50"
    assert not budget.json()["admission"]["postpaid"]

    credit = await client.post(
        f"/admin/v1/customers/{customer_id}/credits",
        json={"amount": "10.00", "reference": "payment 42"},
        headers=ADMIN,
    )
    assert credit.status_code == 201, credit.text
    assert credit.json()["admission"]["prepaid_balance"] == "10.00"
    queued = await pool.fetchrow(
        "SELECT stream, body FROM intake.outbox WHERE event_id = $1", credit.json()["event_id"]
    )
    event = parse_event(queued["body"])
    assert isinstance(event, PrepaidCreditAdded) and event.amount == Decimal("10.00")
    assert queued["stream"] == Streams(admin_settings.stream_prefix).billing

    second = await client.post(f"/admin/v1/customers/{customer_id}/keys", headers=ADMIN)
    assert second.status_code == 201
    second_key = second.json()["api_key"]
    by_prefix = await client.get(
        "/admin/v1/keys", params={"prefix": second_key[:10]}, headers=ADMIN
    )
    assert [k["customer_id"] for k in by_prefix.json()["data"]] == [customer_id]
    revoked = await client.post(
        "/admin/v1/keys/revoke", json={"key": second_key[:10]}, headers=ADMIN
    )
    assert revoked.status_code == 200 and revoked.json()["revoked_now"]

    async def second_key_refused() -> bool:
        return (await client.get("/v1/usage", headers=auth(second_key))).status_code == 401

    await eventually(second_key_refused, timeout_s=1.0)
    assert (await client.post("/v1/jobs", json=JOB, headers=auth(key))).status_code == 202

    reconciled = await client.get("/admin/v1/admission/reconcile", headers=ADMIN)
    mine = [p for p in reconciled.json()["periods"] if p["customer_id"] == customer_id]
    # The ledger is not running here: the top-up is on the intake's side only.
    assert mine[0]["intake_topups"] == "10.00" and not mine[0]["matches"]


@pytest.mark.parametrize(
    ("path", "body", "status", "needle"),
    [
        ("credits", {"amount": "0"}, 400, "positive"),
        ("credits", {"amount": "1.001"}, 400, "amount"),
        ("credits", {"amount": 5}, 400, "amount"),
        ("credits", {"amount": "-5"}, 400, "amount"),
        ("budget", {"monthly": "abc"}, 400, "monthly"),
        ("budget", {}, 400, "monthly"),
        ("tier", {"tier": "gold"}, 400, "tier"),
    ],
)
async def test_bad_input_is_400_and_changes_nothing(
    client: httpx.AsyncClient, pool: asyncpg.Pool, path, body, status, needle
):
    customer_id = (await new_customer(client))["customer_id"]
    before = await pool.fetchrow(
        "SELECT b.*, c.tier FROM intake.admission_balances b JOIN intake.customers c "
        "USING (customer_id) WHERE customer_id = $1",
        customer_id,
    )
    method = "POST" if path == "credits" else "PUT"
    url = f"/admin/v1/customers/{customer_id}/{path}"
    response = await client.request(method, url, json=body, headers=ADMIN)
    assert response.status_code == status, response.text
    assert needle in response.json()["detail"], response.text
    after = await pool.fetchrow(
        "SELECT b.*, c.tier FROM intake.admission_balances b JOIN intake.customers c "
        "USING (customer_id) WHERE customer_id = $1",
        customer_id,
    )
    assert dict(after) == dict(before)


async def test_an_unknown_customer_is_404_and_nothing_is_queued(
    client: httpx.AsyncClient, pool: asyncpg.Pool
):
    before = await pool.fetchval("SELECT count(*) FROM intake.outbox")
    for method, path, body in ROUTES[2:9]:
        response = await client.request(method, path, json=body, headers=ADMIN)
        assert response.status_code == 404, (path, response.text)
        assert "cus_x" in response.json()["detail"]
    assert await pool.fetchval("SELECT count(*) FROM intake.outbox") == before


async def test_a_revoked_key_and_a_suspended_customer_are_refused_by_a_second_intake(
    client: httpx.AsyncClient, admin_settings: Settings
):
    revoked_key = (await new_customer(client))["api_key"]
    suspended = await new_customer(client)
    async with intake(admin_settings) as second:
        for key in (revoked_key, suspended["api_key"]):
            assert (await second.get("/v1/usage", headers=auth(key))).status_code == 200
        # Each change made through the first intake, refused by the second's cache.
        revoked = await client.post(
            "/admin/v1/keys/revoke", json={"key": revoked_key}, headers=ADMIN
        )
        assert revoked.status_code == 200
        suspension = await client.post(
            f"/admin/v1/customers/{suspended['customer_id']}/suspend", headers=ADMIN
        )
        assert suspension.json()["changed"] and suspension.json()["suspended_at"]

        async def both_refused() -> bool:
            gone = await second.get("/v1/usage", headers=auth(revoked_key))
            barred = await second.post("/v1/jobs", json=JOB, headers=auth(suspended["api_key"]))
            return gone.status_code == 401 and barred.status_code == 403

        await eventually(both_refused, timeout_s=1.0)
