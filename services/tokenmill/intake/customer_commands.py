"""The operator's customer and money commands: `tokenmill customers|budgets|credits ...`.

Each talks to Postgres directly, like `tokenmill keys`, and takes `--json` for scripts. Bad
input (an unknown customer, an amount that is not whole cents) is a clear error that changes
nothing.
"""

from __future__ import annotations

import argparse
import json
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from tokenmill.db import connect
from tokenmill.events import TIERS
from tokenmill.intake import admission, customers
from tokenmill.settings import Settings
from tokenmill.streams import Streams

COMMANDS = ("customers", "budgets", "credits")


def add_commands(commands: argparse._SubParsersAction) -> None:
    actions = commands.add_parser("customers", help="manage customers").add_subparsers(
        dest="action", required=True
    )
    create = actions.add_parser("create", help="create a customer (postpaid until given money)")
    create.add_argument("--name", required=True)
    create.add_argument("--tier", choices=TIERS, default="standard")
    create.add_argument("--region", default=None)
    create.add_argument("--key", action="store_true", help="also create its first API key")
    listed = [create, actions.add_parser("list", help="every customer with its balance")]
    for name, text in (
        ("show", "one customer with its admission balance"),
        ("suspend", "refuse every key of the customer (403) on every intake within 1 s"),
        ("resume", "accept the customer's keys again"),
    ):
        listed.append(actions.add_parser(name, help=text))
        listed[-1].add_argument("customer_id")
    tier = actions.add_parser("set-tier", help="move a customer to another tier")
    tier.add_argument("customer_id")
    tier.add_argument("tier", choices=TIERS)
    listed.append(tier)

    budgets = commands.add_parser("budgets", help="monthly budgets and reconciliation")
    budget_actions = budgets.add_subparsers(dest="action", required=True)
    set_budget = budget_actions.add_parser("set", help="set or clear a monthly budget")
    set_budget.add_argument("customer_id")
    amount = set_budget.add_mutually_exclusive_group(required=True)
    amount.add_argument("--monthly", help="the budget per calendar month (UTC), e.g. 25.00")
    amount.add_argument("--clear", action="store_true", help="no monthly budget")
    reconcile = budget_actions.add_parser(
        "reconcile", help="intake's settled amounts beside the ledger's; exit 1 if they differ"
    )
    reconcile.add_argument("--customer", default=None, help="only this customer")
    listed += [set_budget, reconcile]

    credit_actions = commands.add_parser("credits", help="prepaid credit").add_subparsers(
        dest="action", required=True
    )
    add = credit_actions.add_parser("add", help="top up a customer's prepaid credit")
    add.add_argument("customer_id")
    add.add_argument("amount", help="a positive amount of at most 2 decimal places")
    add.add_argument("--reference", default="", help="e.g. the payment's id")
    listed.append(add)
    for command in listed:
        command.add_argument("--json", action="store_true", help="machine-readable output")


async def command(settings: Settings, args: argparse.Namespace) -> tuple[str, bool]:
    """Run one command; return its output and whether it succeeded. Raises LookupError or
    ValueError, having changed nothing, for input it cannot act on."""
    conn = await connect(settings.database_url)
    try:
        handler = _HANDLERS[(args.command, args.action)]
        return await handler(conn, settings, args)
    finally:
        await conn.close()


async def _create(conn, settings: Settings, args) -> tuple[str, bool]:
    region = args.region or settings.region
    customer, key = await customers.create(conn, args.name, args.tier, region, args.key)
    if args.json:
        return _json({**await customers.show(conn, customer.customer_id), "api_key": key}), True
    lines = [f"customer {customer.customer_id} ({customer.tier}, {customer.region})"]
    if key is not None:
        lines.append(f"API key (shown once): {key}")
    return "\n".join(lines), True


async def _list(conn, _settings: Settings, args) -> tuple[str, bool]:
    found = await customers.listing(conn)
    if args.json:
        return _json(found), True
    return ("\n".join(map(_line, found)) if found else "no customers"), True


async def _show(conn, _settings: Settings, args) -> tuple[str, bool]:
    found = await customers.show(conn, args.customer_id)
    if args.json:
        return _json(found), True
    money = found["admission"]
    lines = [_line(found)] + [f"  {name}: {value}" for name, value in money.items()]
    return "\n".join(lines), True


async def _suspend(conn, settings: Settings, args) -> tuple[str, bool]:
    suspending = args.action == "suspend"
    found, changed = await customers.set_suspended(conn, args.customer_id, suspending)
    if args.json:
        return _json({**found, "changed": changed}), True
    if not changed:
        state = "suspended" if suspending else "active"
        return f"{_line(found)}: already {state}, nothing changed", True
    within = f"within {settings.key_revocation_s_max:g} s"
    if suspending:
        return f"{_line(found)}: every intake refuses its keys {within}", True
    return f"{_line(found)}: its keys work again on every intake {within}", True


async def _set_tier(conn, _settings: Settings, args) -> tuple[str, bool]:
    found = await customers.set_tier(conn, args.customer_id, args.tier)
    return (_json(found) if args.json else _line(found)), True


async def _set_budget(conn, _settings: Settings, args) -> tuple[str, bool]:
    monthly = None if args.clear else admission.parse_amount(args.monthly, "--monthly")
    await admission.set_budget(conn, args.customer_id, monthly)
    found = await customers.show(conn, args.customer_id)
    if args.json:
        return _json(found), True
    money = found["admission"]
    budget = "cleared" if monthly is None else f"{monthly} {money['currency']} a month"
    return (
        f"{found['customer_id']}: monthly budget {budget}; this month held {money['held']}, "
        f"settled {money['settled']} {money['currency']}"
    ), True


async def _add_credit(conn, settings: Settings, args) -> tuple[str, bool]:
    amount = admission.parse_amount(args.amount, "the amount")
    billing = Streams(settings.stream_prefix).billing
    event, balance = await admission.add_credit(
        conn, billing, args.customer_id, amount, args.reference
    )
    view = admission.balance_view(balance, datetime.now(UTC).date())
    if args.json:
        return _json(
            {
                "customer_id": args.customer_id,
                "event_id": event.event_id,
                "amount": str(amount),
                "admission": view,
            }
        ), True
    return (
        f"{args.customer_id}: prepaid credit +{amount} {event.currency}, balance "
        f"{view['prepaid_balance']} {event.currency} (event {event.event_id})"
    ), True


async def _reconcile(conn, _settings: Settings, args) -> tuple[str, bool]:
    rows = await admission.reconcile(conn, args.customer)
    differ = [row for row in rows if not row["matches"]]
    if args.json:
        return _json({"matches": not differ, "periods": rows}), not differ
    if not rows:
        return "nothing booked or topped up yet", True
    lines = [
        f"{r['customer_id']}  {r['period']}  settled {r['intake_settled']} / booked "
        f"{r['ledger_revenue']}  top-ups {r['intake_topups']} / {r['ledger_topups']}  "
        + ("ok" if r["matches"] else "DIFFERS")
        for r in rows
    ]
    lines.append(f"{len(differ)} of {len(rows)} customer-periods differ" if differ else "all match")
    return "\n".join(lines), not differ


def _line(found: dict[str, Any]) -> str:
    money = found["admission"]
    state = f"suspended {found['suspended_at']}" if found["suspended_at"] else "active"
    limits = ", ".join(
        f"{name} {money[key]}"
        for name, key in (("budget", "monthly_budget"), ("prepaid", "prepaid_balance"))
        if money[key] is not None
    )
    if money["postpaid"]:
        limits = "postpaid"
    elif not limits:
        limits = f"quota: {money['tokens_used']} tokens used this month"
    return (
        f"{found['customer_id']}  {found['name']}  {found['tier']}  {found['region']}  {state}  "
        f"keys {found['active_keys']}  {limits}"
    )


def _json(value: object) -> str:
    return json.dumps(value, indent=2, default=_decimal)


def _decimal(value: object) -> str:
    assert isinstance(value, Decimal), value
    return str(value)


_HANDLERS = {
    ("customers", "create"): _create,
    ("customers", "list"): _list,
    ("customers", "show"): _show,
    ("customers", "suspend"): _suspend,
    ("customers", "resume"): _suspend,
    ("customers", "set-tier"): _set_tier,
    ("budgets", "set"): _set_budget,
    ("budgets", "reconcile"): _reconcile,
    ("credits", "add"): _add_credit,
}
