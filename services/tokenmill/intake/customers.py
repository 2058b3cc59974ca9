"""Customers as an operator manages them: create, list, show, change tier, suspend, resume.

The CLI (customer_commands.py) and the admin API (admin_customers.py) both call these, so the
two can never disagree on what a change means. A suspension or a tier change updates the
customer's row, whose trigger (migration 0004) tells every intake's key cache at commit: a
suspended customer's keys are refused within `key_revocation_s_max` on every process.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import asyncpg

from tokenmill.events import TIERS
from tokenmill.intake import admission
from tokenmill.intake.keys import Customer, create_customer, issue_key

NAME_CHARS_MAX = 200
# `customers list` shows at most this many, oldest first.
CUSTOMERS_LISTED_MAX = 1000

_SELECT = (
    "SELECT c.customer_id, c.name, c.tier, c.region, c.created_at, c.suspended_at, "
    "(SELECT count(*) FROM intake.api_keys k WHERE k.customer_id = c.customer_id "
    " AND k.revoked_at IS NULL) AS active_keys, b.currency, b.monthly_budget, b.prepaid_balance, "
    "b.held, b.period, b.period_held, b.period_settled, b.period_tokens_held, "
    "b.period_tokens_used, (SELECT p.quota_policy FROM "
    "ledger.plan_at(ledger.plan_for(c.customer_id, c.tier, now()), now()) p) AS quota_policy "
    "FROM intake.customers c JOIN intake.admission_balances b USING (customer_id) "
)


def check_name(name: str) -> str:
    if not name.strip() or len(name) > NAME_CHARS_MAX or "\x00" in name:
        raise ValueError(f"the name must be 1 to {NAME_CHARS_MAX} characters (no NUL)")
    return name


def check_tier(tier: str) -> str:
    if tier not in TIERS:
        raise ValueError(f"tier must be one of {', '.join(TIERS)}, not {tier!r}")
    return tier


async def create(
    conn: asyncpg.Connection, name: str, tier: str, region: str, with_key: bool
) -> tuple[Customer, str | None]:
    """A new customer (postpaid until given a budget or credit) and, if asked, its first key."""
    check_name(name)
    check_tier(tier)
    async with conn.transaction():
        customer = await create_customer(conn, name, tier, region)
        key = await issue_key(conn, customer.customer_id) if with_key else None
    return customer, key


async def new_key(conn: asyncpg.Connection, customer_id: str) -> str:
    """Another key for an existing customer; LookupError if there is none of that id."""
    async with conn.transaction():
        await _locked(conn, customer_id)
        return await issue_key(conn, customer_id)


async def listing(conn: asyncpg.Connection) -> list[dict[str, Any]]:
    rows = await conn.fetch(
        _SELECT + "ORDER BY c.created_at, c.customer_id LIMIT $1", CUSTOMERS_LISTED_MAX
    )
    return [view(row) for row in rows]


async def show(conn: asyncpg.Connection, customer_id: str) -> dict[str, Any]:
    row = await conn.fetchrow(_SELECT + "WHERE c.customer_id = $1", customer_id)
    if row is None:
        raise LookupError(f"no customer {customer_id!r}")
    return view(row)


async def set_tier(conn: asyncpg.Connection, customer_id: str, tier: str) -> dict[str, Any]:
    """Move the customer to `tier`: requests admitted from now on are held and rated at it."""
    check_tier(tier)
    await _update(conn, customer_id, "tier = $2", tier)
    return await show(conn, customer_id)


async def set_suspended(
    conn: asyncpg.Connection, customer_id: str, suspended: bool
) -> tuple[dict[str, Any], bool]:
    """Suspend (or resume) the customer; return it and whether anything changed."""
    changed = await _update(
        conn,
        customer_id,
        "suspended_at = CASE WHEN $2 THEN coalesce(suspended_at, now()) END",
        suspended,
        only_if="(suspended_at IS NOT NULL) <> $2",
    )
    return await show(conn, customer_id), changed


async def _update(
    conn: asyncpg.Connection, customer_id: str, assignment: str, value: object, only_if="true"
) -> bool:
    async with conn.transaction():
        await _locked(conn, customer_id)
        status = await conn.execute(
            f"UPDATE intake.customers SET {assignment} WHERE customer_id = $1 AND {only_if}",
            customer_id,
            value,
        )
    return status != "UPDATE 0"


async def _locked(conn: asyncpg.Connection, customer_id: str) -> None:
    # NO KEY UPDATE: admissions hold KEY SHARE on the customer (the request's foreign key)
    # and need not wait for an operator's change, nor it for them.
    if "\x00" in customer_id or not await conn.fetchval(
        "SELECT true FROM intake.customers WHERE customer_id = $1 FOR NO KEY UPDATE", customer_id
    ):
        raise LookupError(f"no customer {customer_id!r}")


def view(row: asyncpg.Record) -> dict[str, Any]:
    """A customer as the CLI's --json and the admin API show it."""
    return {
        "customer_id": row["customer_id"],
        "name": row["name"],
        "tier": row["tier"],
        "region": row["region"],
        "created_at": row["created_at"].isoformat(),
        "suspended_at": row["suspended_at"].isoformat() if row["suspended_at"] else None,
        "active_keys": row["active_keys"],
        "admission": admission.balance_view(row, datetime.now(UTC).date()),
    }
