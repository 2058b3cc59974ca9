"""The journal: postings of balanced legs, written in bulk, and account balances as of a time.

Amounts are signed: a debit is positive, a credit negative, so an account's balance is the
sum of its legs. A posting's legs sum to zero per currency; `Posting` checks that before
anything is written, and the database checks it again at commit (migrations/0007_journal.sql).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import NamedTuple

import asyncpg

# A summary usage posting has a leg per customer account it moves: up to two per request of
# a batch (ledger_batch_max), in as many postings as it takes.
LEGS_MAX = 4096
DESCRIPTION_CHARS_MAX = 500

# Account type by the first part of its id (the contract's naming; docs/architecture.md).
_TYPES_BY_PREFIX = {
    "revenue": "revenue",
    "credits": "contra_revenue",
    "expense": "expense",
    "accrued": "liability",
    "cash": "asset",
    "equity": "equity",
}
_CUSTOMER_TYPES = {"receivable": "asset", "prepaid": "liability"}


class UnbalancedPosting(ValueError):
    """A posting whose legs do not sum to zero per currency, or that has too few legs."""


def account_type(account_id: str) -> str:
    parts = account_id.split(":")
    if parts[0] == "customer" and len(parts) == 3 and parts[2] in _CUSTOMER_TYPES:
        return _CUSTOMER_TYPES[parts[2]]
    if parts[0] in _TYPES_BY_PREFIX:
        return _TYPES_BY_PREFIX[parts[0]]
    raise ValueError(f"no account type for {account_id!r}")


def receivable(customer_id: str) -> str:
    return f"customer:{customer_id}:receivable"


def prepaid(customer_id: str) -> str:
    return f"customer:{customer_id}:prepaid"


class Leg(NamedTuple):
    """One side of a posting. A tuple, not a dataclass: cheaper to build by the thousand."""

    account_id: str
    amount: Decimal
    currency: str


@dataclass(frozen=True)
class Posting:
    event_id: str
    kind: str
    description: str
    effective_at: datetime
    legs: tuple[Leg, ...]
    customer_id: str = ""
    request_id: str = ""

    def __post_init__(self) -> None:
        check_balanced(self.legs)
        assert len(self.description) <= DESCRIPTION_CHARS_MAX, self.description


def check_balanced(legs: tuple[Leg, ...]) -> None:
    """Raise UnbalancedPosting unless `legs` are 2..LEGS_MAX non-zero amounts that sum to zero
    in each currency."""
    if not 2 <= len(legs) <= LEGS_MAX:
        raise UnbalancedPosting(f"a posting needs 2 to {LEGS_MAX} legs, not {len(legs)}")
    if any(leg.amount == 0 for leg in legs):
        raise UnbalancedPosting("a leg of zero says nothing; leave it out")
    sums: dict[str, Decimal] = defaultdict(Decimal)
    for leg in legs:
        sums[leg.currency] += leg.amount
    unbalanced = {currency: total for currency, total in sums.items() if total != 0}
    if unbalanced:
        raise UnbalancedPosting(f"legs do not sum to zero: {unbalanced}")


def legs(currency: str, *amounts: tuple[str, Decimal]) -> tuple[Leg, ...]:
    """Legs in one currency from (account, signed amount) pairs, leaving out the zero ones."""
    return tuple(Leg(account, amount, currency) for account, amount in amounts if amount != 0)


async def write(conn: asyncpg.Connection, postings: list[Posting]) -> list[int]:
    """Write `postings` and their legs in bulk, creating the accounts they name; return the
    postings' ids, in order.

    Call inside the transaction that applied the events the postings are for: the database
    checks at its commit that every posting balances, and the postings' (event, kind) keys
    refuse a second posting for the same event.
    """
    assert conn.is_in_transaction(), "postings are written with the change that caused them"
    if not postings:
        return []
    await _ensure_accounts(
        conn, {(leg.account_id, leg.currency) for p in postings for leg in p.legs}
    )
    posting_ids = await conn.fetchval(
        "SELECT array_agg(nextval(pg_get_serial_sequence('ledger.postings', 'posting_id'))) "
        "FROM generate_series(1, $1)",
        len(postings),
    )
    await conn.copy_records_to_table(
        "postings",
        schema_name="ledger",
        columns=[
            "posting_id",
            "event_id",
            "kind",
            "customer_id",
            "request_id",
            "description",
            "effective_at",
        ],
        records=[
            (pid, p.event_id, p.kind, p.customer_id, p.request_id, p.description, p.effective_at)
            for pid, p in zip(posting_ids, postings, strict=True)
        ],
    )
    await conn.copy_records_to_table(
        "posting_legs",
        schema_name="ledger",
        columns=["posting_id", "leg_no", "account_id", "amount", "currency"],
        records=[
            (pid, leg_no, leg.account_id, leg.amount, leg.currency)
            for pid, p in zip(posting_ids, postings, strict=True)
            for leg_no, leg in enumerate(p.legs, start=1)
        ],
    )
    return posting_ids


async def _ensure_accounts(conn: asyncpg.Connection, pairs: Iterable[tuple[str, str]]) -> None:
    ordered = sorted(pairs)
    await conn.execute(
        "INSERT INTO ledger.accounts (account_id, type, currency) "
        "SELECT * FROM unnest($1::text[], $2::text[], $3::text[]) "
        # No conflict target: an account another transaction is creating meanwhile conflicts
        # on (account_id, currency) too, which a target of account_id alone would raise on.
        "ON CONFLICT DO NOTHING",
        [account for account, _ in ordered],
        [account_type(account) for account, _ in ordered],
        [currency for _, currency in ordered],
    )


async def balance(conn: asyncpg.Connection, account_id: str, at: datetime | None = None) -> Decimal:
    """The account's balance (debits positive) from the postings effective at `at` or before;
    now when `at` is None."""
    return await conn.fetchval(
        "SELECT ledger.account_balance($1, coalesce($2, now()))", account_id, at
    )


async def balances(conn: asyncpg.Connection, at: datetime | None = None) -> dict[str, Decimal]:
    """Every account's balance as of `at` (now when None), from its postings."""
    rows = await conn.fetch(
        "SELECT a.account_id, coalesce(sum(l.amount) FILTER (WHERE p.effective_at <= "
        "coalesce($1, now())), 0) AS balance FROM ledger.accounts a "
        "LEFT JOIN ledger.posting_legs l USING (account_id) "
        "LEFT JOIN ledger.postings p USING (posting_id) GROUP BY a.account_id",
        at,
    )
    return {r["account_id"]: r["balance"] for r in rows}
