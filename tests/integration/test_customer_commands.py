"""`tokenmill customers|budgets|credits|keys create` against real Postgres: every change an
operator makes to a customer's money, without SQL by hand, and bad input changing nothing."""

from __future__ import annotations

import asyncio
import json

import asyncpg
import pytest

from tokenmill import cli
from tokenmill.events import parse_event
from tokenmill.settings import Settings


@pytest.fixture
def tokenmill(settings: Settings, monkeypatch, capsys):
    """Run `tokenmill ...` on this test run's servers; return (exit message, stdout)."""
    for name, value in settings.to_env().items():
        monkeypatch.setenv(name, value)

    async def run(*argv: str) -> tuple[str | int | None, str]:
        try:
            # In a thread: the command runs its own event loop, as from a shell.
            await asyncio.to_thread(cli.main, list(argv))
            refusal = None
        except SystemExit as exc:
            refusal = exc.code
        return refusal, capsys.readouterr().out

    return run


async def balance(pool: asyncpg.Pool, customer_id: str) -> dict:
    row = await pool.fetchrow(
        "SELECT * FROM intake.admission_balances WHERE customer_id = $1", customer_id
    )
    return dict(row)


async def test_customers_are_created_listed_retiered_suspended_and_resumed(tokenmill):
    refusal, out = await tokenmill("customers", "create", "--name", "acme", "--key", "--json")
    assert refusal is None
    created = json.loads(out)
    customer_id = created["customer_id"]
    assert created["api_key"].startswith("tm_") and created["admission"]["postpaid"]

    refusal, out = await tokenmill("customers", "list")
    assert refusal is None and f"{customer_id}  acme  standard" in out

    refusal, out = await tokenmill("customers", "set-tier", customer_id, "premium", "--json")
    assert json.loads(out)["tier"] == "premium"
    refusal, out = await tokenmill("customers", "suspend", customer_id)
    assert "every intake refuses its keys within 1 s" in out
    refusal, out = await tokenmill("customers", "suspend", customer_id)
    assert "already suspended, nothing changed" in out
    refusal, out = await tokenmill("customers", "resume", customer_id, "--json")
    assert json.loads(out)["suspended_at"] is None

    refusal, _ = await tokenmill("customers", "suspend", "cus_nonesuch")
    assert refusal == "tokenmill customers suspend: no customer 'cus_nonesuch'"


async def test_keys_create_makes_a_new_customer_or_a_second_key_of_one(tokenmill, pool):
    refusal, out = await tokenmill("keys", "create", "--name", "first", "--tier", "free")
    assert refusal is None
    first_line, key_line = out.splitlines()
    customer_id = first_line.split()[1]
    assert first_line == f"customer {customer_id} (free, eu-west)"
    assert key_line.startswith("API key (shown once): tm_")

    refusal, out = await tokenmill("keys", "create", "--customer", customer_id)
    assert refusal is None and out.startswith(f"customer {customer_id}\nAPI key (shown once)")
    keys = await pool.fetchval(
        "SELECT count(*) FROM intake.api_keys WHERE customer_id = $1", customer_id
    )
    assert keys == 2
    refusal, _ = await tokenmill("keys", "create", "--customer", "cus_nonesuch")
    assert "no customer 'cus_nonesuch'" in refusal
    refusal, _ = await tokenmill("keys", "create")
    assert "give --name" in refusal


async def test_budgets_and_credits_change_the_balance_and_bad_amounts_change_nothing(
    tokenmill, pool
):
    _, out = await tokenmill("customers", "create", "--name", "money", "--json")
    customer_id = json.loads(out)["customer_id"]

    refusal, out = await tokenmill("budgets", "set", customer_id, "--monthly", "25.00")
    assert refusal is None and "monthly budget 25.00 USD a month" in out
    refusal, out = await tokenmill("credits", "add", customer_id, "10.5", "--reference", "p-1")
    assert refusal is None and "prepaid credit +10.50 USD, balance 10.50 USD" in out
    before = await balance(pool, customer_id)
    outbox = await pool.fetchval("SELECT count(*) FROM intake.outbox")
    for argv, needle in [
        (("budgets", "set", customer_id, "--monthly", "25.001"), "at most 2 decimal places"),
        (("budgets", "set", customer_id, "--monthly", "-1"), "positive"),
        (("credits", "add", customer_id, "0"), "positive"),
        (("credits", "add", customer_id, "ten"), "decimal amount"),
        (("credits", "add", customer_id, "NaN"), "positive"),
        (("credits", "add", "cus_nonesuch", "5"), "no customer"),
    ]:
        refusal, _ = await tokenmill(*argv)
        assert isinstance(refusal, str) and needle in refusal, (argv, refusal)
    assert await balance(pool, customer_id) == before
    assert await pool.fetchval("SELECT count(*) FROM intake.outbox") == outbox

    refusal, out = await tokenmill("budgets", "set", customer_id, "--clear", "--json")
    assert json.loads(out)["admission"]["monthly_budget"] is None


async def test_reconcile_exits_non_zero_until_the_ledger_has_the_top_up(tokenmill, pool):
    _, out = await tokenmill("customers", "create", "--name", "recon", "--json")
    customer_id = json.loads(out)["customer_id"]
    _, out = await tokenmill("credits", "add", customer_id, "7.25", "--json")
    event_id = json.loads(out)["event_id"]

    refusal, out = await tokenmill("budgets", "reconcile", "--customer", customer_id)
    assert refusal == 1
    assert "top-ups 7.25 / 0  DIFFERS" in out and "1 of 1 customer-periods differ" in out

    # As the ledger logs the event the intake queued (its consumer reads streams.billing).
    body = await pool.fetchval("SELECT body FROM intake.outbox WHERE event_id = $1", event_id)
    event = parse_event(body)
    await pool.execute(
        "INSERT INTO ledger.events (event_id, event_type, stream, customer_id, request_id, "
        "occurred_at, body) VALUES ($1, $2, 'billing', $3, '', $4, $5)",
        event.event_id,
        event.type,
        customer_id,
        event.occurred_at,
        body,
    )
    refusal, out = await tokenmill("budgets", "reconcile", "--customer", customer_id, "--json")
    assert refusal is None
    report = json.loads(out)
    assert report["matches"] and report["periods"][0]["ledger_topups"] == "7.25"
