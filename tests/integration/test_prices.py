"""`tokenmill prices` and /admin/v1/prices on real Postgres: new plan versions and negotiated
plans, and bad input refused with a clear message and nothing written."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json

import asyncpg
import httpx
import pytest

from tests.integration.test_journal import book, completion
from tests.integration.test_key_commands import new_customer_key
from tokenmill import cli
from tokenmill.events import new_id
from tokenmill.intake.api import create_app
from tokenmill.intake.main import wire as intake_wire
from tokenmill.settings import Settings

ADMIN_TOKEN = "test-admin-token"


@pytest.fixture
def prices_cli(settings: Settings, monkeypatch, capsys):
    """Run `tokenmill prices ...` on this test run's servers; return (refusal, stdout)."""
    for name, value in settings.to_env().items():
        monkeypatch.setenv(name, value)

    async def run(*argv: str) -> tuple[str | None, str]:
        try:
            await asyncio.to_thread(cli.main, ["prices", *argv])
            refusal = None
        except SystemExit as exc:
            refusal = str(exc)
        return refusal, capsys.readouterr().out

    return run


async def plan_rows(pool: asyncpg.Pool, plan_id: str) -> int:
    return await pool.fetchval(
        "SELECT count(*) FROM ledger.price_plans WHERE plan_id = $1", plan_id
    )


async def test_cli_adds_versions_and_assigns_plans_and_refuses_bad_input(prices_cli, pool):
    plan = f"deal-{new_id().lower()}"
    base = ["set", "--plan", plan, "--version", "v1", "--effective", "2026-06-01T00:00:00Z"]
    prices = ["--input", "0.40", "--cached-input", "0.10"]
    refusal, _ = await prices_cli(*base, *prices, "--output", "1.2x")
    assert refusal == "tokenmill prices set: --output: '1.2x' is not a decimal number"
    refusal, _ = await prices_cli(*base, *prices, "--output-bands", "5000:2,1000:1,:1")
    assert refusal == "tokenmill prices set: band limits must be positive and strictly rising"
    refusal, _ = await prices_cli(*base, *prices)
    assert refusal == "tokenmill prices set: no price for output"
    assert await plan_rows(pool, plan) == 0

    # A new plan may start in the past: nothing was ever rated under it.
    refusal, out = await prices_cli(
        *base, *prices, "--output-bands", "1000000:1.50,:1.00", "--mode", "volume", "--json"
    )
    assert refusal is None
    added = json.loads(out)
    assert added["tiers_mode"] == "volume"
    assert added["bands"]["output"] == [
        {"up_to_tokens": 1000000, "price_per_mtok": "1.50"},
        {"up_to_tokens": None, "price_per_mtok": "1.00"},
    ]
    # Once it has prices, a version in the past would reprice usage already sent.
    refusal, _ = await prices_cli(
        "set", "--plan", plan, "--version", "v0", "--effective", "2026-07-01T00:00:00Z",
        *prices, "--output", "9",
    )  # fmt: skip
    assert refusal is not None and "in the past" in refusal
    assert await plan_rows(pool, plan) == 1

    customer_id, _ = await new_customer_key(pool, "negotiated")
    refusal, _ = await prices_cli(
        "set", "--customer", customer_id, "--plan", "deal-none", "--effective", "2026-06-01T00:00Z"
    )
    assert refusal is not None and "no plan 'deal-none'" in refusal
    refusal, out = await prices_cli(
        "set", "--customer", customer_id, "--plan", plan, "--effective", "2026-06-01T00:00:00Z"
    )
    assert refusal is None and out.startswith(f"{customer_id} pays {plan} from 2026-06-01")
    (booking,) = await book(pool, completion(customer_id))
    assert booking.plan.plan_id == plan
    # Usage is booked under the negotiated plan: moving the customer before it would reprice it.
    refusal, _ = await prices_cli(
        "set", "--customer", customer_id, "--plan", "tier", "--effective", "2026-06-02T00:00:00Z"
    )
    assert refusal is not None and "would reprice" in refusal

    _, listed = await prices_cli("list", "--plan", plan, "--json")
    assert [v["version"] for v in json.loads(listed)] == ["v1"]


@contextlib.asynccontextmanager
async def admin_client(settings: Settings):
    app = create_app(dataclasses.replace(settings, admin_token=ADMIN_TOKEN), intake_wire)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://intake") as client:
            yield client


async def test_admin_api_adds_a_version_and_assigns_a_plan(test_settings: Settings, pool):
    plan = f"deal-{new_id().lower()}"
    body = {
        "plan_id": plan,
        "version": "2027-01",
        "effective_from": "2027-01-01T00:00:00Z",
        "currency": "USD",
        "tiers_mode": "graduated",
        "included_tokens_monthly": 0,
        "quota_policy": "charge",
        "bands": {
            "input": [{"up_to_tokens": None, "price_per_mtok": "0.5"}],
            "cached_input": [{"up_to_tokens": None, "price_per_mtok": "0.25"}],
            "output": [{"up_to_tokens": None, "price_per_mtok": "1.5"}],
        },
    }
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    customer_id, customer_key = await new_customer_key(pool, "api-negotiated")
    async with admin_client(test_settings) as http:
        assert (await http.post("/admin/v1/prices", json=body)).status_code == 401
        as_customer = {"Authorization": f"Bearer {customer_key}"}
        assert (
            await http.post("/admin/v1/prices", json=body, headers=as_customer)
        ).status_code == 403
        bad = {**body, "bands": {**body["bands"], "output": [{"price_per_mtok": "lots"}]}}
        refused = await http.post("/admin/v1/prices", json=bad, headers=admin)
        assert refused.status_code == 400 and "not a decimal" in refused.text
        created = await http.post("/admin/v1/prices", json=body, headers=admin)
        assert created.status_code == 201 and created.json()["version"] == "2027-01"
        again = await http.post("/admin/v1/prices", json=body, headers=admin)
        assert again.status_code == 409
        listed = await http.get("/admin/v1/prices", params={"plan": plan}, headers=admin)
        assert [v["version"] for v in listed.json()] == ["2027-01"]

        path = f"/admin/v1/customers/{customer_id}/plan"
        unknown = await http.post(
            path,
            json={"plan_id": "deal-none", "effective_from": "2027-01-01T00:00:00Z"},
            headers=admin,
        )
        assert unknown.status_code == 404
        assigned = await http.post(
            path, json={"plan_id": plan, "effective_from": "2027-01-01T00:00:00Z"}, headers=admin
        )
        assert assigned.status_code == 201 and assigned.json()["plan_id"] == plan
    assert await plan_rows(pool, plan) == 1


async def test_the_database_refuses_a_plan_version_that_leaves_a_token_class_unpriced(pool):
    plan = f"half-{new_id().lower()}"
    with pytest.raises(asyncpg.CheckViolationError, match="no bands for every token class"):
        async with pool.acquire() as conn, conn.transaction():
            await conn.execute(
                "INSERT INTO ledger.price_plans (plan_id, version, effective_from, currency, "
                "tiers_mode) VALUES ($1, 'v1', '2031-01-01Z', 'USD', 'graduated')",
                plan,
            )
            await conn.execute(
                "INSERT INTO ledger.price_bands VALUES ($1, '2031-01-01Z', 'input', 1, NULL, 1)",
                plan,
            )
    assert (
        await pool.fetchval("SELECT count(*) FROM ledger.price_plans WHERE plan_id = $1", plan) == 0
    )
