"""/v1/usage: a customer's usage by tier, over a range of days, optionally grouped by day,
model or tier. Read from the intake's own records of the customer's requests."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any, Literal

import asyncpg

from tokenmill.intake.errors import ApiError
from tokenmill.intake.keys import Customer
from tokenmill.intake.views import money
from tokenmill.ledger.billing import parse_day

GroupBy = Literal["day", "model", "tier"]
GROUP_BY: tuple[GroupBy, ...] = ("day", "model", "tier")
# Whitelisted SQL per grouping: the query names one of these, never the caller's text.
_GROUP_SQL: dict[GroupBy, str] = {
    "day": "to_char(submitted_at AT TIME ZONE 'UTC', 'YYYY-MM-DD')",
    "model": "model",
    "tier": "tier",
}


@dataclass(frozen=True)
class UsageQuery:
    """Days `start` to `end`, both included (UTC); None: no bound."""

    start: date | None
    end: date | None
    group_by: GroupBy | None


def parse_query(start: str | None, end: str | None, group_by: str | None) -> UsageQuery:
    """Read the query string; raise a 400 that says what is wrong."""
    days = {}
    for name, text in (("from", start), ("to", end)):
        try:
            days[name] = parse_day(text) if text is not None else None
        except ValueError as exc:
            raise ApiError(400, "invalid_request", f"{name}: {exc}", name) from exc
    if days["from"] and days["to"] and days["from"] > days["to"]:
        raise ApiError(
            400, "invalid_request", f"from {days['from']} is after to {days['to']}", "from"
        )
    if group_by is not None and group_by not in GROUP_BY:
        raise ApiError(
            400,
            "invalid_request",
            f"group_by {group_by!r} is not one of: {', '.join(GROUP_BY)}",
            "group_by",
        )
    return UsageQuery(days["from"], days["to"], group_by)  # type: ignore[arg-type]


def _at(day: date | None, days_after: int) -> datetime | None:
    if day is None:
        return None
    return datetime(day.year, day.month, day.day, tzinfo=UTC) + timedelta(days=days_after)


async def usage_by(
    pool: asyncpg.Pool, who: Customer, query: UsageQuery, group_by: GroupBy, groups_max: int
) -> list[asyncpg.Record]:
    """The customer's requests in the query's range, summed per group (at most `groups_max`;
    more is a 400 asking for a narrower range)."""
    rows = await pool.fetch(
        f"SELECT {_GROUP_SQL[group_by]} AS grp, count(*) AS requests, "
        "count(*) FILTER (WHERE status = 'completed') AS completed, "
        "count(*) FILTER (WHERE booked_at IS NOT NULL) AS booked, "
        "coalesce(sum(prompt_tokens), 0) AS prompt_tokens, "
        "coalesce(sum(completion_tokens), 0) AS completion_tokens, "
        "coalesce(sum(energy_j), 0) AS energy_j, coalesce(sum(revenue), 0) AS revenue, "
        # A tier is priced in one currency, so min() names it (NULL until something is booked).
        "min(currency) AS currency "
        "FROM intake.requests WHERE customer_id = $1 "
        "AND ($2::timestamptz IS NULL OR submitted_at >= $2) "
        "AND ($3::timestamptz IS NULL OR submitted_at < $3) "
        "GROUP BY grp ORDER BY grp LIMIT $4",
        who.customer_id,
        _at(query.start, 0),
        _at(query.end, 1),
        groups_max + 1,
    )
    if len(rows) > groups_max:
        raise ApiError(
            400,
            "invalid_request",
            f"more than {groups_max} groups by {group_by}: narrow the range with from and to",
            "from",
        )
    return rows


def _group(row: asyncpg.Record) -> dict[str, Any]:
    return {
        "requests": row["requests"],
        "completed": row["completed"],
        "booked": row["booked"],
        "prompt_tokens": row["prompt_tokens"],
        "completion_tokens": row["completion_tokens"],
        "total_tokens": row["prompt_tokens"] + row["completion_tokens"],
        "energy_j": money(row["energy_j"]),
        "revenue": money(row["revenue"]),
        # None while nothing in this group is booked yet.
        "currency": row["currency"],
    }


def view(
    who: Customer,
    query: UsageQuery,
    tiers: list[asyncpg.Record],
    groups: list[asyncpg.Record] | None,
) -> dict[str, Any]:
    return {
        "object": "usage",
        "customer_id": who.customer_id,
        "from": query.start.isoformat() if query.start else None,
        "to": query.end.isoformat() if query.end else None,
        "group_by": query.group_by,
        "tiers": [{"tier": row["grp"], **_group(row)} for row in tiers],
        "groups": None
        if groups is None
        else [{"group": row["grp"], **_group(row)} for row in groups],
    }
