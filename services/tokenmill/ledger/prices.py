"""Prices as the operator sets them: new plan versions and negotiated plans, checked before
anything is written (`tokenmill prices set|list` and /admin/v1/prices share this module).

A price change is a new version with its own effective_from; it never reprices usage that was
booked before it. So a version (or a customer's plan) that would take effect before usage
already booked under the plan (or for the customer) is refused, and an existing plan cannot be
changed in the past at all: requests submitted since then may still be on their way to the
ledger, and would be rated at a price nobody saw when they were sent.
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Mapping
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation

import asyncpg

from tokenmill.ledger.plans import describe, load_version
from tokenmill.ledger.rating import TOKEN_CLASSES, Band, PlanVersion, TokenClass
from tokenmill.settings import Settings

# Back to the tier's public plan (ledger.customer_plans.plan_id NULL).
TIER_PLAN = "tier"
# What ledger.price_plans accepts as a plan name (its CHECK), and sane bounds on numbers, so
# bad input is a clear refusal here, never a database error.
PLAN_ID = re.compile(r"^[a-z0-9][a-z0-9:._-]{0,63}$")
TOKENS_MAX = 2**62
PRICE_PER_MTOK_MAX = Decimal(1_000_000_000)


class PriceError(Exception):
    """Bad input for a price change: nothing was written. `status` is its HTTP status."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def parse_price(text: str, what: str) -> Decimal:
    try:
        price = Decimal(text.strip())
    except InvalidOperation:
        raise PriceError(400, "bad_price", f"{what}: {text!r} is not a decimal number") from None
    if not price.is_finite() or abs(price) >= PRICE_PER_MTOK_MAX:
        raise PriceError(
            400, "bad_price", f"{what}: {text!r} is not a price below {PRICE_PER_MTOK_MAX:,}"
        )
    return price


def parse_bands(text: str, what: str) -> tuple[Band, ...]:
    """Bands from "UP_TO:PRICE,...,:PRICE" (the last has no limit), prices per million tokens."""
    bands = []
    for part in text.split(","):
        limit, sep, price = part.partition(":")
        if not sep:
            raise PriceError(400, "bad_bands", f"{what}: {part!r} is not UP_TO:PRICE")
        try:
            up_to = int(limit.replace("_", "")) if limit.strip() else None
        except ValueError:
            raise PriceError(400, "bad_bands", f"{what}: {limit!r} is not a token count") from None
        bands.append(Band(up_to, parse_price(price, what)))
    return tuple(bands)


def parse_time(text: str, what: str) -> datetime:
    try:
        at = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise PriceError(400, "bad_time", f"{what}: {text!r} is not an ISO 8601 time") from None
    if at.tzinfo is None:
        raise PriceError(400, "bad_time", f"{what}: {text!r} needs a time zone, e.g. Z")
    return at.astimezone(UTC)


def plan_version(
    plan_id: str,
    version: str,
    effective_from: datetime,
    currency: str,
    tiers_mode: str,
    included_tokens_monthly: int,
    quota_policy: str,
    bands: Mapping[TokenClass, tuple[Band, ...]],
) -> PlanVersion:
    """A checked plan version, or PriceError saying what is wrong with it."""
    missing = [c for c in TOKEN_CLASSES if not bands.get(c)]
    if missing:
        raise PriceError(400, "missing_price", f"no price for {', '.join(missing)}")
    limits = [b.up_to_tokens for c in TOKEN_CLASSES for b in bands[c]]
    checks = (
        (bool(PLAN_ID.match(plan_id)), "plan: lower-case letters, digits and :._- (64 at most)"),
        (
            all(u is None or (type(u) is int and 0 < u <= TOKENS_MAX) for u in limits),
            f"band limits are whole numbers of tokens, 1 to {TOKENS_MAX}",
        ),
        (0 <= included_tokens_monthly <= TOKENS_MAX, f"included tokens: 0 to {TOKENS_MAX}"),
        (tiers_mode in ("graduated", "volume"), "mode must be graduated or volume"),
        (quota_policy in ("charge", "refuse"), "quota must be charge or refuse"),
        (len(currency) == 3 and currency.isalpha() and currency.isupper(), "currency: e.g. USD"),
        (1 <= len(version) <= 64, "version needs 1 to 64 characters"),
    )
    for ok, message in checks:
        if not ok:
            raise PriceError(400, "bad_plan", message)
    try:
        return PlanVersion(
            plan_id, version, effective_from, currency, tiers_mode,  # type: ignore[arg-type]
            included_tokens_monthly, quota_policy, dict(bands),  # type: ignore[arg-type]
        )  # fmt: skip
    except ValueError as exc:
        raise PriceError(400, "bad_bands", str(exc)) from None


async def add_version(conn: asyncpg.Connection, plan: PlanVersion) -> PlanVersion:
    """Write a new version of `plan.plan_id`; refuse one that would reprice the past."""
    async with conn.transaction():
        # One price change at a time, so the checks below hold until the commit.
        await conn.execute("LOCK TABLE ledger.price_plans IN SHARE ROW EXCLUSIVE MODE")
        exists = await conn.fetchval(
            "SELECT count(*) FROM ledger.price_plans WHERE plan_id = $1", plan.plan_id
        )
        if exists and plan.effective_from < await conn.fetchval("SELECT now()"):
            raise PriceError(
                409,
                "effective_in_the_past",
                f"{plan.plan_id} already has prices; a new version from "
                f"{plan.effective_from.isoformat()} (in the past) would reprice usage already "
                "sent; give an effective time from now on",
            )
        await _refuse_repricing(conn, "plan_id", plan.plan_id, plan.effective_from)
        taken = await conn.fetchval(
            "SELECT version FROM ledger.price_plans WHERE plan_id = $1 "
            "AND (version = $2 OR effective_from = $3)",
            plan.plan_id,
            plan.version,
            plan.effective_from,
        )
        if taken is not None:
            raise PriceError(
                409,
                "version_exists",
                f"{plan.plan_id} already has version {taken} at that time or name",
            )
        await conn.execute(
            "INSERT INTO ledger.price_plans (plan_id, version, effective_from, currency, "
            "tiers_mode, included_tokens_monthly, quota_policy) "
            "VALUES ($1, $2, $3, $4, $5, $6, $7)",
            plan.plan_id, plan.version, plan.effective_from, plan.currency, plan.tiers_mode,
            plan.included_tokens_monthly, plan.quota_policy,
        )  # fmt: skip
        await conn.executemany(
            "INSERT INTO ledger.price_bands VALUES ($1, $2, $3, $4, $5, $6)",
            [
                (plan.plan_id, plan.effective_from, c, n, b.up_to_tokens, b.price_per_mtok)
                for c in TOKEN_CLASSES
                for n, b in enumerate(plan.bands[c], start=1)
            ],
        )
        return await load_version(conn, plan.plan_id, plan.effective_from)


async def assign_plan(
    conn: asyncpg.Connection, customer_id: str, plan_id: str | None, effective_from: datetime
) -> dict[str, object]:
    """From `effective_from`, `customer_id` pays `plan_id` (None: its tier's plan again)."""
    async with conn.transaction():
        await conn.execute("LOCK TABLE ledger.customer_plans IN SHARE ROW EXCLUSIVE MODE")
        known = await conn.fetchval(
            "SELECT count(*) FROM intake.customers WHERE customer_id = $1", customer_id
        )
        if not known:
            raise PriceError(404, "unknown_customer", f"no customer {customer_id!r}")
        if plan_id is not None and not await conn.fetchval(
            "SELECT count(*) FROM ledger.price_plans WHERE plan_id = $1", plan_id
        ):
            raise PriceError(
                404, "unknown_plan", f"no plan {plan_id!r}; create it with `prices set` first"
            )
        await _refuse_repricing(conn, "customer_id", customer_id, effective_from)
        inserted = await conn.fetchval(
            "INSERT INTO ledger.customer_plans (customer_id, effective_from, plan_id) "
            "VALUES ($1, $2, $3) ON CONFLICT DO NOTHING RETURNING true",
            customer_id,
            effective_from,
            plan_id,
        )
        if not inserted:
            raise PriceError(409, "plan_exists", f"{customer_id} already has a plan from that time")
    return {
        "customer_id": customer_id,
        "plan_id": plan_id,
        "effective_from": effective_from.isoformat(),
    }


async def _refuse_repricing(
    conn: asyncpg.Connection, column: str, value: str, effective_from: datetime
) -> None:
    assert column in ("plan_id", "customer_id"), column
    booked = await conn.fetchval(
        f"SELECT count(*) FROM ledger.request_usage WHERE {column} = $1 AND submitted_at >= $2",
        value,
        effective_from,
    )
    if booked:
        raise PriceError(
            409,
            "would_reprice",
            f"{booked} booked requests of {value} were submitted after "
            f"{effective_from.isoformat()}; a price from then would reprice them",
        )


async def list_versions(conn: asyncpg.Connection, plan_id: str | None) -> list[PlanVersion]:
    rows = await conn.fetch(
        "SELECT plan_id, effective_from FROM ledger.price_plans "
        "WHERE $1::text IS NULL OR plan_id = $1 ORDER BY plan_id, effective_from",
        plan_id,
    )
    return [await load_version(conn, r["plan_id"], r["effective_from"]) for r in rows]


def from_json(body: Mapping[str, object]) -> PlanVersion:
    """A plan version from the admin API's JSON body (the shape `describe` returns)."""
    try:
        bands_in = body["bands"]
        assert isinstance(bands_in, Mapping)
        bands = {
            c: tuple(
                Band(b.get("up_to_tokens"), parse_price(str(b["price_per_mtok"]), c))
                for b in bands_in.get(c, ())
            )
            for c in TOKEN_CLASSES
        }
        return plan_version(
            str(body["plan_id"]),
            str(body["version"]),
            parse_time(str(body["effective_from"]), "effective_from"),
            str(body.get("currency", "USD")),
            str(body.get("tiers_mode", "graduated")),
            int(body.get("included_tokens_monthly", 0)),  # type: ignore[call-overload]
            str(body.get("quota_policy", "charge")),
            bands,
        )
    except (KeyError, TypeError, ValueError, AssertionError, AttributeError) as exc:
        raise PriceError(400, "bad_plan", f"bad plan body: {exc!r}") from None


# The CLI: `tokenmill prices set|list`.


def add_commands(commands: argparse._SubParsersAction) -> None:
    prices = commands.add_parser("prices", help="price plans and negotiated plans").add_subparsers(
        dest="prices_command", required=True
    )
    put = prices.add_parser(
        "set",
        help="add a plan version, or with --customer assign a customer's plan",
        description="Prices are per million tokens. A class's bands: UP_TO:PRICE,...,:PRICE.",
    )
    put.add_argument("--plan", required=True, help="tier:standard, a negotiated plan, or 'tier'")
    put.add_argument("--customer", help="assign --plan to this customer from --effective")
    put.add_argument("--version")
    put.add_argument("--effective", required=True, help="ISO 8601 time, e.g. 2026-12-01T00:00:00Z")
    put.add_argument("--currency", default="USD")
    put.add_argument("--mode", default="graduated", choices=("graduated", "volume"))
    put.add_argument("--included-tokens", type=int, default=0, help="monthly included quota")
    put.add_argument("--quota", default="charge", choices=("charge", "refuse"))
    for token_class in TOKEN_CLASSES:
        flag = token_class.replace("_", "-")
        put.add_argument(f"--{flag}", help=f"one price for all {token_class} tokens")
        put.add_argument(f"--{flag}-bands", help=f"{token_class} bands, e.g. 1000000:1.50,:1.00")
    listing = prices.add_parser("list", help="every plan version with its bands")
    listing.add_argument("--plan", help="only this plan")
    for command in (put, listing):
        command.add_argument("--json", action="store_true", help="machine-readable output")


async def command(settings: Settings, args: argparse.Namespace) -> str:
    """Run `prices set` or `prices list`; raise PriceError for bad input."""
    conn = await asyncpg.connect(settings.database_url)
    try:
        if args.prices_command == "list":
            versions = await list_versions(conn, args.plan)
            if args.json:
                return json.dumps([describe(v) for v in versions], indent=2)
            return "\n".join(map(_line, versions)) if versions else "no plans"
        effective = parse_time(args.effective, "--effective")
        if args.customer:
            plan_id = None if args.plan == TIER_PLAN else args.plan
            assigned = await assign_plan(conn, args.customer, plan_id, effective)
            if args.json:
                return json.dumps(assigned, indent=2)
            return f"{args.customer} pays {plan_id or 'its tier plan'} from {effective.isoformat()}"
        if not args.version:
            raise PriceError(400, "missing_version", "--version is needed for a new plan version")
        added = await add_version(conn, _plan_from_args(args, effective))
    finally:
        await conn.close()
    return json.dumps(describe(added), indent=2) if args.json else _line(added)


def _plan_from_args(args: argparse.Namespace, effective: datetime) -> PlanVersion:
    bands = {}
    for token_class in TOKEN_CLASSES:
        flag = token_class.replace("_", "-")
        single, banded = getattr(args, token_class), getattr(args, f"{token_class}_bands")
        if single is not None and banded is not None:
            raise PriceError(400, "bad_plan", f"give --{flag} or --{flag}-bands, not both")
        if banded is not None:
            bands[token_class] = parse_bands(banded, f"--{flag}-bands")
        elif single is not None:
            bands[token_class] = (Band(None, parse_price(single, f"--{flag}")),)
    return plan_version(
        args.plan, args.version, effective, args.currency, args.mode, args.included_tokens,
        args.quota, bands,
    )  # fmt: skip


def _line(plan: PlanVersion) -> str:
    def bands(token_class: TokenClass) -> str:
        return ",".join(
            f"{b.up_to_tokens or ''}:{b.price_per_mtok}" for b in plan.bands[token_class]
        )

    return (
        f"{plan.plan_id} {plan.version} from {plan.effective_from.isoformat()} "
        f"{plan.currency} {plan.tiers_mode} included {plan.included_tokens_monthly} "
        f"({plan.quota_policy})  input {bands('input')}  cached {bands('cached_input')}  "
        f"output {bands('output')}"
    )
